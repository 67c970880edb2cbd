"""Adaptive disaggregation: for each request, predict TTFT and TPOT for every way to serve
it and take the one most likely to meet both SLOs. Pure: no I/O, no clock.

Options (the workers' roles say which exist, scheduler/roles.py):
- remote: a prefill-capable worker P computes the prompt, the KV moves to a
  decode-capable worker D, which decodes;
- local: D computes the prompt itself, chunked beside its running streams under the
  per-step budget its engine enforces (pdserve/step_budget.py), then decodes;
- overflow: a prefill worker computes the prompt and decodes it too, as a local option on
  a worker whose role is prefill. Offered only when no other option is predicted to meet
  both SLOs and this one is (`overflow_options`): the decode side is full and the prefill
  side has room, as in a burst of short prompts, when one decode engine would run every
  stream while the prefill core waits for the next prompt. Its stream then holds that
  worker's later prompts to its TPOT (the same engine budget), which the choices after it
  see on that worker's timeline. With `balance` (`--overflow balance`) it is also offered,
  first, when it scores BALANCE over the best option that meets both.

Predictions, from each worker's fitted step model (pdserve/latency.py) and what is booked
on it:
- TTFT = backlog(W) + prefill(W), where W is the worker that computes the prompt, the
  backlog is the prefill work booked on W and not yet done (predicted seconds), and the
  prefill follows the engine's rules (`prefill_on`);
- TPOT = the decode step of D with one more stream and its context, beside the streams of
    D's timeline over the new stream's life (scheduler/timeline.py, `mean_load`)
  + what D's streams' steps took lately beyond plain decode steps (prompt chunks beside
    them, contention), on average
  + the prefill work booked on D spread over the output tokens, up to what the engine
    lets a stream absorb
  + for remote, the handoff spread over the output tokens (the client waits for it
    between the first token and the second; scheduler/models.py, `handoff_s`), unless
    the frontend keeps the first token until the stream's (`remote`: the handoff is in
    TTFT instead, up to the frontend's release: `released`).

A local prefill also costs the streams already running on D: its steps take their slack
(the engine enforces the allowance, down to its floor); a local option's score is at most
1 - safety * step / allowance (0.1 for a step that uses the allowance exactly, as a
stream held to safety * SLO scores against its SLO), and -1 when they have no slack left.
Streams whose first token comes after the TTFT SLO (`late` in the timeline) count for
neither: they have missed their SLOs already, and their engine keeps no slack for them
(pdserve/step_budget.py), so a prompt beside only such streams goes at the pace of an
engine with none, and a stream that lands meanwhile waits for such a step. A prompt that
misses its own TTFT SLO anyway pays that too: its cap counts the streams that are not late
and land while it computes (a late request yields to streams that can still make their
SLOs). Without this cap the prefill-dominated mix lost every cell (docs/design.md).

How the options are scored and ranked: scheduler/ranking.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pdserve.kept_first import release_after
from pdserve.latency import Coef, chunk_attn
from pdserve.step_budget import alone, floor_tokens, stream_tokens, whole_alone
from scheduler.ranking import (MARGIN, SLO, Option, computed_late, met, ranked,
                               score)
from scheduler.timeline import Sweep, is_late, mean_load, spent_until

BALANCE = 2 * MARGIN      # an overflow option this much better goes first (`options`)
DEFAULT_OUTPUT = 128      # output tokens assumed when a request does not say
MAX_SEGMENTS = 256        # timeline segments a prefill prediction walks, at most


@dataclass(frozen=True)
class Node:
    """A worker as the chooser sees it."""
    worker_id: str
    coef: Coef
    backlog_s: float = 0.0       # booked prefill work not yet done (predicted seconds)
    streams: int = 0             # decode sequences running or booked
    ctx: int = 0                 # their context tokens
    allow_s: float = math.inf    # step time its streams afford (inf: none running)
    max_step_tokens: int = 0     # vLLM's max_num_batched_tokens (0: unknown)
    cached: int = 0              # prompt tokens of this request it holds
    excess_s: float = 0.0        # its streams' recent steps beyond plain decode steps
    transfer_s: float = 0.0      # KV of this prompt into it (decode side)
    # its streams over time: (start s, end s, sequences, context tokens[, late]) from now,
    # those decoding now and those booked to start (empty: `streams` run for good); a late
    # one's first token comes after its TTFT SLO: its engine keeps no slack for it
    streams_at: tuple = ()
    # the KV's handoff at its recent 90th percentile (None: too few handoffs yet)
    transfer_tail_s: float | None = 0.0
    # how far one in ten recent remote-prefilled streams here ran over their predicted
    # TPOT (a share of it): the model's own recent error
    tpot_under: float = 0.0
    transfer_mid_s: float = 0.0  # the handoff at its recent median (0: not known yet)
    # a first token's fixed way to the client beyond this worker's engine steps (HTTP,
    # routing, RPCs), learned: a remote prefill's here, and a local one's
    first_over_s: float = 0.0
    local_first_over_s: float = 0.0
    # streams expected to start here while a new one decodes: requests held behind it
    # (late binding) whose prompts are computed meanwhile (`landing`)
    landing: float = 0.0
    # a local prefill whose engine part is predicted at `local_slow_from_s` or more takes
    # `local_slow` times it, as recent ones here did (LatencyBook.local_slow)
    local_slow: float = 1.0
    local_slow_from_s: float = math.inf


def allowance(n: Node, slo: SLO) -> float:
    """The step time `n`'s streams afford (what its engine reported), or the SLO's."""
    return n.allow_s if math.isfinite(n.allow_s) else slo.safety * slo.tpot_s


def prefill_on(n: Node, tokens: int, slo: SLO, local: bool = False) -> tuple[float, int]:
    """(seconds, the first step's prompt tokens or 0 if it takes it all) to compute the
    request's uncached prompt on `n`, starting when its backlog ends; `local`: it decodes
    there too.

    The engine's rules (pdserve/step_budget.py), over `n`'s stream timeline (`streams_at`):
    while no stream runs, unchunked (a remote prefill) or in `alone` chunks (a local one),
    and so while only late streams run (their steps are longer by their decode work);
    while streams with an SLO left run, the tokens that keep each step within safety * SLO
    beside them (`stream_tokens`; the first step takes the slack they have now, `allow_s`),
    except that while the streams decoding now run, their slack is spent after that first
    step (or from the start, by the prompts booked before this one): the floor until they
    end (`spent_until`). Streams end and start meanwhile: the ones decoding now end, and
    the prompts booked before this one start theirs when their prefill ends, so a decode
    engine whose streams are short is free between them, however many are booked on it."""
    cached = min(n.cached, max(0, tokens - 1))     # vLLM computes at least the last token
    todo = tokens - cached
    busy = n.streams_at
    if not busy and n.streams > 0:      # streams with no known end (another frontend's)
        busy = ((0.0, math.inf, n.streams, n.ctx),)
    if not busy and not local:
        return n.coef.prefill_time(todo, cached, n.max_step_tokens), 0
    alone_chunk = alone(n.coef, slo.tpot_s, slo.safety)[1] if local else todo
    cap = n.max_step_tokens or todo
    if (local and not busy and slo.whole_alone
            and whole_alone(n.coef, todo, cached, alone_chunk, slo.ttft_s - n.backlog_s,
                            n.max_step_tokens)):
        alone_chunk = todo      # as the engine steps (step_budget.whole_alone)
    t0 = t = n.backlog_s
    spent = spent_until(busy) if math.isfinite(n.allow_s) else 0.0
    done, first, steps = 0, 0, 0
    sweep = Sweep(busy)
    while done < todo and steps < MAX_SEGMENTS:
        steps += 1
        seqs, ctx, nxt = sweep.at(t)
        left = todo - done
        slack_step = False
        if sweep.kept <= 0:      # no stream with an SLO to keep
            chunk = min(alone_chunk, left, cap)
        else:
            chunk = stream_tokens(n.coef, slo.tpot_s, seqs, ctx, cached + done, slo.safety,
                                  slo.least)
            floor = floor_tokens(n.coef, slo.tpot_s, seqs, ctx, safety=slo.safety,
                                 least=slo.least) if spent else chunk
            if t == 0.0 and math.isfinite(n.allow_s):   # the slack they have now
                chunk = max(floor, n.coef.chunk_budget(n.allow_s, seqs, ctx, cached))
                slack_step = True   # one step: the floor's after it
            elif t < spent:     # ...taken, by it or the prompts before it: the floor
                chunk = floor
            chunk = min(chunk, left, cap)
            if chunk <= 0:      # a floor of 0 and no room: the prompt waits for a change
                if math.isfinite(nxt):
                    t = max(t, nxt)
                    continue
                chunk = 1       # streams with no known end: one token a step, at worst
        if done == 0:
            first = chunk if chunk < todo else 0
        one = n.coef.step_time(chunk, chunk_attn(chunk, cached + done), seqs, ctx)
        # steps are atomic: as many as reach the next start or end of a stream
        k = 1 if slack_step else min(
            -(-left // chunk), max(1, math.ceil((nxt - t) / one)) if math.isfinite(nxt)
            else -(-left // chunk))
        if k > 1:
            k_tok = min(k * chunk, left)
            t += n.coef.steps_time(k_tok, chunk, cached + done, seqs, ctx)
            done += k_tok
        else:
            t += one
            done += chunk
    if done < todo:     # a timeline longer than MAX_SEGMENTS: the rest at the last pace
        t += n.coef.steps_time(todo - done, chunk, cached + done, seqs, ctx)
    return t - t0, first


def tpot_on(d: Node, tokens: int, out: int, slo: SLO, extra_s: float = 0.0,
            late: bool = False, start_s: float = 0.0) -> float:
    """A new stream's TPOT on `d`: a decode step with it plus what the steps of the
    streams there took beyond plain decode steps lately (prompt chunks beside them, a
    busy memory bus), plus the prefill work booked on `d` as far as the engine lets
    streams absorb it, plus `extra_s` (a KV transfer) and, when it lands during a local
    prefill alone, that step. `late`: its first token comes after the TTFT SLO, so its
    engine keeps no slack for it: those steps and that work are not held to its SLO.
    `start_s`: when it starts decoding (s from now); the streams beside it are those of
    `d`'s timeline over its life (`mean_load`), or, with no timeline, those running now."""
    per = max(1, out - 1)
    more = 1 + d.landing            # it, and the held requests landing beside it
    own = (tokens + out / 2) * more

    def step(seqs: float, ctx: float) -> float:
        return d.coef.step_time(decode_seqs=seqs + more, decode_ctx=ctx + own)
    base = step(d.streams, d.ctx)
    if d.streams_at:    # its life at the pace of this step, and the steps over that life
        base = step(*mean_load(d.streams_at, start_s, per * base))
    if late:
        return base + max(0.0, d.excess_s) + (d.backlog_s + extra_s) / per
    # the engine holds prompt chunks to what its streams afford (safety * SLO)
    est = min(base + max(0.0, d.excess_s), max(base, slo.safety * slo.tpot_s))
    if d.backlog_s > 0:
        est += min(d.backlog_s / per, max(0.0, slo.safety * slo.tpot_s - est))
        if d.streams <= 0:
            extra_s += min(d.backlog_s, alone_step(d.coef, slo))
    return est + extra_s / per


def landing(behind: int, behind_s: float, out: int, slo: SLO, prefillers: int,
            decoders: int) -> float:
    """Streams each of `decoders` decode-capable workers can expect to start while a new
    stream of `out` tokens decodes (at safety * SLO a token): of the `behind` requests held
    after it, whose prompts take `behind_s` predicted seconds over `prefillers` workers,
    those computed within that time, spread evenly. Without them a burst's first streams
    were predicted at 18-20 ms a token and ran at 33-37 ms beside the 24 that landed
    (docs/design.md, "Streams that land beside it")."""
    if behind <= 0 or decoders <= 0:
        return 0.0
    life = max(1, out - 1) * slo.safety * slo.tpot_s
    span = behind_s / max(1, prefillers)
    k = behind if span <= life else behind * life / span
    return k / decoders


def kept(d: Node, until: float = 0.0, since: float = 0.0) -> int:
    """`d`'s streams that are not late (their engine keeps their slack), decoding at
    `since` (s from now; 0: now), or, with `until` after it, at any time between."""
    if not d.streams_at:
        return d.streams
    until = max(until, since)
    return sum(span[2] for span in d.streams_at
               if not is_late(span) and span[0] <= until and span[1] > since)


def seen_tpot(step: float, d: Node, out: int, hold: bool) -> float:
    """The TPOT a client sees of a remote-prefilled stream on `d` whose steps take `step`:
    a kept first token comes with the second (one gap fewer); an early one is followed by
    the handoff (the KV load), spread over the stream."""
    return step * (out - 2) / (out - 1) if hold else step + d.transfer_s / max(1, out - 1)


def alone_step(coef: Coef, slo: SLO) -> float:
    tok = alone(coef, slo.tpot_s, slo.safety)[1]
    return coef.step_time(tok, chunk_attn(tok, 0))


def remote(p: Node, d: Node, tokens: int, out: int, slo: SLO) -> Option:
    """The first token comes from P as soon as it is computed, and the handoff (the KV
    load, D's first step) falls between it and the second: in the client's TPOT. Or the
    frontend keeps it until D's first token (`hold`): the handoff falls in TTFT and the
    first two tokens arrive together (what vLLM's and SGLang's P/D always do: their decode
    engine emits every token). Kept where the early option may miss an SLO (with the
    handoff at its recent 90th percentile: a stream that lands during a long step waits
    for it; or with its TPOT as far over the prediction as one in ten recent streams on
    `d` ran) and the kept one is predicted to meet both: where TPOT is met with room, a
    later first token would buy headroom no request needs."""
    t, chunk = prefill_on(p, tokens, slo)
    ttft = p.backlog_s + t + p.first_over_s
    # the stream's own steps, from its handoff on; the handoff spreads on it
    step = tpot_on(d, tokens, out, slo, start_s=p.backlog_s + t + d.transfer_s)
    per = max(1, out - 1)
    tpot = seen_tpot(step, d, out, hold=False)
    opt = Option("remote", p.worker_id, d.worker_id, ttft, tpot, t, chunk,
                 score(ttft, tpot, slo), min(p.cached, tokens), first_over_s=p.first_over_s)
    if out < 2 or slo.first_token == "early":
        return opt
    # kept: scored as if its first gap were a decode step; the client sees the first two
    # tokens together, so its TPOT is a little less (what is predicted): a bonus, not a
    # reason
    h_ttft = ttft + max(d.transfer_s, d.transfer_mid_s) + step
    with_stream = replace(opt, ttft_s=h_ttft, tpot_s=seen_tpot(step, d, out, hold=True),
                          score=score(h_ttft, step, slo), hold=True, ready_s=ttft)
    if slo.first_token == "with_stream":
        return with_stream
    tail = d.transfer_tail_s
    if tail is None:
        # not learned yet (TAIL_MIN handoffs): a stream that lands while the decode engine
        # runs a step waits for it, so the tail is a step past the fit
        tail = d.transfer_s + step if d.transfer_s > 0 else 0.0
    tail = max(d.transfer_s, tail)
    # the early option's TPOT at its recent 90th percentile: the handoff's tail spread on
    # the stream, or the prediction run over by as much as the model's recent misses here
    # (the misses of recent streams are mostly their handoffs, which keeping takes out of
    # TPOT: applying them to the kept stream's steps too kept almost nothing, and lost 20
    # of 144 requests within SLOs against keeping every first token, docs/benchmarks.md)
    u = d.tpot_under
    risk = max(step + tail / per if tail > 0 else 0.0, tpot * (1.0 + u) if u > 0 else 0.0)
    if (risk > 0 and score(ttft, risk, slo) < MARGIN
            and with_stream.score >= MARGIN and with_stream.score > opt.score):
        return with_stream
    return opt


def local(d: Node, tokens: int, out: int, slo: SLO) -> Option:
    t, chunk = prefill_on(d, tokens, slo, local=True)
    engine = d.backlog_s + t
    if engine >= d.local_slow_from_s:
        engine *= d.local_slow
    ttft = engine + d.local_first_over_s
    tpot = tpot_on(d, tokens, out, slo, start_s=engine)
    s = score(ttft, tpot, slo)
    # what one of its steps costs the streams decoding there when it starts (after the
    # prompts booked before it; late streams have no slack to take), and, for a prompt
    # that misses its TTFT SLO anyway, the streams landing while it computes too (each
    # waits for the step in progress): a late request yields to streams that can still
    # make their SLOs. A step the streams cannot afford at all scores -1, however small
    # their allowance (a step of 50 ms against one of 1 us scored -50,000: the same)
    start = d.backlog_s
    running = kept(d, start + t if ttft > slo.ttft_s else start, since=start)
    if running > 0 and chunk:
        step = d.coef.step_time(chunk, chunk_attn(chunk, tokens // 2), d.streams, d.ctx)
        allow = allowance(d, slo)
        s = min(s, max(-1.0, 1.0 - slo.safety * step / allow) if allow > 0 else -1.0)
    return Option("local", d.worker_id, d.worker_id, ttft, tpot, t, chunk, s,
                  min(d.cached, tokens), first_over_s=d.local_first_over_s)


def options(prefills: list[Node], decodes: list[Node], tokens: int, max_tokens: int,
            slo: SLO, local_ok: set[str], pairs_ok=lambda p, d: True,
            held_s: float = 0.0, spare: tuple = (), balance: bool = False) -> list[Option]:
    """Every remote (P, D) pair that `pairs_ok` allows and every local option on the
    decode-capable workers in `local_ok`, and, when none of them is predicted to meet both
    SLOs, the overflow options on the prefill workers in `spare` that are; best first.
    `balance`: an overflow option that scores BALANCE over the best option that meets both
    comes first too (a decode engine's streams have little TPOT headroom left, a prefill
    worker's engine much more: spread them, as two replicas do).
    `held_s`: how long the request has waited already (late binding), for `as_late`."""
    out = max_tokens or DEFAULT_OUTPUT
    opts = [remote(p, d, tokens, out, slo) for p in prefills for d in decodes
            if p.worker_id != d.worker_id and pairs_ok(p.worker_id, d.worker_id)]
    opts += [local(d, tokens, out, slo) for d in decodes if d.worker_id in local_ok]
    if slo.late:
        by_id = {d.worker_id: d for d in decodes}
        opts = [as_late(o, by_id[o.decode], tokens, out, slo, held_s) for o in opts]
    opts = [released(o, out, slo, held_s) for o in opts]
    meeting = [o.score for o in opts if met(o, slo, held_s)] if spare else []
    if spare and not meeting:
        opts += overflow_options(spare, tokens, out, slo, held_s)
    elif spare and balance:
        bar = max(meeting) + BALANCE
        ahead = [o for o in overflow_options(spare, tokens, out, slo, held_s) if o.score >= bar]
        if ahead:
            return ranked(ahead, slo, held_s) + ranked(opts, slo, held_s)
    return ranked(opts, slo, held_s)


def released(o: Option, out: int, slo: SLO, held_s: float = 0.0) -> Option:
    """A kept first token as the client sees it: with its stream's first token, or at the
    frontend's release (`release_after` the SLO, from arrival) if that is sooner, or when
    computed if that is later (frontend/client.py `_kept_first`); sent before its stream,
    the rest of the handoff is in TPOT (docs/design.md, "The first token")."""
    if not o.hold:
        return o
    seen = max(o.first_s, min(o.ttft_s, release_after(slo.ttft_s) - held_s))
    if seen >= o.ttft_s:
        return o
    tpot = o.tpot_s + (o.ttft_s - seen) / max(1, out - 1)
    # a late one's score stays the one with its slack kept (`as_late`)
    s = o.score if computed_late(o, slo, held_s) else score(seen, tpot, slo)
    return replace(o, ttft_s=seen, tpot_s=tpot, score=s)


def overflow_options(spare, tokens: int, out: int, slo: SLO, held_s: float) -> list[Option]:
    """The whole request on a prefill worker (computed and decoded there), on each of
    `spare` where that is predicted to meet both SLOs with MARGIN (after `held_s` held).
    The caller offers them only when nothing else is: a prefill worker's stream holds its
    later prompts to that stream's TPOT for as long as it decodes, a cost the chooser
    cannot price when it decides (those prompts have not arrived), so it is paid only for
    a request that would otherwise be predicted lost."""
    found = []
    for s in spare:
        o = replace(local(s, tokens, out, slo), kind="overflow")
        if slo.late:
            o = as_late(o, s, tokens, out, slo, held_s)
        if met(o, slo, held_s):     # its first token is its TTFT: within the SLO too
            found.append(o)
    return found


def as_late(o: Option, d: Node, tokens: int, out: int, slo: SLO, held_s: float) -> Option:
    """`o` as predicted for a request whose first token is computed after its TTFT SLO
    (it has waited `held_s` already): its engine keeps no TPOT slack for it, so its TPOT
    is the steps beside it as they come (`tpot_on(late=True)`). Its score stays the one
    with its slack kept: a late request counts for no goodput, and its TPOT does not
    decide where it goes; the prediction says what it will see."""
    if not computed_late(o, slo, held_s):
        return o
    step = tpot_on(d, tokens, out, slo, late=True, start_s=o.first_s)
    tpot = step if o.kind != "remote" else seen_tpot(step, d, out, o.hold)
    return replace(o, tpot_s=max(o.tpot_s, tpot))
