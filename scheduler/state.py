"""Worker registry, bookings and placement. Pure: no I/O, time passed in.

Selection (`place`) never mutates anything. `Registry.book()` is the one place that
records a routing decision: it adds the request's expected work to the chosen
workers' booked load, which `report()` releases when the request moves on (prefill
done, request done) or rolls back when it fails, and `expire()` reclaims if the
frontend never reports (it died). A worker's load is the larger of what it last
reported in a heartbeat and what is booked on it, so several frontends or
schedulers sharing workers still see their traffic, and a fresh booking counts
before the next heartbeat shows it. A report of a finished phase also takes the
request out of the last heartbeat's figures, which would otherwise count it for up
to a heartbeat interval after it ended (measured: a stale in-flight count sent a
cached prompt to the wrong worker).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from pdserve.step_budget import OVERHEAD, packing_floor
from scheduler import adaptive as A
from scheduler.holding import join
from scheduler.models import LatencyBook
from scheduler.policy import (Candidate, DecodeCandidate, Decision, PlacementConfig,
                              choose_decode, choose_mode, choose_prefill)
from scheduler.roles import KINDS, kinds


@dataclass
class Load:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_leases_held: int = 0
    prefill_tokens: int = 0       # prompt tokens queued or running on a prefill worker
    ttft_ms: float = 0.0          # EWMA of the worker's own time to first token
    tpot_ms: float = 0.0          # EWMA of the worker's inter-token latency
    num_blocks: int = 0           # KV blocks of the engine
    max_num_seqs: int = 0
    step_allow_ms: float = 0.0    # the streams' step allowance (0: no stream running)
    step_budget_tokens: int = 0
    max_num_batched_tokens: int = 0


@dataclass
class Worker:
    worker_id: str
    role: str                 # "prefill" | "decode" | "mixed" (scheduler/roles.py)
    address: str
    agent_address: str
    model: str
    compat_hash: str
    last_seen: float
    load: Load = field(default_factory=Load)
    metrics_address: str = ""
    block_size: int = 0
    kv_bytes_per_token: int = 0   # all layers (from its KV layout), for transfer predictions
    draining: bool = False
    # booked by this scheduler and not yet reported done
    booked_requests: int = 0
    booked_prefill_tokens: int = 0
    booked_blocks: int = 0
    booked_streams: int = 0       # bookings that decode here
    booked_ctx: int = 0           # their prompt tokens
    busy_until: float = 0.0       # predicted end of the prefill work booked here
    pending_role: str = ""        # a role change waiting for its drain
    role_since: float = 0.0
    role_changes: int = 0
    # the engine's streams at its last reported step (ground truth, other frontends too)
    step_decode_seqs: int = 0
    step_decode_ctx: int = 0

    def can(self, kind: str) -> bool:
        return kind in kinds(self.role, self.pending_role)

    def running(self) -> int:
        return max(self.load.running + self.load.waiting, self.booked_requests)

    def queued_prefill_tokens(self) -> int:
        return max(self.load.prefill_tokens, self.booked_prefill_tokens)

    def kv_usage(self) -> float:
        """Reported usage plus what is booked (not yet visible in a heartbeat)."""
        extra = self.booked_blocks / self.load.num_blocks if self.load.num_blocks else 0.0
        return min(1.0, self.load.kv_usage + extra)


@dataclass
class Booking:
    booking_id: str
    prefill: str | None       # None: the decode worker prefills locally
    decode: str
    prefill_tokens: int
    blocks: int
    created: float
    prompt_tokens: int = 0
    prefill_done: bool = False
    prefill_s: float = 0.0        # predicted compute of the prefill, on `prefill or decode`
    pred_ttft_s: float = 0.0
    pred_tpot_s: float = 0.0
    out_tokens: int = 0           # the request's max_tokens (0: not said)
    decode_start: float = 0.0     # when its prefill was reported done
    held_s: float = 0.0           # how long the scheduler held it before booking
    pred_handoff_s: float = 0.0   # of pred_ttft_s, the kept first token's handoff
    decode_streams: int = -1      # streams on the decode worker when chosen (-1: not known)
    pred_first_over_s: float = 0.0   # of pred_ttft_s, the learned fixed part (first_over_s)
    # booked while its prefilling worker was busy: it waits in the engine's queue with the
    # others booked so, and they start together when the work in progress ends
    queued: bool = False


class NoPlacement(Exception):
    pass


class Registry:
    def __init__(self, heartbeat_timeout_s: float, booking_ttl_s: float = 900.0) -> None:
        self.timeout = heartbeat_timeout_s
        self.booking_ttl = booking_ttl_s
        self.workers: dict[str, Worker] = {}
        self.bookings: dict[str, Booking] = {}
        self._ids = itertools.count(1)
        self.route_seq = 0            # decisions booked so far (round-robin position)

    # ------------------------------------------------------------ membership
    def register(self, w: Worker) -> None:
        old = self.workers.get(w.worker_id)
        if old is not None:   # re-registration keeps what is booked on it, and a drain
            w.booked_requests = old.booked_requests
            w.booked_prefill_tokens = old.booked_prefill_tokens
            w.booked_blocks = old.booked_blocks
            w.draining = w.draining or old.draining
            w.booked_streams, w.booked_ctx = old.booked_streams, old.booked_ctx
            w.busy_until = old.busy_until
            w.role = old.role           # the scheduler gives roles; a change in progress
            w.pending_role = old.pending_role            # survives a re-registration
            w.role_since, w.role_changes = old.role_since, old.role_changes
        self.workers[w.worker_id] = w

    def hijack(self, w: Worker, now: float) -> str:
        """Why `w` may not register: its id belongs to a live worker at another address
        (whoever registers a live id would otherwise get its prompts while the real
        worker's heartbeats keep the record alive). "" when it may."""
        old = self.workers.get(w.worker_id)
        if old is None or now - old.last_seen > self.timeout:
            return ""
        if (old.address, old.agent_address) == (w.address, w.agent_address):
            return ""
        return (f"worker id {w.worker_id!r} is live at {old.address}; another address can "
                f"take it only after {self.timeout:.0f}s without heartbeats")

    def heartbeat(self, worker_id: str, load: Load, now: float) -> Worker | None:
        w = self.workers.get(worker_id)
        if w is None:
            return None
        w.load, w.last_seen = load, now
        return w

    def remove(self, worker_id: str) -> Worker | None:
        return self.workers.pop(worker_id, None)

    def expire(self, now: float) -> list[Worker]:
        dead = [w for w in self.workers.values() if now - w.last_seen > self.timeout]
        for w in dead:
            del self.workers[w.worker_id]
        return dead

    def live(self, role: str, model: str | None = None, routable: bool = False) -> list[Worker]:
        """Workers whose role includes `role`'s work (a mixed worker is in both pools)."""
        need = KINDS[role]
        return [w for w in self.workers.values()
                if need <= KINDS[w.role] and (not model or w.model == model)
                and not (routable and w.draining)]

    # ------------------------------------------------------------ roles
    def set_role(self, worker_id: str, role: str, now: float) -> Worker | None:
        """Change a worker's role: at once when the new role only adds work, else once
        what the old role holds has drained (`settle_roles`)."""
        w = self.workers.get(worker_id)
        if w is None:
            return None
        if role == w.role:
            w.pending_role = ""
        elif KINDS[w.role] <= KINDS[role]:
            self._flip(w, role, now)
        else:
            w.pending_role = role
            self.settle_roles(now)
        return w

    def _flip(self, w: Worker, role: str, now: float) -> None:
        w.role, w.pending_role = role, ""
        w.role_since, w.role_changes = now, w.role_changes + 1

    def settle_roles(self, now: float) -> list[Worker]:
        """Flip the workers whose pending change has drained; returns them."""
        flipped = []
        for w in self.workers.values():
            if not w.pending_role:
                continue
            lost = KINDS[w.role] - KINDS[w.pending_role]
            busy = any(("prefill" in lost and b.prefill == w.worker_id and not b.prefill_done)
                       or ({"decode", "local"} & lost and b.decode == w.worker_id)
                       for b in self.bookings.values())
            if not busy:
                self._flip(w, w.pending_role, now)
                flipped.append(w)
        return flipped

    # ------------------------------------------------------------ bookings
    def book(self, d: Decision, now: float) -> Booking:
        b = Booking(f"b{next(self._ids)}", d.prefill, d.decode, d.prefill_tokens, d.blocks, now,
                    prompt_tokens=d.prompt_tokens, prefill_s=d.prefill_s,
                    pred_ttft_s=d.pred_ttft_s, pred_tpot_s=d.pred_tpot_s,
                    out_tokens=d.out_tokens, pred_handoff_s=d.pred_handoff_s,
                    decode_streams=d.decode_streams, pred_first_over_s=d.pred_first_over_s)
        self.route_seq += 1
        if b.prefill is not None:
            p = self.workers[b.prefill]
            p.booked_requests += 1
            p.booked_prefill_tokens += b.prefill_tokens
        dw = self.workers[b.decode]
        dw.booked_requests += 1
        dw.booked_blocks += b.blocks
        dw.booked_streams += 1
        dw.booked_ctx += b.prompt_tokens
        w = self.workers[b.prefill or b.decode]
        b.queued = w.busy_until > now
        w.busy_until = max(now, w.busy_until) + b.prefill_s
        self.bookings[b.booking_id] = b
        return b

    def queued_on(self, w: Worker) -> list[Booking]:
        """The bookings waiting on `w` behind its work in progress (the next step's)."""
        return [b for b in self.bookings.values() if b.queued and not b.prefill_done
                and (b.prefill or b.decode) == w.worker_id]

    def queued_tokens(self, w: Worker, queued: list[Booking] | None = None) -> int:
        queued = self.queued_on(w) if queued is None else queued
        return sum(b.prefill_tokens for b in queued)

    def started_backlog(self, w: Worker, now: float,
                        queued: list[Booking] | None = None) -> float:
        """Of `backlog`, the work in progress: what the queued bookings wait for."""
        queued = self.queued_on(w) if queued is None else queued
        return max(0.0, self.backlog(w, now) - sum(b.prefill_s for b in queued))

    def join_backlog(self, w: Worker, now: float, coef, own_tokens: int,
                     ttft_s: float) -> tuple[float, float] | None:
        """(dispatch wait, predicted backlog) for a prompt of `own_tokens` that may join
        the prompts queued on `w` (scheduler/holding.py `join`): only on a worker with no
        stream, whose engine packs queued prompts into one step up to its packing floor
        (pdserve/step_budget.py `fcfs_tokens`). None: the whole backlog."""
        if coef is None or _streams(w):
            return None
        queued = self.queued_on(w)
        if not queued:
            return None
        cap = w.load.max_num_batched_tokens or 1 << 30
        step = min(cap, packing_floor(coef, OVERHEAD, cap))
        dues = [b.created - b.held_s + ttft_s - now for b in queued]
        return join(self.started_backlog(w, now, queued), self.queued_tokens(w, queued),
                    dues, own_tokens, coef, step)

    def backlog(self, w: Worker, now: float) -> float:
        """Predicted seconds of prefill work booked on `w` and not yet done."""
        return max(0.0, w.busy_until - now)

    def prefill_ends(self, now: float) -> dict[str, float]:
        """Seconds from now to the predicted end of every booked prefill not yet done: each
        worker computes its bookings in the order they were made, the last ending when its
        backlog does."""
        queues: dict[str, list[Booking]] = {}
        for b in self.bookings.values():
            if not b.prefill_done:
                queues.setdefault(b.prefill or b.decode, []).append(b)
        ends = {}
        for wid, queue in queues.items():
            w = self.workers.get(wid)
            end = self.backlog(w, now) if w is not None else sum(b.prefill_s for b in queue)
            for b in reversed(queue):
                ends[b.booking_id] = end
                end = max(0.0, end - b.prefill_s)
        return ends

    def timelines(self, now: float, tpot_s: float, ttft_s: float = 0.0) -> dict[str, tuple]:
        """Each worker's decode streams over time, (start s, end s, 1, context tokens, late)
        from now (scheduler/adaptive.py, `Node.streams_at`): the bookings decoding there,
        for (output tokens - 1) x their predicted TPOT (`tpot_s` when none was predicted),
        from the end of their prefill (`prefill_ends`); late: that end is (predicted) past
        its arrival + `ttft_s` (0: none is). Streams a worker's engine reported and no
        booking explains (another scheduler's) run for good. One pass over the bookings."""
        ends = self.prefill_ends(now)
        out: dict[str, list] = {}
        for b in self.bookings.values():
            n_out = b.out_tokens or A.DEFAULT_OUTPUT
            step = b.pred_tpot_s or tpot_s
            life = max(1, n_out - 1) * step
            ctx = b.prompt_tokens + n_out / 2
            due = b.created - b.held_s + ttft_s - now    # its first token, from now
            if b.prefill_done:
                span = (0.0, max(step, b.decode_start + life - now), 1, ctx,
                        ttft_s > 0 and b.decode_start - now > due)
            else:
                start = ends.get(b.booking_id, 0.0)
                span = (start, start + life, 1, ctx, ttft_s > 0 and start > due)
            out.setdefault(b.decode, []).append(span)
        for w in self.workers.values():
            if w.worker_id not in out and w.step_decode_seqs > 0:
                out[w.worker_id] = [(0.0, math.inf, w.step_decode_seqs, w.step_decode_ctx)]
        return {k: tuple(v) for k, v in out.items()}

    def _release_prefill(self, b: Booking, now: float) -> None:
        done, b.prefill_done = b.prefill_done, True
        if done:
            return
        b.decode_start = now
        w = self.workers.get(b.prefill or b.decode)
        if w is not None:   # what is still booked on it has not started: it ends after it
            left = [o for o in self.bookings.values()
                    if not o.prefill_done and (o.prefill or o.decode) == w.worker_id]
            w.busy_until = now + sum(o.prefill_s for o in left)
            for o in left:      # the engine's next step takes the queued ones
                o.queued = False
        if b.prefill is None:
            return
        p = self.workers.get(b.prefill)
        if p is not None:
            p.booked_requests = max(0, p.booked_requests - 1)
            p.booked_prefill_tokens = max(0, p.booked_prefill_tokens - b.prefill_tokens)
            p.load.prefill_tokens = max(0, p.load.prefill_tokens - b.prompt_tokens)
            p.load.running = max(0, p.load.running - 1)

    def prefill_done(self, booking_id: str, now: float = 0.0) -> bool:
        b = self.bookings.get(booking_id)
        if b is None:
            return False
        self._release_prefill(b, now)
        return True

    def finish(self, booking_id: str, now: float = 0.0) -> Booking | None:
        """The request ended (done, failed or cancelled): release, or roll back, all of it."""
        b = self.bookings.pop(booking_id, None)
        if b is None:
            return None
        self._release_prefill(b, now)
        dw = self.workers.get(b.decode)
        if dw is not None:
            dw.booked_requests = max(0, dw.booked_requests - 1)
            dw.booked_blocks = max(0, dw.booked_blocks - b.blocks)
            dw.booked_streams = max(0, dw.booked_streams - 1)
            dw.booked_ctx = max(0, dw.booked_ctx - b.prompt_tokens)
            dw.load.running = max(0, dw.load.running - 1)
        return b

    def expire_bookings(self, now: float) -> list[Booking]:
        old = [b for b in self.bookings.values() if now - b.created > self.booking_ttl]
        return [self.finish(b.booking_id, now) for b in old]


def place(reg: Registry, cfg: PlacementConfig, model: str, num_tokens: int,
          overlap_of, exclude: frozenset[str] = frozenset(), rng=None,
          book: LatencyBook | None = None, slo: A.SLO | None = None, max_tokens: int = 0,
          now: float = 0.0, held_s: float = 0.0) -> Decision:
    """Choose the decode worker, the mode (disaggregated or local prefill) and the prefill
    worker. `overlap_of(workers) -> {worker_id: cached tokens}` looks up the prefix index.
    With the adaptive policy and a warm latency model (`book`), by predicted SLO
    attainment (scheduler/adaptive.py); otherwise by the cost functions. Mutates nothing."""
    decodes = [w for w in reg.live("decode", model, routable=True)
               if w.worker_id not in exclude and w.can("decode")]
    if not decodes:
        raise NoPlacement(f"no decode worker serves model {model!r}")
    prefills = [w for w in reg.live("prefill", model, routable=True)
                if w.worker_id not in exclude and w.can("prefill")]
    compat = {w.compat_hash for w in decodes}
    prefills = [p for p in prefills if p.compat_hash in compat]
    cached = overlap_of(list({w.worker_id: w for w in prefills + decodes}.values()))
    # the conditional-disaggregation thresholds, when set, pin the fixed rules
    pinned = cfg.local_prefill_max_tokens or cfg.prefill_saturation_tokens
    if cfg.policy == "adaptive" and book is not None and slo is not None and not pinned:
        d = _place_adaptive(reg, book, slo, prefills, decodes, cached, num_tokens,
                            max_tokens, now, held_s, cfg.overflow == "on")
        if d is not None:
            return d
    pcands = [Candidate(p.worker_id, cached.get(p.worker_id, 0), p.queued_prefill_tokens(),
                        p.running()) for p in prefills]
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


def _streams(w: Worker) -> int:
    """Decode sequences running on `w` or booked to start there."""
    return max(w.step_decode_seqs, w.booked_streams)


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
    streams = _streams(w) if decodes else 0
    ctx = max(w.step_decode_ctx, w.booked_ctx) if streams else 0
    allow = w.load.step_allow_ms / 1e3 if w.load.step_allow_ms > 0 else math.inf
    timeline = timelines.get(w.worker_id, ()) if decodes else ()
    return A.Node(w.worker_id, coef, backlog_s, streams, ctx, allow,
                  w.load.max_num_batched_tokens, cached,
                  book.recent_of(w.worker_id, now).held_excess_s, transfer_s, timeline, tail_s,
                  under, mid_s, book.first_over_s(w.worker_id, "remote"),
                  book.first_over_s(w.worker_id, "local"))


def _place_adaptive(reg: Registry, book: LatencyBook, slo: A.SLO, prefills: list[Worker],
                    decodes: list[Worker], cached: dict[str, int], num_tokens: int,
                    max_tokens: int, now: float, held_s: float = 0.0,
                    overflow: bool = False) -> Decision | None:
    """None when some candidate has no model yet (the caller falls back to the costs)."""
    pn, dn = [], []
    timelines = reg.timelines(now, slo.safety * slo.tpot_s, slo.ttft_s if slo.late else 0.0)
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
        s = _streams(d)
        over, mid = book.handoff_over_s(d.worker_id, streams=s), \
            book.handoff_over_s(d.worker_id, 50, streams=s)
        n = _node(reg, book, d, cached.get(d.worker_id, 0), now, timelines, fit,
                  None if over is None else fit + over, book.tpot_under(d.worker_id),
                  0.0 if mid is None else fit + mid)
        if n is None:
            return None
        dn.append(n)
    hashes = {w.worker_id: w.compat_hash for w in prefills + decodes}
    local_ok = {d.worker_id for d in decodes if d.can("local") and d.kv_usage() < 0.95}
    # overflow (scheduler/adaptive.py): a whole request on a prefill worker with KV room
    # (one changing role is not here: its work is what both roles allow, so no prefill)
    spare = [_node(reg, book, p, cached.get(p.worker_id, 0), now, timelines)
             for p in prefills if overflow and not p.can("local") and p.kv_usage() < 0.95]
    opts = A.options(pn, dn, num_tokens, max_tokens, slo, local_ok,
                     lambda p, d: hashes[p] == hashes[d], held_s, tuple(spare))
    if not opts:
        return None
    best = opts[0]
    dw = reg.workers[best.decode]
    blocks = -(-num_tokens // (dw.block_size or 1)) + 1
    local = best.kind != "remote"
    why = "overflow" if best.kind == "overflow" else A.reason(best)
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
