"""gRPC shell around the registry, the prefix index and the placement policy.

Everything that decides lives in scheduler/state.py, scheduler/placement.py,
scheduler/policy.py and scheduler/index.py (pure), and the message translations in
scheduler/messages.py; this module only answers calls, keeps time and exports metrics.
scheduler/server.py starts it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import replace

import grpc

from scheduler import metrics as SM
from pdserve import auth, kvhash
from pdserve import metrics as M
from pdserve.config import (late_prefill_remote, late_streams_yield, step_switches,
                            whole_alone)
from scheduler.config import SchedulerConfig
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from scheduler.ranking import SLO
from scheduler.admission import retry_after_s
from scheduler.holding import POLL_S, Gate, hold_for
from scheduler.index import PrefixIndex
from scheduler.feedback import forget_worker, learn_from_report
from scheduler.models import RECENT_S, LatencyBook
from scheduler import messages as MSG
from scheduler.messages import MODE_PB, ROLE, ROLE_PB
from scheduler.planner import SlidingWindow
from scheduler.roles import RolePlanner, Signals
from scheduler.placement import long_local_from_s, place
from scheduler.state import NoPlacement, Registry, Worker

log = logging.getLogger(__name__)

class SchedulerServicer(pd_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: SchedulerConfig, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.stopping = False          # the server is stopping (end_streams)
        self._streams: set[asyncio.Task] = set()     # KVEvents calls open
        self.creds = auth.from_env(auth.ADMIN)     # checks callers, signs push tickets
        self.reg = Registry(cfg.heartbeat_timeout_s, cfg.booking_ttl_s)
        self.index = PrefixIndex()
        self.rng = random.Random(cfg.seed)
        self.decisions: dict[str, int] = {}
        self.autoscaler = None           # set by serve() when autoscaling is on
        mixed, least, keep = step_switches()
        self.book = LatencyBook(mixed=mixed, keep=keep)
        pl = cfg.autoscale.planner
        self.slo = SLO(pl.prefill.target_ms / 1e3, pl.decode.target_ms / 1e3, least=least,
                       first_token=cfg.placement.first_token, late=late_streams_yield(),
                       late_remote=late_prefill_remote(), whole_alone=whole_alone())
        self.roles = RolePlanner(cfg.roles) if cfg.role_planning else None
        self.gate = Gate()               # requests held for late binding
        self.prefill_lat = SlidingWindow(RECENT_S)   # route to prompt computed (s)
        SM.SCHED_LOCAL_PREFILL_MAX.set(cfg.placement.local_prefill_max_tokens)

    def _gauges(self) -> None:
        for role in ("prefill", "decode", "mixed"):
            SM.WORKERS.labels(role).set(sum(w.role == role for w in self.reg.workers.values()))
        SM.SCHED_ROLE_PENDING.set(sum(bool(w.pending_role) for w in self.reg.workers.values()))
        SM.SCHED_BOOKINGS.set(len(self.reg.bookings))
        st = self.index.stats()
        SM.SCHED_INDEX_BLOCKS.set(st.blocks)

    def _forget(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self.book.forget(worker_id)
        forget_worker(worker_id)

    # ------------------------------------------------------------ membership
    async def Register(self, request, context):
        role = ROLE.get(request.role)
        if role is None or not request.worker_id or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "register needs worker_id, address and a role")
        w = Worker(
            worker_id=request.worker_id, role=role, address=request.address,
            agent_address=request.agent_address, model=request.layout.model,
            compat_hash=request.layout.compat_hash, last_seen=self.clock(),
            load=MSG.load(request.load), metrics_address=request.metrics_address,
            block_size=request.layout.block_size,
            kv_bytes_per_token=(request.layout.block_bytes * request.layout.num_layers
                                // max(1, request.layout.block_size)),
            role_since=self.clock())
        why = self.reg.hijack(w, self.clock())
        if why:
            log.warning("refused a registration from %s: %s", context.peer(), why)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, why)
        self.reg.register(w)
        self.gate.notify()
        log.info("registered %s worker %s at %s (model %s, kv %s)", role, request.worker_id,
                 request.address, request.layout.model, request.layout.compat_hash)
        self._gauges()
        return pd_pb2.RegisterResponse(heartbeat_interval_s=self.cfg.heartbeat_interval_s,
                                       heartbeat_timeout_s=self.cfg.heartbeat_timeout_s)

    async def Heartbeat(self, request, context):
        now = self.clock()
        w = self.reg.heartbeat(request.worker_id, MSG.load(request.load), now)
        if w is None:
            return pd_pb2.HeartbeatResponse(known=False)
        if request.steps:
            last = request.steps[-1]
            w.step_decode_seqs, w.step_decode_ctx = last.decode_seqs, last.decode_ctx
            self.book.observe_steps(w.worker_id, w.model, MSG.samples(request.steps), now)
            SM.SCHED_MODEL_SAMPLES.inc(len(request.steps))
        else:       # no step since the last heartbeat: nothing decodes there
            w.step_decode_seqs, w.step_decode_ctx = 0, 0
        self._settle(now)
        self.gate.notify()
        return pd_pb2.HeartbeatResponse(known=True, draining=w.draining, role=ROLE_PB[w.role])

    def _settle(self, now: float) -> None:
        for w in self.reg.settle_roles(now):
            log.info("worker %s drained: role is now %s", w.worker_id, w.role)
            SM.SCHED_ROLE_CHANGES.labels(w.role, "drained").inc()

    def change_role(self, worker_id: str, role: str, reason: str) -> Worker | None:
        old = self.reg.workers.get(worker_id)
        before = old.role if old else ""
        w = self.reg.set_role(worker_id, role, self.clock())
        if w is None:
            return None
        if w.role != before:
            log.info("worker %s: role %s -> %s (%s)", worker_id, before, w.role, reason)
            SM.SCHED_ROLE_CHANGES.labels(w.role, reason).inc()
        elif w.pending_role:
            log.info("worker %s: role %s -> %s once drained (%s)", worker_id, w.role,
                     w.pending_role, reason)
        self._gauges()
        self.gate.notify()
        return w

    async def SetRole(self, request, context):
        role = ROLE.get(request.role)
        if role is None or not request.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "set-role needs a worker_id and a role (prefill, decode, mixed)")
        w = self.change_role(request.worker_id, role, "admin")
        if w is None:
            return pd_pb2.SetRoleResponse(found=False)
        return pd_pb2.SetRoleResponse(found=True, role=ROLE_PB[w.role],
                                      pending_role=ROLE_PB.get(w.pending_role, 0))

    def signals(self, now: float) -> Signals:
        """The role planner's inputs (worst worker of each):
        - decode pressure: the plain decode step over the TPOT allowance. Plain
          (`Recent.plain_s`), not whole: an engine fills its streams' slack with prompt
          chunks up to the allowance, so whole steps near it say the budget works, not
          that decoding needs another worker (measured with whole steps, a mixed worker
          never went back to prefill while long prompts queued on it);
        - the same with one decode-capable worker fewer, its streams spread over the rest
          (what flipping a mixed worker back to prefill would leave; inf: none would be
          left), and what one more or one fewer would take off or add, from the fitted
          decode step (the measured pressure is the fit's own plain step);
        - prefill pressure: the prefill backlog, or the p90 of recent prefill latencies
          (routed, held included, to the prompt computed), over the TTFT SLO (a backlog
          drains between bursts; the latencies keep what it cost)."""
        ws = [w for w in self.reg.workers.values() if not w.draining]
        allow = self.slo.safety * self.slo.tpot_s
        dec = [(w, self.book.recent_of(w.worker_id, now)) for w in ws if w.can("decode")]
        dp = max((r.plain_s / allow for _, r in dec if r.stream_steps >= 16), default=0.0)
        after = gain = loss = math.inf
        # the spread is priced with the decode steps of workers that ran streams, the
        # decode role's first: a worker just made mixed has its prefill engine's fixed
        # part and no decode fit of its own yet (with the max over every decoder, its
        # flat fit made one decoder more or fewer look worth next to nothing)
        ran = [w for w, r in dec if r.stream_steps >= 16]
        ref = [w for w in ran if w.role == "decode"] or ran
        coefs = [c for c in (self.book.coef(w.worker_id, w.model) for w in ref) if c]
        seqs, ctx = sum(r.seqs for _, r in dec), sum(r.ctx for _, r in dec)
        if coefs or not seqs:               # no stream lately: nothing to spread

            def spread(n: int) -> float:     # the decode pressure with n decoders
                return max((c.decode_step(seqs / n, ctx / n) for c in coefs),
                           default=0.0) / allow
            n = len(dec)
            gain = spread(n) - spread(n + 1) if n else math.inf
            if n > 1:
                after = spread(n - 1)
                loss = after - spread(n)
        # requests held for late binding are prefill work too, shared by the workers that
        # could take it
        held = self.gate.held_prefill_s() / max(1, sum(w.can("prefill") for w in ws))
        pp = max(((self.reg.backlog(w, now) + held) / self.slo.ttft_s for w in ws),
                 default=0.0)
        lat = self.prefill_lat.percentile(now, 90)
        if lat is not None:
            pp = max(pp, lat / self.slo.ttft_s)
        return Signals(dp, pp, {w.worker_id: w.role for w in ws if not w.pending_role},
                       after, gain, loss)

    def plan_roles(self, now: float) -> None:
        if self.roles is None:
            return
        for f in self.roles.tick(now, self.signals(now)):
            log.info("role planner: %s -> %s: %s", f.worker_id, f.role, f.detail)
            self.change_role(f.worker_id, f.role, f.reason)

    async def Deregister(self, request, context):
        if self.reg.remove(request.worker_id):
            log.info("worker %s deregistered", request.worker_id)
        self._forget(request.worker_id)
        self.gate.notify()
        self._gauges()
        return pd_pb2.DeregisterResponse()

    async def Drain(self, request, context):
        w = self.reg.workers.get(request.worker_id)
        if w is None:
            return pd_pb2.DrainResponse(found=False)
        if w.draining != request.drain:
            log.info("worker %s %s", w.worker_id, "draining" if request.drain else "undrained")
        w.draining = request.drain
        return pd_pb2.DrainResponse(found=True, inflight=w.booked_requests)

    # ------------------------------------------------------------ KV events
    async def KVEvents(self, request_iterator, context):
        worker_id = ""
        n = 0
        me = asyncio.current_task()
        self._streams.add(me)
        try:
            async for batch in request_iterator:
                worker_id = batch.worker_id or worker_id
                if not worker_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "the first KV event batch must name its worker")
                if batch.snapshot:
                    self.index.replace(worker_id, batch.stored)
                    log.info("KV index: snapshot of %d blocks from %s", len(batch.stored),
                             worker_id)
                else:
                    if batch.cleared:
                        self.index.clear_worker(worker_id)
                    if batch.stored:
                        self.index.stored(worker_id, batch.stored)
                    if batch.removed:
                        self.index.removed(worker_id, batch.removed)
                SM.SCHED_INDEX_EVENTS.inc(len(batch.stored) + len(batch.removed))
                n += 1
        except asyncio.CancelledError:
            if not self.stopping:
                raise
        finally:
            self._streams.discard(me)
            if worker_id and worker_id not in self.reg.workers:
                self._forget(worker_id)      # never registered, or already gone
        return pd_pb2.KVEventsAck(batches=n)

    async def end_streams(self) -> None:
        """Before the server stops: end the workers' KV event streams, which stay open as
        long as their workers. Left to the server's stop they are cancelled from outside
        their handler, which gRPC logs as an unhandled error on every clean stop."""
        self.stopping = True
        for t in list(self._streams):
            t.cancel()
        if self._streams:
            await asyncio.wait(list(self._streams), timeout=1.0)

    # ------------------------------------------------------------ routing
    def _overlap(self, token_ids: list[int]):
        n = len(token_ids)
        by_bs: dict[int, list[int]] = {}

        def overlap_of(workers: list[Worker]) -> dict[str, int]:
            out: dict[str, int] = {}
            groups: dict[int, list[str]] = {}
            for w in workers:
                if w.block_size:
                    groups.setdefault(w.block_size, []).append(w.worker_id)
            for bs, ids in groups.items():
                if bs not in by_bs:
                    by_bs[bs] = kvhash.block_hashes(token_ids, bs,
                                                    max_blocks=kvhash.cacheable_blocks(n, bs))
                for wid, blocks in self.index.match(by_bs[bs], ids).items():
                    out[wid] = blocks * bs
            return out
        return overlap_of

    def _place(self, request, ids, held_s: float = 0.0, behind: tuple[int, float] = (0, 0.0)):
        """(decision, seconds the choice took); `held_s`: how long it has been held;
        `behind`: the requests held after it and their prefill seconds."""
        t0 = time.perf_counter()
        d = place(self.reg, self.cfg.placement, request.model, len(ids), self._overlap(ids),
                  frozenset(request.exclude_workers), self.rng, self.book, self.slo,
                  request.max_tokens, self.clock(), held_s, behind)
        return d, time.perf_counter() - t0

    async def _admit(self, d, context, ahead_s: float = 0.0) -> None:
        """Refuse (RESOURCE_EXHAUSTED, retry-after) what is forecast to start too late;
        `ahead_s`: the work of requests held before it (late binding)."""
        pred = d.pred_ttft_s + ahead_s if d.pred_ttft_s else 0.0
        wait = retry_after_s(pred, self.slo.ttft_s, self.cfg.placement.admit_ttft_factor,
                             own_s=d.prefill_s)
        if wait:
            SM.ROUTES.labels("overloaded").inc()
            M.REJECTED.labels("forecast_ttft").inc()
            context.set_trailing_metadata((("retry-after", f"{wait:.0f}"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"overloaded: the forecast TTFT is {pred:.1f}s, over "
                                f"{self.cfg.placement.admit_ttft_factor:g}x the "
                                f"{self.slo.ttft_s:.1f}s TTFT SLO")

    async def _held_place(self, request, ids, context):
        """Late binding (scheduler/holding.py): choose when the chosen worker is about to be
        free, oldest request first, except that one predicted to miss its TTFT SLO lets
        the rest go first (`--hold-order deadline`). Admission looks at the forecast on
        arrival, the requests held ahead of this one included. Returns (decision, seconds
        the last choice took, seconds held)."""
        gate, model = self.gate, request.model
        d, took = self._place(request, ids)
        n = sum(1 for w in self.reg.workers.values() if w.model == model and not w.draining
                and (w.can("prefill") or w.can("local")))     # who could take held work
        await self._admit(d, context, gate.work_ahead(model, d.prefill_s) / max(1, n))
        ticket, t_in, waited = gate.enter(model), self.clock(), False
        SM.SCHED_HELD.set(gate.held())
        left = context.time_remaining()
        max_hold = self.cfg.placement.hold_max_s
        if left is not None:
            max_hold = min(max_hold, left - 1.0)
        deadline = self.cfg.placement.hold_order == "deadline"
        try:
            while True:
                # a late request held max_hold leaves whether it is the head or not
                if not gate.head(model, ticket) and not (
                        gate.late(ticket) and self.clock() - t_in >= max_hold):
                    waited = True
                    await gate.wait(POLL_S)
                    continue
                held = self.clock() - t_in
                if waited:          # the picture changed while it waited
                    d, took = self._place(request, ids, held, gate.behind(model, ticket))
                if (deadline and d.pred_ttft_s and held + d.pred_ttft_s > self.slo.ttft_s
                        and gate.defer(model, ticket)):
                    SM.SCHED_DEFERRED.inc()
                    waited = True
                    continue
                w = self.reg.workers[d.prefill or d.decode]
                wait_s, joined = self._backlog(w, d)
                pause = hold_for(wait_s, d.prefill_s, held, max_hold) if d.prefill_s > 0 else 0.0
                if not pause:
                    if joined:
                        SM.SCHED_JOINED.inc()
                        d = replace(d, joined=True)
                    if gate.late(ticket):   # it stepped aside: say so in the route
                        d = replace(d, reason="deferred")
                    return d, took, held if waited else 0.0
                gate.prefill_s[ticket] = d.prefill_s
                waited = True
                await gate.wait(pause)
        finally:
            gate.leave(model, ticket)
            SM.SCHED_HELD.set(gate.held())

    def _backlog(self, w, d) -> tuple[float, bool]:
        """What a held request waits for before dispatch on the worker that would compute
        its prompt, and whether it joins: the whole backlog, or only the work in progress
        when it joins the prompts queued behind it (Registry.join_backlog)."""
        now = self.clock()
        j = None
        if d.prefill is not None:
            j = self.reg.join_backlog(w, now, self.book.coef(w.worker_id, w.model),
                                      d.prefill_tokens, self.slo.ttft_s)
        return (self.reg.backlog(w, now), False) if j is None else (j[0], True)

    async def Route(self, request, context):
        ids = list(request.token_ids)
        held = 0.0
        try:
            # a retry of an admitted request (a worker failed) does not queue again
            if self.cfg.placement.hold_max_s > 0 and not request.exclude_workers:
                d, took, held = await self._held_place(request, ids, context)
            else:
                d, took = self._place(request, ids)
                await self._admit(d, context)
        except NoPlacement as e:
            SM.ROUTES.labels("no_workers").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        t0 = time.perf_counter()
        if held:
            SM.SCHED_HELD_SECONDS.observe(held)
            d = replace(d, pred_ttft_s=d.pred_ttft_s + held if d.pred_ttft_s else 0.0)
        b = self.reg.book(d, self.clock())
        b.held_s = held
        prefiller = self.reg.workers[d.prefill or d.decode]
        self.index.hit_blocks += d.cached_tokens // max(1, prefiller.block_size)
        key = f"{d.mode}:{d.reason}"
        self.decisions[key] = self.decisions.get(key, 0) + 1
        SM.SCHED_DECISIONS.labels(d.mode, d.reason).inc()
        SM.SCHED_PROMPT_TOKENS.inc(len(ids))
        SM.SCHED_CACHED_TOKENS.inc(d.cached_tokens)
        SM.ROUTES.labels("ok").inc()
        SM.ROUTE_SECONDS.observe(took + time.perf_counter() - t0)
        if self.autoscaler is not None:
            self.autoscaler.observe_route(self.clock(), d.mode, len(ids))
        resp = pd_pb2.RouteResponse(
            decode=self._ref(d.decode), booking_id=b.booking_id, mode=MODE_PB[d.mode],
            reason=d.reason, cached_tokens=d.cached_tokens,
            predicted_ttft_ms=d.pred_ttft_s * 1e3, predicted_tpot_ms=d.pred_tpot_s * 1e3,
            runner_up=d.runner_up, chunk_tokens=d.chunk_tokens, held_ms=held * 1e3,
            hold_first_token=d.hold_first, joined=d.joined)
        if d.pred_ttft_s:
            SM.SCHED_PREDICTED.labels("ttft").observe(d.pred_ttft_s)
            SM.SCHED_PREDICTED.labels("tpot").observe(d.pred_tpot_s)
        if d.prefill is not None:
            resp.prefill.CopyFrom(self._ref(d.prefill))
            resp.push_ticket = auth.push_ticket(self.creds, request.request_id,
                                                resp.prefill.agent_address)
        return resp

    def _ref(self, wid: str) -> pd_pb2.WorkerRef:
        return MSG.worker_ref(self.reg.workers[wid])

    async def Report(self, request, context):
        now = self.clock()
        b = self.reg.bookings.get(request.booking_id)
        if b is not None:
            learn_from_report(self.book, b, request, self.reg.workers.get(b.decode),
                              long_local_from_s(self.slo))
            if request.phase == pd_pb2.PHASE_PREFILL_DONE and not b.prefill_done:
                # booked (or held) until computed: the prefill side's latency, without
                # what a kept first token waits for on the decode side
                self.prefill_lat.add(now, now - b.created + b.held_s)
        if request.phase == pd_pb2.PHASE_PREFILL_DONE:
            known = self.reg.prefill_done(request.booking_id, now)
        elif request.phase in (pd_pb2.PHASE_DONE, pd_pb2.PHASE_FAILED):
            known = self.reg.finish(request.booking_id, now) is not None
            if request.phase == pd_pb2.PHASE_FAILED:
                SM.SCHED_FAILED_REQUESTS.inc()
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "report needs a phase")
        # a report for no booking of ours feeds nothing (no fake latencies for the planner)
        if b is not None and self.autoscaler is not None and (request.ttft_ms > 0 or
                                                              request.tpot_ms > 0):
            self.autoscaler.observe_report(self.clock(), request.ttft_ms, request.tpot_ms,
                                           request.output_tokens, local=b.prefill is None)
        SM.SCHED_BOOKINGS.set(len(self.reg.bookings))
        self._settle(now)
        self.gate.notify()
        return pd_pb2.ReportResponse(known=known)

    # ------------------------------------------------------------ introspection
    async def ListWorkers(self, request, context):
        now = self.clock()
        out = []
        for w in self.reg.workers.values():
            out.append(pd_pb2.WorkerInfo(
                worker_id=w.worker_id, role=ROLE_PB[w.role], address=w.address,
                agent_address=w.agent_address,
                layout=pd_pb2.KVLayout(model=w.model, compat_hash=w.compat_hash,
                                       block_size=w.block_size),
                load=MSG.load_pb(w.load), last_heartbeat_age_s=now - w.last_seen,
                inflight=w.booked_requests, metrics_address=w.metrics_address,
                draining=w.draining, blocks_indexed=self.index.held_by(w.worker_id),
                booked_prefill_tokens=w.booked_prefill_tokens,
                pending_role=ROLE_PB.get(w.pending_role, 0), role_age_s=now - w.role_since,
                role_changes=w.role_changes, step_coef=self._coef(w),
                step_samples=self.book.samples(w.worker_id)))
        return pd_pb2.ListWorkersResponse(workers=out)

    def _coef(self, w: Worker) -> list[float]:
        c = self.book.coef(w.worker_id, w.model)
        return c.as_list() if c is not None else []

    async def IndexStats(self, request, context):
        st = self.index.stats()
        return pd_pb2.IndexStatsResponse(
            blocks=st.blocks, entries=st.entries, events=st.events, lookups=st.lookups,
            lookup_blocks=st.lookup_blocks, hit_blocks=st.hit_blocks,
            blocks_by_worker={w: self.index.held_by(w) for w in self.index.workers()},
            decisions=self.decisions)

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s / 2)
            now = self.clock()
            for w in self.reg.expire(now):
                SM.WORKERS_EXPIRED.inc()
                self._forget(w.worker_id)
                log.warning("dropped %s worker %s: no heartbeat for %.1fs", w.role, w.worker_id,
                            self.cfg.heartbeat_timeout_s)
            for b in self.reg.expire_bookings(now):
                log.warning("booking %s expired without a report (frontend gone?)",
                            b.booking_id)
            self._settle(now)
            self.plan_roles(now)
            self._gauges()
