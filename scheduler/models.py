"""The scheduler's latency models: one step model per worker, fitted from the engine steps
its heartbeats carry, a pooled one per model (a new worker borrows from its pool-mates
until its own steps say enough), and a KV handoff model per decode worker, fitted from
the frontend's reports (`handoff_s`). Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.latency import KEEP, Coef, StepModel, StepSample, TransferModel
from scheduler.planner import nearest_rank

RECENT = 256                 # steps kept per worker for the recent-interference figures
RECENT_S = 30.0              # ...and only those that arrived this recently count
# a worker's own fit counts from this many steps on; before, its pool's (its first steps
# are its warm-up's, slower than it will be: measured, an autoscaled replica that kept its
# own warm-up fit looked slower than its busy peer and was never sent a request)
OWN_MIN_STEPS = 32


MIN_HANDOFF_S = 1e-3         # a handoff sample is at least this (the fit weighs 1/t^2)
# a first gap longer than this many of the request's other gaps is not a handoff but a
# wait for a decode slot (max_num_seqs), which a local prefill would wait for too, as TTFT,
# or a stall (a local prefill's step in progress on that engine, which the TPOT forecast
# adds by itself). A handoff is about three steps (the step in progress, the one during
# which the KV loads, the one that computes the last prompt token): measured 2-3.5 steps on
# an AVX512 host (40-70 ms beside 20 ms steps) and about 3 on an AVX2 one (450-520 ms
# beside 150-190 ms). At 10 a 1,138 ms stall (6 steps) entered the fit there and put the
# remote option's forecast TPOT over the SLO for the rest of a run.
MAX_HANDOFF_STEPS = 5
# the handoff's tail: how far recent handoffs ran over the fit (a stream that lands during
# a long step waits for it), from this many of them, once there are TAIL_MIN
TAIL = 64
TAIL_MIN = 8


def handoff_s(first_gap_ms: float, tpot_ms: float, output_tokens: int,
              stalls: bool = False) -> float | None:
    """What a remote prefill's handoff added to the client's TPOT sum, from what the
    client saw: its first gap (first token to second: the KV load, then the decode
    engine's first step) less the mean of its other gaps, unless it is more than
    MAX_HANDOFF_STEPS of them (then the transfer record's READ time stands in). The KV
    READ alone (the first version's sample) left out the gRPC hop, the lease and the wait
    for the decode engine's step in progress: measured on a fast host, 8-token streams
    predicted at 23 ms TPOT took 29-33. None: not measurable (a local prefill, fewer than
    3 tokens, or a first gap that is a wait, unless `stalls`: the tail wants those)."""
    n = output_tokens
    if first_gap_ms <= 0 or tpot_ms <= 0 or n < 3:
        return None
    rest_ms = (tpot_ms * (n - 1) - first_gap_ms) / (n - 2)
    if not stalls and first_gap_ms > MAX_HANDOFF_STEPS * max(rest_ms, 1e-3):
        return None     # a queue for a decode slot, or a stall: the KV READ's record says
    return max(MIN_HANDOFF_S, (first_gap_ms - max(0.0, rest_ms)) / 1e3)


@dataclass(frozen=True)
class Recent:
    """What a worker's streams saw over its last steps."""
    stream_steps: int = 0          # steps with at least one decode sequence
    prefill_frac: float = 0.0      # of those, the share that also computed prompt tokens
    mean_step_s: float = 0.0       # mean step time of those
    excess_s: float = 0.0          # their mean time beyond the fit's plain decode step
                                   # (prompt chunks beside them, a busy memory bus)
    seqs: float = 0.0              # their mean decode sequences
    ctx: float = 0.0               # ...and those sequences' mean context tokens
    # excess_s over the steps held to some stream's slack (not beside late streams only,
    # StepSample.late_only): what a stream with an SLO sees beside prompt chunks
    held_excess_s: float = 0.0

    @property
    def plain_s(self) -> float:
        """Their mean plain decode step (the fit's, for their batch and context): what the
        streams alone cost, prompt chunks beside them left out."""
        return self.mean_step_s - self.excess_s


def load_bucket(streams: int) -> int:
    """Streams on a decode engine in doubling buckets (0, 1, 2-3, 4-7, ...): a handoff
    waits longer where more streams run (the step in progress is longer, and more often
    a prompt chunk rides in it). Doubling, so the buckets mean the same on a CPU with a
    few streams and a GPU with hundreds."""
    return max(0, int(streams)).bit_length()


def _push(tails: dict, key, value: float) -> None:
    tails.setdefault(key, deque(maxlen=TAIL)).append(value)


def _tail(tails: dict, key, pct: float) -> float | None:
    """The `pct`th percentile of `key`'s recent values, at least 0; None until TAIL_MIN."""
    v = tails.get(key, ())
    return max(0.0, nearest_rank(v, pct)) if len(v) >= TAIL_MIN else None


class LatencyBook:
    def __init__(self, half_life: float = 500.0, mixed: bool = True, keep: float = KEEP) -> None:
        self.half_life = half_life
        self.keep = keep              # StepModel's half-lives a kind of step fades for
        self.mixed = mixed            # StepModel's mixed-step term (False: five terms)
        self.workers: dict[str, StepModel] = {}
        self.pools: dict[str, StepModel] = {}
        self.pool_of: dict[str, str] = {}
        self.recent: dict[str, deque] = {}
        self.transfers: dict[str, TransferModel] = {}
        self.pooled_transfer = TransferModel()
        self.overs: dict[str, deque] = {}      # decode worker -> handoff seconds over the fit
        self.overs_at: dict[tuple[str, int], deque] = {}   # ...by (worker, load_bucket)
        self.firsts: dict[tuple[str, str], deque] = {}  # (worker, kind) -> first token's
                                                        # time beyond the engine model
        self.unders: dict[str, deque] = {}     # decode worker -> TPOT measured / predicted - 1
        # worker -> (predicted, measured) seconds until a local prefill's first token was
        # computed there, its fixed part and its hold left out
        self.locals: dict[str, deque] = {}

    def observe_steps(self, worker_id: str, pool: str, samples: list[StepSample],
                      now: float = 0.0) -> None:
        """`now`: when they arrived (the recent figures forget old steps)."""
        m = self.workers.setdefault(worker_id, StepModel(self.half_life, self.mixed, self.keep))
        p = self.pools.setdefault(pool, StepModel(self.half_life, self.mixed, self.keep))
        self.pool_of[worker_id] = pool
        r = self.recent.setdefault(worker_id, deque(maxlen=RECENT))
        for s in samples:
            m.observe(s)
            p.observe(s)
        c = self.coef(worker_id, pool)
        for s in samples:
            if s.decode_seqs:
                plain = c.decode_step(s.decode_seqs, s.decode_ctx) if c is not None else s.seconds
                r.append((now, s.seconds, s.prefill_tokens > 0, s.seconds - plain,
                          s.decode_seqs, s.decode_ctx, s.late_only))

    def observe_transfer(self, decode_worker: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.transfers.setdefault(decode_worker, TransferModel()).observe(nbytes, seconds)
            self.pooled_transfer.observe(nbytes, seconds)

    def observe_handoff(self, decode_worker: str, nbytes: int, seconds: float,
                        streams: int | None = None) -> None:
        """A handoff the client waited for, stalls included: how far it ran over the fit;
        `streams`: how many the decode engine ran when the request was placed."""
        if nbytes > 0 and seconds > 0:
            over = seconds - self.transfer_s(decode_worker, nbytes)
            _push(self.overs, decode_worker, over)
            if streams is not None:
                _push(self.overs_at, (decode_worker, load_bucket(streams)), over)

    def handoff_over_s(self, decode_worker: str, pct: float = 90,
                       streams: int | None = None) -> float | None:
        """How far recent handoffs into `decode_worker` ran over the fit at their `pct`th
        percentile (`observe_handoff`, the stalls the fit leaves out included): the fit
        plus this is a handoff at that percentile. With `streams`, those placed while it
        ran about as many streams (`load_bucket`), once there are TAIL_MIN of them: a
        trace of three matrix mixes on a 2-core host measured median handoffs of 70, 82,
        103 and 168 ms at 0, 1, 2 and 3 streams. None until TAIL_MIN of them."""
        if streams is not None:
            at = _tail(self.overs_at, (decode_worker, load_bucket(streams)), pct)
            if at is not None:
                return at
        return _tail(self.overs, decode_worker, pct)

    def observe_first(self, worker_id: str, kind: str, residual_s: float) -> None:
        """How much later than its engine steps predict a first token computed on
        `worker_id` reached the client: a remote prefill's (`kind` "remote") or a local
        one's ("local"), the handoff left out."""
        _push(self.firsts, (worker_id, kind), residual_s)

    def first_over_s(self, worker_id: str, kind: str) -> float:
        """The fixed part of a request's way to its first token that no engine step
        holds (the HTTP request, tokenizing, routing, the RPCs to the engine and back):
        the median of recent `observe_first` residuals, at least 0; 0 until TAIL_MIN."""
        return _tail(self.firsts, (worker_id, kind), 50) or 0.0

    def observe_tpot(self, decode_worker: str, predicted_s: float, measured_s: float) -> None:
        """A remote-prefilled stream's TPOT against its prediction."""
        if predicted_s > 0 and measured_s > 0:
            _push(self.unders, decode_worker, measured_s / predicted_s - 1.0)

    def tpot_under(self, decode_worker: str) -> float:
        """How far one in ten recent remote-prefilled streams on `decode_worker` ran over
        their predicted TPOT, as a share of it (0: none did, or fewer than TAIL_MIN)."""
        return _tail(self.unders, decode_worker, 90) or 0.0

    def observe_local(self, worker_id: str, predicted_s: float, measured_s: float) -> None:
        """A local prefill's first token on `worker_id`: the engine part of its TTFT (its
        wait there and its prompt steps) as predicted and as measured."""
        if predicted_s > 0 and measured_s > 0:
            _push(self.locals, worker_id, (predicted_s, measured_s))

    def local_slow(self, worker_id: str, from_s: float) -> float:
        """How many times their prediction recent local prefills on `worker_id` took, of
        those predicted at `from_s` or more: the median of measured / predicted, at least 1;
        1 until TAIL_MIN of them. A long local prompt computes beside streams, and the
        requests that arrive after it is placed land beside it too, which no timeline at
        placement holds (docs/design.md, "Local prompts run long")."""
        v = sorted(m / p for p, m in self.locals.get(worker_id, ()) if p >= from_s)
        return max(1.0, v[len(v) // 2]) if len(v) >= TAIL_MIN else 1.0

    def forget(self, worker_id: str) -> None:
        for d in (self.workers, self.recent, self.transfers, self.pool_of, self.overs,
                  self.unders, self.locals):
            d.pop(worker_id, None)
        for tails in (self.overs_at, self.firsts):
            for k in [k for k in tails if k[0] == worker_id]:
                del tails[k]

    def coef(self, worker_id: str, pool: str = "") -> Coef | None:
        """The worker's coefficients, each feature it has not seen yet from its pool's fit
        (all of them until it has OWN_MIN_STEPS steps); None when neither knows prefill and
        decode (no prediction then)."""
        pool = pool or self.pool_of.get(worker_id, "")
        mine, shared = self.workers.get(worker_id), self.pools.get(pool)
        if shared is None or not shared.warm():
            if mine is None or not mine.warm():
                return None
            return Coef.of(mine.coef())
        base = Coef.of(shared.coef())
        if mine is None or mine.samples < OWN_MIN_STEPS:
            return base
        known = [mine.fit.known(j) for j in range(mine.fit.n)]
        return Coef.of(mine.coef()).merged(base, known)

    def samples(self, worker_id: str) -> int:
        m = self.workers.get(worker_id)
        return m.samples if m is not None else 0

    def transfer_s(self, decode_worker: str, nbytes: int) -> float:
        m = self.transfers.get(decode_worker)
        if m is not None and m.fit.samples >= 2:
            return max(0.0, m.predict(nbytes))
        return max(0.0, self.pooled_transfer.predict(nbytes))

    def recent_of(self, worker_id: str, now: float = 0.0, window_s: float = RECENT_S) -> Recent:
        r = [x for x in self.recent.get(worker_id, ()) if now - x[0] <= window_s]
        if not r:
            return Recent()
        n = len(r)
        # a step beside late streams only was not held to any stream's slack: its excess
        # is not what a stream with an SLO sees
        held = [x[3] for x in r if not x[6]]
        return Recent(n, sum(1 for x in r if x[2]) / n, sum(x[1] for x in r) / n,
                      sum(x[3] for x in r) / n, sum(x[4] for x in r) / n,
                      sum(x[5] for x in r) / n, sum(held) / len(held) if held else 0.0)
