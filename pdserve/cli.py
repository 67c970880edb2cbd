"""`pdserve` command line: one entry point per process role, plus `serve` (a local cluster)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pdserve.config import (
    EngineConfig,
    FrontendConfig,
    KVTransferConfig,
    SchedulerConfig,
    WorkerConfig,
)
from pdserve.logs import setup_logging
from scheduler.policy import PlacementConfig

log = logging.getLogger("pdserve")


def _engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None,
                    help="local Hugging Face model directory (default: the bundled SmolLM2)")
    ap.add_argument("--served-model-name", default="")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0,
                    help="KV cache size per engine (explicit: never let vLLM take 90%%)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--lease-s", type=float, default=30.0)
    ap.add_argument("--transfer-timeout-s", type=float, default=20.0)
    ap.add_argument("--load-failure-policy", choices=["recompute", "fail"], default="recompute")
    ap.add_argument("--kv-progress-delay-us", type=int, default=1000,
                    help="producer's UCX progress thread: sleep between polls (0: no thread)")


def resolve_model(model: str | None) -> str:
    if model:
        return model
    from pdserve.models import ensure_bundled_model
    return str(ensure_bundled_model())


def engine_config(ns, cores: str) -> EngineConfig:
    return EngineConfig(
        model=resolve_model(ns.model), served_model_name=ns.served_model_name, dtype=ns.dtype,
        max_model_len=ns.max_model_len, block_size=ns.block_size,
        kv_cache_bytes=int(ns.kv_cache_gib * 2**30), cpu_cores=cores,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_prefix_caching=not ns.no_prefix_caching)


def kv_config(ns) -> KVTransferConfig:
    return KVTransferConfig(lease_s=ns.lease_s, transfer_timeout_s=ns.transfer_timeout_s,
                            load_failure_policy=ns.load_failure_policy,
                            progress_delay_us=ns.kv_progress_delay_us)


async def _until_signal(run) -> None:
    """Run `run(stop_event)`; SIGTERM/SIGINT set the event for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)


def cmd_worker(ns) -> int:
    setup_logging(f"{ns.role}-{ns.worker_id}" if ns.worker_id else ns.role)
    cfg = WorkerConfig(
        role=ns.role, worker_id=ns.worker_id or f"{ns.role}-{ns.port}",
        engine=engine_config(ns, ns.cores), host=ns.host, port=ns.port,
        metrics_port=ns.metrics_port, scheduler_address=ns.scheduler,
        kv_agent_port=ns.kv_agent_port, kv=kv_config(ns))
    if ns.role == "prefill":
        from prefill_worker.server import serve
    else:
        from decode_worker.server import serve
    asyncio.run(_until_signal(lambda stop: serve(cfg, stop=stop)))
    return 0


PLACEMENT_FLAGS = {  # flag -> (PlacementConfig field, type, help)
    "--policy": ("policy", str, "prefill placement: kv (prefix-cache aware), least_loaded, "
                 "round_robin"),
    "--overlap-weight": ("overlap_weight", float, "weight of uncached prompt tokens in the "
                         "prefill cost (>1 favours cache hits over balance)"),
    "--running-weight": ("running_weight", float, "prefill cost of a running request, in "
                         "tokens"),
    "--temperature": ("temperature", float, "0: cheapest worker; >0: sample by cost"),
    "--local-prefill-max-tokens": ("local_prefill_max_tokens", int, "conditional "
                                   "disaggregation: prefill on the decode worker when at most "
                                   "this many prompt tokens are uncached there (0: never)"),
    "--prefill-saturation-tokens": ("prefill_saturation_tokens", int, "prefill locally when "
                                    "every prefill worker has this many tokens queued and the "
                                    "decode worker has room (0: never)"),
}


def placement_args(p: argparse.ArgumentParser) -> None:
    d = PlacementConfig()
    for flag, (name, typ, hlp) in PLACEMENT_FLAGS.items():
        p.add_argument(flag, type=typ, default=getattr(d, name), help=hlp)


def placement_argv(ns) -> list[str]:
    out = []
    for flag, (name, _t, _h) in PLACEMENT_FLAGS.items():
        out += [flag, str(getattr(ns, name))]
    return out


def cmd_scheduler(ns) -> int:
    setup_logging("scheduler")
    from scheduler.service import serve

    placement = PlacementConfig(**{name: getattr(ns, name)
                                   for name, _t, _h in PLACEMENT_FLAGS.values()})
    cfg = SchedulerConfig(host=ns.host, port=ns.port, metrics_port=ns.metrics_port,
                          heartbeat_interval_s=ns.heartbeat_s,
                          heartbeat_timeout_s=ns.heartbeat_timeout_s, placement=placement)
    asyncio.run(_until_signal(lambda stop: serve(cfg, stop=stop)))
    return 0


def cmd_frontend(ns) -> int:
    setup_logging("frontend")
    import uvicorn

    from frontend.app import create_app

    model = resolve_model(ns.model)
    from pathlib import Path
    cfg = FrontendConfig(model=model, served_model_name=ns.served_model_name or Path(model).name,
                         max_model_len=ns.max_model_len, host=ns.host, port=ns.port,
                         scheduler_address=ns.scheduler)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


def cmd_serve(ns) -> int:
    setup_logging("launcher")
    from pdserve.launcher import run_cluster
    return run_cluster(ns)


def cmd_model(ns) -> int:
    setup_logging("model")
    from pdserve.models import build_tiny_model, ensure_bundled_model

    if ns.what == "tiny":
        print(build_tiny_model(ns.out, seed=ns.seed))
    else:
        print(ensure_bundled_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a local cluster: scheduler, workers, frontend")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="OpenAI API port")
    s.add_argument("--scheduler-port", type=int, default=50051)
    s.add_argument("--prefill-workers", type=int, default=1)
    s.add_argument("--decode-workers", type=int, default=1)
    s.add_argument("--cores", default="",
                   help="comma list of cores to spread workers over (default: all allowed)")
    s.add_argument("--keep-going", action="store_true",
                   help="a worker that exits does not stop the cluster (the scheduler drops "
                        "it); a scheduler that exits is restarted")
    placement_args(s)
    s.set_defaults(func=cmd_serve)

    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run one {role} worker")
        _engine_args(w)
        w.add_argument("--worker-id", default="")
        w.add_argument("--host", default="127.0.0.1")
        w.add_argument("--port", type=int, default=0)
        w.add_argument("--metrics-port", type=int, default=0)
        w.add_argument("--kv-agent-port", type=int, default=0,
                       help="KV agent (handshake + leases) port; 0 picks a free one")
        w.add_argument("--cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND for this engine")
        w.add_argument("--scheduler", default="127.0.0.1:50051")
        w.set_defaults(func=cmd_worker, role=role)

    s = sub.add_parser("scheduler", help="run the scheduler")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--metrics-port", type=int, default=0)
    s.add_argument("--heartbeat-s", type=float, default=1.0)
    s.add_argument("--heartbeat-timeout-s", type=float, default=5.0)
    placement_args(s)
    s.set_defaults(func=cmd_scheduler)

    f = sub.add_parser("frontend", help="run the OpenAI-compatible HTTP frontend")
    f.add_argument("--model", default=None)
    f.add_argument("--served-model-name", default="")
    f.add_argument("--max-model-len", type=int, default=2048)
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=8000)
    f.add_argument("--scheduler", default="127.0.0.1:50051")
    f.set_defaults(func=cmd_frontend)

    m = sub.add_parser("model", help="prepare the bundled model or build the tiny test model")
    m.add_argument("what", choices=["prepare", "tiny"])
    m.add_argument("--out", default="")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_model)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
