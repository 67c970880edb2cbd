"""Worker registry and bookings. Pure: no I/O, time passed in.

Selection (scheduler/placement.py, `place`) never mutates anything. `Registry.book()` is
the one place that
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
from dataclasses import dataclass, field

from pdserve.step_budget import OVERHEAD, packing_floor
from scheduler import adaptive as A
from scheduler.holding import join
from scheduler.policy import Decision
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
    # predicted seconds of the prompts it computed for itself (local, overflow) since its
    # last heartbeat: the slack they took, not yet in its reported allowance (`allow_s`)
    spent_s: float = 0.0

    def allow_s(self) -> float:
        """The step time its streams afford now (inf: none running): the allowance its
        engine last reported, less the prompts it computed for itself since
        (`_release_prefill`). A heartbeat is a second old at worst, and a prompt step can
        spend that slack in one step: counting it, the chooser does not predict a prompt
        in one step beside streams whose slack the one before it took. Their steps'
        decode part is counted too, so this errs low."""
        if self.load.step_allow_ms <= 0:
            return math.inf
        return self.load.step_allow_ms / 1e3 - self.spent_s

    def can(self, kind: str) -> bool:
        return kind in kinds(self.role, self.pending_role)

    def streams(self) -> int:
        """Decode sequences running here or booked to start here."""
        return max(self.step_decode_seqs, self.booked_streams)

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
        w.load, w.last_seen, w.spent_s = load, now, 0.0
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
        if coef is None or w.streams():
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
            if w is not None:
                w.spent_s += b.prefill_s
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
