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
from dataclasses import dataclass, field

from scheduler.policy import (Candidate, DecodeCandidate, Decision, PlacementConfig,
                              choose_decode, choose_mode, choose_prefill)


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


@dataclass
class Worker:
    worker_id: str
    role: str                 # "prefill" | "decode"
    address: str
    agent_address: str
    model: str
    compat_hash: str
    last_seen: float
    load: Load = field(default_factory=Load)
    metrics_address: str = ""
    block_size: int = 0
    draining: bool = False
    # booked by this scheduler and not yet reported done
    booked_requests: int = 0
    booked_prefill_tokens: int = 0
    booked_blocks: int = 0

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
        self.workers[w.worker_id] = w

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
        return [w for w in self.workers.values()
                if w.role == role and (not model or w.model == model)
                and not (routable and w.draining)]

    # ------------------------------------------------------------ bookings
    def book(self, d: Decision, now: float) -> Booking:
        b = Booking(f"b{next(self._ids)}", d.prefill, d.decode, d.prefill_tokens, d.blocks, now,
                    prompt_tokens=d.prompt_tokens)
        self.route_seq += 1
        if b.prefill is not None:
            p = self.workers[b.prefill]
            p.booked_requests += 1
            p.booked_prefill_tokens += b.prefill_tokens
        dw = self.workers[b.decode]
        dw.booked_requests += 1
        dw.booked_blocks += b.blocks
        self.bookings[b.booking_id] = b
        return b

    def _release_prefill(self, b: Booking) -> None:
        done, b.prefill_done = b.prefill_done, True
        if done or b.prefill is None:
            return
        p = self.workers.get(b.prefill)
        if p is not None:
            p.booked_requests = max(0, p.booked_requests - 1)
            p.booked_prefill_tokens = max(0, p.booked_prefill_tokens - b.prefill_tokens)
            p.load.prefill_tokens = max(0, p.load.prefill_tokens - b.prompt_tokens)
            p.load.running = max(0, p.load.running - 1)

    def prefill_done(self, booking_id: str) -> bool:
        b = self.bookings.get(booking_id)
        if b is None:
            return False
        self._release_prefill(b)
        return True

    def finish(self, booking_id: str) -> Booking | None:
        """The request ended (done, failed or cancelled): release, or roll back, all of it."""
        b = self.bookings.pop(booking_id, None)
        if b is None:
            return None
        self._release_prefill(b)
        dw = self.workers.get(b.decode)
        if dw is not None:
            dw.booked_requests = max(0, dw.booked_requests - 1)
            dw.booked_blocks = max(0, dw.booked_blocks - b.blocks)
            dw.load.running = max(0, dw.load.running - 1)
        return b

    def expire_bookings(self, now: float) -> list[Booking]:
        old = [b for b in self.bookings.values() if now - b.created > self.booking_ttl]
        return [self.finish(b.booking_id) for b in old]


def place(reg: Registry, cfg: PlacementConfig, model: str, num_tokens: int,
          overlap_of, exclude: frozenset[str] = frozenset(), rng=None) -> Decision:
    """Choose the decode worker, the mode (disaggregated or local prefill) and the prefill
    worker. `overlap_of(workers) -> {worker_id: cached tokens}` looks up the prefix index.
    Mutates nothing."""
    decodes = [w for w in reg.live("decode", model, routable=True) if w.worker_id not in exclude]
    if not decodes:
        raise NoPlacement(f"no decode worker serves model {model!r}")
    prefills = [w for w in reg.live("prefill", model, routable=True)
                if w.worker_id not in exclude]
    compat = {w.compat_hash for w in decodes}
    prefills = [p for p in prefills if p.compat_hash in compat]

    cached = overlap_of(prefills + decodes)
    pcands = [Candidate(p.worker_id, cached.get(p.worker_id, 0), p.queued_prefill_tokens(),
                        p.running()) for p in prefills]
    prefill = choose_prefill(cfg, pcands, num_tokens, rng, reg.route_seq)
    if prefill is not None:   # decode must be able to read that prefill worker's blocks
        ph = reg.workers[prefill.worker_id].compat_hash
        decodes = [d for d in decodes if d.compat_hash == ph]
    dcands = [DecodeCandidate(d.worker_id, d.kv_usage(), d.running(),
                              d.load.max_num_seqs, d.load.tpot_ms,
                              cached.get(d.worker_id, 0)) for d in decodes]
    if not dcands:
        raise NoPlacement(f"no decode worker is KV-compatible with a prefill worker for {model!r}")
    decode = choose_decode(cfg, dcands, rng, reg.route_seq)
    block = reg.workers[decode.worker_id].block_size or 1
    try:
        return choose_mode(cfg, num_tokens, prefill, pcands, decode, block)
    except LookupError as e:
        raise NoPlacement(f"{e} for model {model!r}") from None
