"""Placement: for one request, the decode worker, the mode (disaggregated or local
prefill) and the prefill worker, from the registry's state (scheduler/state.py). With the
adaptive policy and a warm latency model by predicted SLO attainment
(scheduler/adaptive.py), else by the cost functions (scheduler/policy.py). Pure: no I/O,
time passed in; nothing here mutates the registry."""

from __future__ import annotations

from dataclasses import replace

from scheduler import adaptive as A
from scheduler import ranking as R
from scheduler.models import LatencyBook
from scheduler.policy import (Candidate, DecodeCandidate, Decision, PlacementConfig,
                              choose_decode, choose_mode, choose_prefill, kv_blocks)
from scheduler.state import NoPlacement, Registry, Worker

# local prefills whose engine part is predicted at this share of the TTFT SLO or more are
# corrected by how far recent ones that long ran over (LatencyBook.local_slow)
LOCAL_SLOW_SHARE = 0.25


def long_local_from_s(slo: A.SLO) -> float:
    """Where a local prefill counts as long: corrected by `local_slow` here, and its
    overrun kept out of the local fixed part (scheduler/feedback.py)."""
    return LOCAL_SLOW_SHARE * slo.ttft_s


def place(reg: Registry, cfg: PlacementConfig, model: str, num_tokens: int,
          overlap_of, exclude: frozenset[str] = frozenset(), rng=None,
          book: LatencyBook | None = None, slo: A.SLO | None = None, max_tokens: int = 0,
          now: float = 0.0, held_s: float = 0.0, behind: tuple[int, float] = (0, 0.0)
          ) -> Decision:
    """Choose the decode worker, the mode (disaggregated or local prefill) and the prefill
    worker. `overlap_of(workers) -> {worker_id: cached tokens}` looks up the prefix index.
    With the adaptive policy and a warm latency model (`book`), by predicted SLO
    attainment (scheduler/adaptive.py); otherwise by the cost functions. `behind`: the
    requests held after this one (late binding) and their predicted prefill seconds.
    Mutates nothing."""
    decodes = [w for w in reg.live("decode", model, routable=True)
               if w.worker_id not in exclude and w.can("decode")]
    prefills = [w for w in reg.live("prefill", model, routable=True)
                if w.worker_id not in exclude and w.can("prefill")]
    if not decodes:
        if cfg.overflow != "off" and prefills:
            return _no_decoder(cfg, prefills, overlap_of(prefills), num_tokens, max_tokens,
                               rng, reg.route_seq)
        raise NoPlacement(f"no decode worker serves model {model!r}")
    compat = {w.compat_hash for w in decodes}
    prefills = [p for p in prefills if p.compat_hash in compat]
    cached = overlap_of(list({w.worker_id: w for w in prefills + decodes}.values()))
    # the conditional-disaggregation thresholds, when set, pin the fixed rules
    pinned = cfg.local_prefill_max_tokens or cfg.prefill_saturation_tokens
    if cfg.policy == "adaptive" and book is not None and slo is not None and not pinned:
        d = _place_adaptive(reg, book, slo, prefills, decodes, cached, num_tokens,
                            max_tokens, now, held_s, cfg.overflow, behind)
        if d is not None:
            return d
    pcands = _candidates(prefills, cached)
    prefill = choose_prefill(cfg, pcands, num_tokens, rng, reg.route_seq)
    if prefill is not None:   # decode must be able to read that prefill worker's blocks
        ph = reg.workers[prefill.worker_id].compat_hash
        others = [d for d in decodes if d.compat_hash == ph and d.worker_id != prefill.worker_id]
        if not others:        # a mixed worker that is the only decoder: it does it all
            prefill = None
        else:
            decodes = others
    dcands = [DecodeCandidate(d.worker_id, d.kv_usage(), d.running(),
                              d.load.max_num_seqs, d.load.tpot_ms,
                              cached.get(d.worker_id, 0)) for d in decodes]
    if not dcands:
        raise NoPlacement(f"no decode worker is KV-compatible with a prefill worker for {model!r}")
    decode = choose_decode(cfg, dcands, rng, reg.route_seq)
    block = reg.workers[decode.worker_id].block_size or 1
    try:
        d = choose_mode(cfg, num_tokens, prefill, pcands, decode, block)
    except LookupError as e:
        raise NoPlacement(f"{e} for model {model!r}") from None
    # the fixed rules' remote prefills keep their first token as the chooser's would
    held = d.mode == "disagg" and slo is not None and slo.first_token == "with_stream"
    return replace(d, out_tokens=max_tokens, hold_first=held)


def _candidates(prefills: list[Worker], cached: dict[str, int]) -> list[Candidate]:
    """The prefill workers as the prefill cost functions see them."""
    return [Candidate(p.worker_id, cached.get(p.worker_id, 0), p.queued_prefill_tokens(),
                      p.running()) for p in prefills]


