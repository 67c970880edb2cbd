"""The scheduler's process: its gRPC server (with health checks), its metrics endpoint,
the reaper and, when autoscaling is on, the planner and its actuator."""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve import auth, loop_lag
from pdserve import metrics as M
from pdserve.procs import freeze_heap
from pdserve.rpc import pd_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.service import SchedulerServicer

log = logging.getLogger(__name__)


async def create_server(cfg: SchedulerConfig) -> tuple[grpc.aio.Server, int, SchedulerServicer]:
    from grpc_health.v1 import health, health_pb2_grpc

    svc = SchedulerServicer(cfg)
    # every call but health checks carries a worker's, the frontend's or an admin's token
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             interceptors=auth.server_interceptors(svc.creds))
    pd_pb2_grpc.add_SchedulerServicer_to_server(svc, server)
    # grpc.health.v1 (Kubernetes gRPC probes): serving as soon as it listens
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise RuntimeError(f"scheduler cannot bind {cfg.host}:{cfg.port}")
    return server, port, svc


def start_autoscaler(svc: SchedulerServicer, cfg: SchedulerConfig, port: int):
    """The planner and its actuator inside the scheduler (cfg.autoscale.mode != "off")."""
    from scheduler.autoscale import Autoscaler, build_actuator

    actuator = build_actuator(cfg.autoscale, f"{cfg.host}:{port}", cfg.host)
    svc.autoscaler = Autoscaler(cfg.autoscale, svc.reg, actuator, svc.clock)
    return svc.autoscaler


async def serve(cfg: SchedulerConfig, ready=None, stop: asyncio.Event | None = None) -> None:
    server, port, svc = await create_server(cfg)
    await server.start()
    mport = M.serve_metrics(cfg.metrics_port, cfg.host)
    log.info("scheduler serving gRPC on %s:%d, metrics on :%d, placement %s; %d objects of "
             "the start-up heap frozen out of GC", cfg.host, port, mport, cfg.placement,
             freeze_heap())
    tasks = [asyncio.create_task(svc.reap_forever()), loop_lag.export("scheduler")]
    scaler = None
    if cfg.autoscale.mode != "off":
        scaler = start_autoscaler(svc, cfg, port)
        tasks.append(asyncio.create_task(scaler.run()))
    if ready is not None:
        ready(port)
    try:
        await (stop.wait() if stop else server.wait_for_termination())
    finally:
        for t in tasks:
            t.cancel()
        if scaler is not None:
            await scaler.close()      # stops the workers the local actuator started
        await svc.end_streams()
        await server.stop(2)
