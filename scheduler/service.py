"""gRPC shell around the registry: register, heartbeat, route, list workers."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve import metrics as M
from pdserve.config import SchedulerConfig
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from scheduler.state import Load, NoPlacement, Registry, Worker, book, select

log = logging.getLogger(__name__)

ROLE = {pd_pb2.ROLE_PREFILL: "prefill", pd_pb2.ROLE_DECODE: "decode"}
ROLE_PB = {v: k for k, v in ROLE.items()}


def _load(pb: pd_pb2.WorkerLoad) -> Load:
    return Load(pb.running, pb.waiting, pb.kv_usage, pb.kv_leases_held)


class SchedulerServicer(pd_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: SchedulerConfig, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.reg = Registry(cfg.heartbeat_timeout_s)

    def _gauges(self) -> None:
        for role in ("prefill", "decode"):
            M.WORKERS.labels(role).set(len(self.reg.live(role)))

    async def Register(self, request, context):
        role = ROLE.get(request.role)
        if role is None or not request.worker_id or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "register needs worker_id, address and a role")
        self.reg.register(Worker(
            worker_id=request.worker_id, role=role, address=request.address,
            agent_address=request.agent_address, model=request.layout.model,
            compat_hash=request.layout.compat_hash, last_seen=self.clock(),
            load=_load(request.load), metrics_address=request.metrics_address))
        log.info("registered %s worker %s at %s (model %s, kv %s)", role, request.worker_id,
                 request.address, request.layout.model, request.layout.compat_hash)
        self._gauges()
        return pd_pb2.RegisterResponse(heartbeat_interval_s=self.cfg.heartbeat_interval_s,
                                       heartbeat_timeout_s=self.cfg.heartbeat_timeout_s)

    async def Heartbeat(self, request, context):
        return pd_pb2.HeartbeatResponse(
            known=self.reg.heartbeat(request.worker_id, _load(request.load), self.clock()))

    async def Deregister(self, request, context):
        if self.reg.remove(request.worker_id):
            log.info("worker %s deregistered", request.worker_id)
        self._gauges()
        return pd_pb2.DeregisterResponse()

    async def Route(self, request, context):
        t0 = time.perf_counter()
        model = request.model
        try:
            p, d = select(self.reg, model, list(request.token_ids))
        except NoPlacement as e:
            M.ROUTES.labels("no_workers").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        book(p, d)
        M.ROUTES.labels("ok").inc()
        M.ROUTE_SECONDS.observe(time.perf_counter() - t0)
        return pd_pb2.RouteResponse(
            prefill=pd_pb2.WorkerRef(worker_id=p.worker_id, address=p.address),
            decode=pd_pb2.WorkerRef(worker_id=d.worker_id, address=d.address))

    async def ListWorkers(self, request, context):
        now = self.clock()
        out = []
        for w in self.reg.workers.values():
            out.append(pd_pb2.WorkerInfo(
                worker_id=w.worker_id, role=ROLE_PB[w.role], address=w.address,
                agent_address=w.agent_address,
                layout=pd_pb2.KVLayout(model=w.model, compat_hash=w.compat_hash),
                load=pd_pb2.WorkerLoad(running=w.load.running, waiting=w.load.waiting,
                                       kv_usage=w.load.kv_usage,
                                       kv_leases_held=w.load.kv_leases_held),
                last_heartbeat_age_s=now - w.last_seen, inflight=w.inflight,
                metrics_address=w.metrics_address))
        return pd_pb2.ListWorkersResponse(workers=out)

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s / 2)
            for w in self.reg.expire(self.clock()):
                M.WORKERS_EXPIRED.inc()
                log.warning("dropped %s worker %s: no heartbeat for %.1fs", w.role, w.worker_id,
                            self.cfg.heartbeat_timeout_s)
            self._gauges()


async def create_server(cfg: SchedulerConfig) -> tuple[grpc.aio.Server, int, SchedulerServicer]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    svc = SchedulerServicer(cfg)
    pd_pb2_grpc.add_SchedulerServicer_to_server(svc, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise RuntimeError(f"scheduler cannot bind {cfg.host}:{cfg.port}")
    return server, port, svc


async def serve(cfg: SchedulerConfig, ready=None, stop: asyncio.Event | None = None) -> None:
    server, port, svc = await create_server(cfg)
    await server.start()
    mport = M.serve_metrics(cfg.metrics_port, cfg.host)
    log.info("scheduler serving gRPC on %s:%d, metrics on :%d", cfg.host, port, mport)
    reaper = asyncio.create_task(svc.reap_forever())
    if ready is not None:
        ready(port)
    try:
        await (stop.wait() if stop else server.wait_for_termination())
    finally:
        reaper.cancel()
        await server.stop(2)