def _node(reg: Registry, book: LatencyBook, w: Worker, cached: int, now: float,
          timelines: dict[str, tuple], transfer_s: float = 0.0,
          tail_s: float | None = 0.0, under: float = 0.0,
          mid_s: float = 0.0, backlog_s: float | None = None) -> A.Node | None:
    coef = book.coef(w.worker_id, w.model)
    if coef is None:
        return None
    if backlog_s is None:
        backlog_s = reg.backlog(w, now)
    # a role that prefills locally decodes too, and a prefill worker decodes the overflow
    # requests booked on it (scheduler/adaptive.py): their streams hold its prompts to
    # their TPOT
    decodes = w.can("decode") or w.booked_streams > 0
    streams = w.streams() if decodes else 0
    ctx = max(w.step_decode_ctx, w.booked_ctx) if streams else 0
    allow = w.allow_s()
    timeline = timelines.get(w.worker_id, ()) if decodes else ()
    return A.Node(w.worker_id, coef, backlog_s, streams, ctx, allow,
                  w.load.max_num_batched_tokens, cached,
                  book.recent_of(w.worker_id, now).held_excess_s, transfer_s, timeline, tail_s,
                  under, mid_s, book.first_over_s(w.worker_id, "remote"),
                  book.first_over_s(w.worker_id, "local"))


def _place_adaptive(reg: Registry, book: LatencyBook, slo: A.SLO, prefills: list[Worker],
                    decodes: list[Worker], cached: dict[str, int], num_tokens: int,
                    max_tokens: int, now: float, held_s: float = 0.0,
                    overflow: str = "fallback", behind: tuple[int, float] = (0, 0.0)
                    ) -> Decision | None:
    """None when some candidate has no model yet (the caller falls back to the costs)."""
    pn, dn = [], []
    timelines = reg.timelines(now, slo.safety * slo.tpot_s, slo.ttft_s if slo.late else 0.0)
    slow_from_s = long_local_from_s(slo)
    for p in prefills:
        c = cached.get(p.worker_id, 0)
        j = reg.join_backlog(p, now, book.coef(p.worker_id, p.model), num_tokens - c,
                             slo.ttft_s)
        n = _node(reg, book, p, c, now, timelines, backlog_s=None if j is None else j[1])
        if n is None:
            return None
        pn.append(n)
    for d in decodes:
        fit = book.transfer_s(d.worker_id, d.kv_bytes_per_token * num_tokens)
        s = d.streams()
        over, mid = book.handoff_over_s(d.worker_id, streams=s), \
            book.handoff_over_s(d.worker_id, 50, streams=s)
        n = _node(reg, book, d, cached.get(d.worker_id, 0), now, timelines, fit,
                  None if over is None else fit + over, book.tpot_under(d.worker_id),
                  0.0 if mid is None else fit + mid)
        if n is None:
            return None
        dn.append(replace(n, local_slow=book.local_slow(d.worker_id, slow_from_s),
                          local_slow_from_s=slow_from_s))
    hashes = {w.worker_id: w.compat_hash for w in prefills + decodes}
    local_ok = {d.worker_id for d in decodes if d.can("local") and d.kv_usage() < 0.95}
    if behind[0]:       # the held requests' streams that will land beside this one's
        lands = A.landing(*behind, max_tokens or A.DEFAULT_OUTPUT, slo,
                          len({w.worker_id for w in prefills} | local_ok), len(dn))
        dn = [replace(n, landing=lands) for n in dn]
    # overflow (scheduler/adaptive.py): a whole request on a prefill worker with KV room
    # (one changing role is not here: its work is what both roles allow, so no prefill);
    # its own prompt waits for the whole backlog there, joining no queued step
    spare = [replace(n, backlog_s=reg.backlog(p, now)) for p, n in zip(prefills, pn)
             if overflow in ("on", "balance") and not p.can("local") and p.kv_usage() < 0.95]
    opts = A.options(pn, dn, num_tokens, max_tokens, slo, local_ok,
                     lambda p, d: hashes[p] == hashes[d], held_s, tuple(spare),
                     overflow == "balance")
    if not opts:
        return None
    best = opts[0]
    dw = reg.workers[best.decode]
    blocks = kv_blocks(num_tokens, dw.block_size)
    local = best.kind != "remote"
    why = "overflow" if best.kind == "overflow" else R.reason(best, slo, held_s)
    return Decision(None if local else best.prefill, best.decode, "local" if local else "disagg",
                    why, max(0, num_tokens - best.cached), best.cached, blocks,
                    num_tokens, prefill_s=best.prefill_s, pred_ttft_s=best.ttft_s,
                    pred_tpot_s=best.tpot_s,
                    runner_up=opts[1].describe() if len(opts) > 1 else "",
                    chunk_tokens=best.chunk, out_tokens=max_tokens, hold_first=best.hold,
                    pred_handoff_s=best.ttft_s - best.first_s if best.hold else 0.0,
                    decode_streams=next(n.streams for n in dn + spare
                                        if n.worker_id == best.decode),
                    pred_first_over_s=best.first_over_s)


def _no_decoder(cfg: PlacementConfig, prefills: list[Worker], cached: dict[str, int],
                num_tokens: int, max_tokens: int, rng, seq: int) -> Decision:
    """No decode-capable worker is left (dead, draining, excluded after a failure), and
    overflow is not off: the whole request on the prefill worker the prefill costs pick, as a
    decode worker takes whole requests when no prefill worker is left
    (`PlacementConfig.local_fallback`)."""
    p = choose_prefill(cfg, _candidates(prefills, cached), num_tokens, rng, seq)
    w = next(x for x in prefills if x.worker_id == p.worker_id)
    blocks = kv_blocks(num_tokens, w.block_size)
    return Decision(None, w.worker_id, "local", "no_decode_worker",
                    max(0, num_tokens - p.cached_tokens), p.cached_tokens, blocks,
                    num_tokens, out_tokens=max_tokens)
