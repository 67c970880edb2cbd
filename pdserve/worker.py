"""What prefill and decode workers share: engine, gRPC server, registration, heartbeats."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time

import grpc

from pdserve import auth, loop_lag, metrics as M
from pdserve.config import WorkerConfig
from kv_transfer.agent import read_agent_address
from kv_transfer.transport import RANK as TRANSPORT_CLASSES
from pdserve.engine import LoadSnapshot, build_engine, event_endpoints, kv_extra
from pdserve.kv_events import EventMirror, EventRelay
from pdserve.procs import freeze_heap, pin_serving
from pdserve.steps import StepReceiver
from pdserve.rpc import RECONNECT_OPTIONS, pd_pb2, pd_pb2_grpc

log = logging.getLogger(__name__)

ROLE_PB = {"prefill": pd_pb2.ROLE_PREFILL, "decode": pd_pb2.ROLE_DECODE,
           "mixed": pd_pb2.ROLE_MIXED}
ROLE_OF = {v: k for k, v in ROLE_PB.items()}
# every engine produces and consumes KV: a role (scheduler/roles.py) can change at runtime
# without restarting it
KV_ROLE = "kv_both"


SCRATCH_PREFIX = "pdserve-agent-"
SCRATCH_LOCK = "owner.lock"
SCRATCH_MIN_AGE_S = 60.0


def hold_scratch_dir(path: str) -> int:
    """Take the scratch directory's owner lock for the life of this process (the fd stays
    open; the kernel drops the lock when the process dies, however it dies)."""
    import fcntl

    fd = os.open(os.path.join(path, SCRATCH_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def sweep_scratch_dirs(tmp: str | None = None, min_age_s: float = SCRATCH_MIN_AGE_S
                       ) -> list[str]:
    """Remove the scratch directories (agent address, event sockets, UCX log, vLLM's ZMQ
    sockets) of workers that died without cleaning up (kill -9, OOM). A directory goes when
    its owner lock can be taken (the owner is gone: an flock, so pid namespaces sharing
    /tmp cannot confuse it), or when it has no lock file (an older pdserve's), and in both
    cases only once it is `min_age_s` old (a worker that is creating its own is never
    caught between mkdir and lock). Returns the directories removed."""
    import fcntl
    import shutil

    tmp = tmp or tempfile.gettempdir()
    gone = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return gone
    now = time.time()
    for name in names:
        path = os.path.join(tmp, name)
        if not name.startswith(SCRATCH_PREFIX):
            continue
        try:
            if not os.path.isdir(path) or now - os.stat(path).st_mtime < min_age_s:
                continue
            fd = os.open(os.path.join(path, SCRATCH_LOCK), os.O_RDWR)
        except FileNotFoundError:
            fd = None                       # no lock file: an older pdserve's directory
        except OSError:
            continue                        # someone else's, or gone meanwhile
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                        # its owner lives
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            gone.append(path)
    if gone:
        log.info("removed %d scratch director%s of dead workers", len(gone),
                 "y" if len(gone) == 1 else "ies")
    return gone


class WorkerRuntime:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.role = cfg.role
        self.snapshot = LoadSnapshot()
        self.engine = None
        self.agent_address = ""
        self.address = ""
        self.layout: pd_pb2.KVLayout | None = None
        self.server: grpc.aio.Server | None = None
        self._agent: pd_pb2_grpc.KVAgentStub | None = None
        self._agent_channel: grpc.aio.Channel | None = None
        self._hb_task: asyncio.Task | None = None
        self._sched_channel: grpc.aio.Channel | None = None
        self.metrics_port = 0
        self.leases_held = 0
        self.prefill_tokens = 0           # prefill: prompt tokens of requests in progress
        self.draining = False
        self.inflight = 0                 # requests in progress in our gRPC servicer
        self.health = None                # grpc.health.v1 servicer, once serving
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tmp_lock = -1                # fd holding the scratch directory's owner lock
        self.relay: EventRelay | None = None
        self._events_task: asyncio.Task | None = None
        self._resync = asyncio.Event()
        self._kv_news = asyncio.Event()   # the relay has something, or a resync is due
        self.steps: StepReceiver | None = None
        # the cluster secret (from the environment, which the engine process inherits: its
        # KV agent checks callers and its connector calls peers with the same standing)
        self.creds = auth.from_env(auth.WORKER)
        self.handles_used = auth.OnceOnly()
        self.engine_dead = False
        self._stop: asyncio.Event | None = None

    async def start_engine(self) -> None:
        sweep_scratch_dirs()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
        self._tmp_lock = hold_scratch_dir(self._tmp.name)
        addr_file = os.path.join(self._tmp.name, "agent_address")
        # vLLM's ZMQ sockets between its processes (ipc://<base>/<uuid>) in the scratch
        # folder, which goes with the worker (or the next sweep), not in the system's
        # temporary folder, where a killed engine's stayed behind; unless the user chose
        # a base, or the path would pass a Unix socket's 107 bytes
        if "VLLM_RPC_BASE_PATH" not in os.environ and len(self._tmp.name) < 60:
            os.environ["VLLM_RPC_BASE_PATH"] = self._tmp.name
        # the engine core times its steps, holds prefill chunks to its streams' TPOT
        # allowance and sends each step here (pdserve/step_hook.py)
        self.steps = StepReceiver()
        os.environ.update(PDSERVE_STEP_HOOK="1", PDSERVE_STEP_SOCKET=self.steps.address,
                          PDSERVE_TPOT_SLO_MS=str(self.cfg.tpot_slo_ms),
                          PDSERVE_TTFT_SLO_MS=str(self.cfg.ttft_slo_ms))
        self.engine = build_engine(
            self.cfg.engine, KV_ROLE,
            kv_extra(self.cfg.worker_id, self.cfg.host, self.cfg.kv_agent_port, self.cfg.kv,
                     addr_file), self.snapshot, events_dir=self._tmp.name)
        self.relay = EventRelay(*event_endpoints(self._tmp.name), EventMirror())
        self.relay.on_change = self._kv_news_from_thread(asyncio.get_running_loop())
        self.relay.start()
        # the engine is initialised, so its connector has bound and published the address
        self.agent_address = read_agent_address(addr_file, timeout_s=30)
        self._agent_channel = auth.aio_channel(self.agent_address, self.creds)
        self._agent = pd_pb2_grpc.KVAgentStub(self._agent_channel)
        info = await self._agent.GetAgentInfo(pd_pb2.AgentInfoRequest(), timeout=30)
        self.layout = info.layout
        await self._warmup()

    async def _warmup(self) -> None:
        """Small requests before registering: vLLM's first logprobs request costs ~5 s
        (measured), which the first client would otherwise pay; and a longer prompt and a
        few decode steps, so the scheduler's latency model has this engine's prefill and
        decode speed from its first heartbeat (pdserve/latency.py)."""
        from vllm import SamplingParams

        t0 = now()
        n = max(8, min(512, self.cfg.engine.max_model_len // 4))
        calib = [(7 * j) % 97 + 10 for j in range(n)]
        for i, (ids, k, lp) in enumerate((([10, 11, 12, 13], 2, 2), (calib, 4, None))):
            sp = SamplingParams(max_tokens=k, temperature=0.0, logprobs=lp, ignore_eos=True)
            async for _ in self.engine.generate({"prompt_token_ids": ids}, sp,
                                                f"warmup-{i}-{self.cfg.worker_id}"):
                pass
        log.info("engine warm-up took %.2fs", now() - t0)

    @property
    def metrics_address(self) -> str:
        return f"{self.cfg.host}:{self.metrics_port}"

    async def start_server(self, add_servicer) -> int:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                                      interceptors=auth.server_interceptors(self.creds))
        add_servicer(self.server)
        # grpc.health.v1 for Kubernetes probes: SERVING once the engine is up and warm
        # (it is, by now); NOT_SERVING from the moment a drain starts
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if port == 0:
            raise RuntimeError(f"cannot bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        self.address = f"{self.cfg.host}:{port}"
        self.metrics_port = M.serve_metrics(self.cfg.metrics_port, self.cfg.host)
        self.steps.start(asyncio.get_running_loop())
        log.info("%s worker %s serving gRPC on %s, metrics on :%d, KV agent %s", self.role,
                 self.cfg.worker_id, self.address, self.metrics_port, self.agent_address)
        # a restarted scheduler must see us again within seconds
        self._sched_channel = auth.aio_channel(self.cfg.scheduler_address, self.creds,
                                               options=RECONNECT_OPTIONS)
        self._hb_task = asyncio.create_task(self._heartbeat_loop())
        self._events_task = asyncio.create_task(self._events_loop())
        return port

    async def agent_stats(self, pop: list[str] | None = None,
                          timeout: float = 5.0) -> pd_pb2.AgentStats:
        return await self._agent.Stats(pd_pb2.AgentStatsRequest(pop_transfer_ids=pop or []),
                                       timeout=timeout)

    async def load(self) -> pd_pb2.WorkerLoad:
        # never let a slow agent hold up the heartbeat: the last figures are good enough
        try:
            st = await self.agent_stats(timeout=max(0.2, self.cfg.heartbeat_s / 2))
            self.leases_held = self._held(st)
            M.KV_LEASES_EXPIRED.set(st.leases_expired_total)
            counts = dict.fromkeys(TRANSPORT_CLASSES, 0)
            for p in st.peers:
                counts[p.transport] = counts.get(p.transport, 0) + 1
            for t, n in counts.items():
                M.KV_TRANSPORT_PEERS.labels(self.role, t).set(n)
            M.KV_TRANSPORT_FALLBACK.labels(self.role).set(sum(p.fallback for p in st.peers))
        except grpc.RpcError:
            pass
        s = self.snapshot
        M.WORKER_RUNNING.labels(self.role).set(s.running)
        M.WORKER_WAITING.labels(self.role).set(s.waiting)
        M.WORKER_KV_USAGE.labels(self.role).set(s.kv_usage)
        M.KV_LEASES.labels(self.role).set(self.leases_held)
        allow, budget = self.steps.allowance() if self.steps else (0.0, 0)
        return pd_pb2.WorkerLoad(running=s.running, waiting=s.waiting, kv_usage=s.kv_usage,
                                 kv_leases_held=self.leases_held,
                                 prefill_tokens=self.prefill_tokens, ttft_ms=s.ttft_ms,
                                 tpot_ms=s.tpot_ms, num_blocks=s.num_blocks,
                                 max_num_seqs=s.max_num_seqs, step_allow_ms=allow * 1e3,
                                 step_budget_tokens=budget,
                                 max_num_batched_tokens=self.cfg.engine.max_num_batched_tokens)

    async def status(self) -> pd_pb2.WorkerStatusResponse:
        return pd_pb2.WorkerStatusResponse(
            worker_id=self.cfg.worker_id, role=ROLE_PB[self.role], load=await self.load(),
            agent_address=self.agent_address, layout=self.layout,
            metrics_address=self.metrics_address)

    async def _heartbeat_loop(self) -> None:
        stub = pd_pb2_grpc.SchedulerStub(self._sched_channel)
        registered = False
        interval = self.cfg.heartbeat_s
        while True:
            try:
                load = await self.load()
                if not registered:
                    resp = await stub.Register(pd_pb2.RegisterRequest(
                        worker_id=self.cfg.worker_id, role=ROLE_PB[self.role],
                        address=self.address, agent_address=self.agent_address,
                        layout=self.layout, load=load,
                        metrics_address=self.metrics_address), timeout=5)
                    interval = resp.heartbeat_interval_s or interval
                    registered = True
                    self._resync.set()   # the scheduler may have dropped our index entries
                    self._kv_news.set()
                    log.info("registered with scheduler %s", self.cfg.scheduler_address)
                else:
                    steps = self.steps.take() if self.steps else []
                    resp = await stub.Heartbeat(pd_pb2.HeartbeatRequest(
                        worker_id=self.cfg.worker_id, load=load, steps=steps), timeout=5)
                    if not resp.known:
                        log.warning("scheduler forgot us; registering again")
                        registered = False
                        continue
                    role = ROLE_OF.get(resp.role, self.role)
                    if role != self.role:   # drained (or only gaining work): take it on
                        log.info("role %s -> %s (scheduler); registering again", self.role,
                                 role)
                        self.role = role
                        registered = False
                        continue
                    if resp.draining != self.draining:
                        log.info("scheduler %s draining", "started" if resp.draining else "ended")
                        self.draining = resp.draining
            except grpc.RpcError as e:
                if registered:
                    log.warning("scheduler unreachable (%s); will register again", e.code())
                registered = False
            except asyncio.CancelledError:
                raise
            await asyncio.sleep(interval)

    def _kv_news_from_thread(self, loop: asyncio.AbstractEventLoop):
        """The relay thread's `on_change`: wake `_event_batches` in the loop."""
        def news() -> None:
            try:
                loop.call_soon_threadsafe(self._kv_news.set)
            except RuntimeError:    # the loop is closed: the worker is stopping
                pass
        return news

    async def _event_batches(self):
        """One stream's messages: a snapshot, then deltas (a fresh snapshot on resync).
        Between them it waits for the relay's news: polling every 20 ms woke an idle
        worker 50 times a second."""
        relay = self.relay
        wid = self.cfg.worker_id
        self._resync.clear()
        yield pd_pb2.KVEventBatch(worker_id=wid, snapshot=True, stored=relay.snapshot())
        while True:
            self._kv_news.clear()     # before taking: news after the take wakes the wait
            deltas, resync = relay.take()
            if resync or self._resync.is_set():
                self._resync.clear()
                yield pd_pb2.KVEventBatch(worker_id=wid, snapshot=True, stored=relay.snapshot())
                continue
            for d in deltas:
                yield pd_pb2.KVEventBatch(worker_id=wid, cleared=d.cleared, stored=d.stored,
                                          removed=d.removed)
            if not deltas:      # (the timeout only bounds a lost wake-up)
                try:
                    await asyncio.wait_for(self._kv_news.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    async def _events_loop(self) -> None:
        """Stream KV cache events to the scheduler's prefix index for as long as we live;
        reconnect (with a snapshot) whenever the stream breaks."""
        while True:
            try:
                await pd_pb2_grpc.SchedulerStub(self._sched_channel).KVEvents(
                    self._event_batches())
            except grpc.RpcError as e:
                log.debug("KV event stream ended (%s); reconnecting", e.code())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("KV event stream failed; reconnecting")
            await asyncio.sleep(1.0)

    async def run(self, add_servicer, ready: asyncio.Event | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Engine, then gRPC server and registration; serve until `stop` is set."""
        await self.start_engine()
        await self.start_server(add_servicer)
        pin_serving()       # off the decode engines' cores, now that start-up is over
        log.info("%d objects of the start-up heap frozen out of GC", freeze_heap())
        if ready:
            ready.set()
        self._stop = stop = stop or asyncio.Event()
        watch = asyncio.create_task(self._watch_engine())
        lag = loop_lag.export("worker")
        try:
            await stop.wait()
        finally:
            watch.cancel()
            lag.cancel()
            await self.stop()
        if self.engine_dead:
            raise EngineDied("the vLLM engine died")

    def engine_died(self) -> None:
        """The engine core is gone (killed, crashed): stop serving now. The worker then
        says NOT_SERVING, deregisters and exits non-zero; its supervisor (the launcher,
        systemd, Kubernetes) starts a new one."""
        if not self.engine_dead:
            log.error("the vLLM engine died; deregistering and exiting")
        self.engine_dead = True
        if self._stop is not None:
            self._stop.set()

    async def abort_engine_dead(self, context, role: str) -> None:
        """A request met the dead engine: stop the worker, and end the call UNAVAILABLE
        (the frontend places it again elsewhere if nothing was streamed yet)."""
        M.WORKER_REQUESTS.labels(role, "engine_dead").inc()
        self.engine_died()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker's engine died")

    async def abort_engine_failed(self, context, role: str, structured: bool) -> None:
        """vLLM ended a request with finish_reason "error" (FINISHED_ERROR; it freed the
        request's blocks). With structured output, its grammar rejected the model's token
        (a vocabulary that cannot spell the format: the tiny test model and
        `json_object`): the request, not the server, cannot be served, INVALID_ARGUMENT.
        vLLM's own server answers 500 (and in a stream, an error event)."""
        M.WORKER_REQUESTS.labels(role, "invalid" if structured else "error").inc()
        if structured:
            code, why = (grpc.StatusCode.INVALID_ARGUMENT, "the model cannot produce output "
                         "in the requested structured format (the grammar rejected its next "
                         "token)")
        else:
            code, why = grpc.StatusCode.INTERNAL, "the engine failed the request"
        await context.abort(code, why)

    async def _watch_engine(self, every_s: float = 0.5) -> None:
        while not self.engine.errored:    # vLLM's engine-core monitor sets this
            await asyncio.sleep(every_s)
        self.engine_died()

    def _held(self, st: pd_pb2.AgentStats) -> int:
        """KV this worker still holds for a peer or loads from one: its leases as a
        producer, its loads as a consumer (every engine is both)."""
        return st.leases_held + st.loads_pending

    async def _drain(self) -> None:
        """Wait (up to drain_timeout_s) until no request is in progress here and no KV
        blocks are held for, or loading from, a peer."""
        deadline = now() + self.cfg.drain_timeout_s
        while now() < deadline:
            held = 0
            try:
                held = self._held(await self.agent_stats(timeout=1.0))
            except grpc.RpcError:
                pass
            if self.inflight == 0 and held == 0:
                return
            await asyncio.sleep(0.2)
        log.warning("drain timed out after %.0fs with %d request(s) in progress",
                    self.cfg.drain_timeout_s, self.inflight)

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: deregister (nothing new is routed here), drain, then stop."""
        self.draining = True
        if self.health is not None:
            from grpc_health.v1 import health_pb2
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in (self._hb_task, self._events_task):
            if task is not None:
                task.cancel()
        if self.relay is not None:
            self.relay.stop()
        if self.steps is not None:
            self.steps.stop()
        if self._sched_channel is not None:
            try:
                await pd_pb2_grpc.SchedulerStub(self._sched_channel).Deregister(
                    pd_pb2.DeregisterRequest(worker_id=self.cfg.worker_id), timeout=2)
            except grpc.RpcError:
                pass
            await self._sched_channel.close()
        if self.engine is not None and self._agent is not None and not self.engine_dead:
            await self._drain()             # a dead engine holds nothing to wait for
        if self.server is not None:
            await self.server.stop(grace)
        if self._agent_channel is not None:
            await self._agent_channel.close()
        if self.engine is not None:
            self.engine.shutdown()
        if self._tmp is not None:
            os.close(self._tmp_lock)
            self._tmp.cleanup()


def _input_errors() -> tuple[type[BaseException], ...]:
    try:
        from vllm.exceptions import VLLMValidationError
        return (ValueError, VLLMValidationError)
    except ImportError:  # older vLLM raises ValueError
        return (ValueError,)


INPUT_ERRORS = _input_errors()


def _engine_dead_errors() -> tuple[type[BaseException], ...]:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
        return (EngineDeadError,)
    except ImportError:
        return ()


ENGINE_DEAD = _engine_dead_errors()
EXIT_ENGINE_DEAD = 3          # the worker's exit code when its engine died under it


class EngineDied(RuntimeError):
    pass


def validate_prompt(token_ids, max_model_len: int, max_tokens: int) -> str | None:
    if not token_ids:
        return "empty prompt"
    if max_tokens < 1:
        return "max_tokens must be at least 1"
    if len(token_ids) + max_tokens > max_model_len:
        return (f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context length {max_model_len}")
    return None


def now() -> float:
    return time.perf_counter()
