"""`pdserve` command line: one entry point per process role, plus `serve` (a local cluster)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pdserve.config import (
    KV_MODES,
    EngineConfig,
    FrontendConfig,
    KVTransferConfig,
    WorkerConfig,
)
from pdserve import auth, launcher, vllm_args
from pdserve.flags import (PLACEMENT_FLAGS, autoscale_args, autoscale_config, placement_args,
                           planner_config, role_args, role_config)
from frontend.flags import http_args
from pdserve.logs import setup_logging
from pdserve.models import resolve_model
from pdserve.procs import crash_tracebacks, die_with_parent, pin_serving, widen_for_start
from scheduler.config import SchedulerConfig
from scheduler.policy import PlacementConfig

log = logging.getLogger("pdserve")

# commands that run engines: they also take vLLM's engine arguments
ENGINE_CMDS = ("serve", "prefill", "decode", "mixed")


def _config_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default="",
                    help="YAML file of flags (pdserve's and vLLM's, by name); for serve, "
                         "`prefill:` and `decode:` sections apply to one pool. One file "
                         "serves every command: each skips the keys another one takes. "
                         "The command line wins")


def _engine_args(ap: argparse.ArgumentParser) -> None:
    _config_arg(ap)
    ap.add_argument("--model", default=None,
                    help="local Hugging Face model directory (default: the bundled SmolLM2)")
    ap.add_argument("--served-model-name", default="")
    ap.add_argument("--dtype", default="auto",
                    help="auto: the model's dtype on GPUs; on CPUs bfloat16 where the CPU "
                         "computes it natively (AVX512_BF16/AMX), else float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0,
                    help="KV cache size per engine (explicit: never let vLLM take 90%%)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--no-prefix-caching", default=False,
                    action=argparse.BooleanOptionalAction)
    ap.add_argument("--lease-s", type=float, default=30.0)
    ap.add_argument("--transfer-timeout-s", type=float, default=20.0)
    ap.add_argument("--load-failure-policy", choices=["recompute", "fail"], default="recompute")
    ap.add_argument("--kv-progress-delay-us", type=int, default=100000,
                    help="producer's UCX progress thread: it wakes on UCX's events, and at "
                         "least this often (rounded up to ms; 0: no thread)")
    ap.add_argument("--kv-expect-transport", default="auto",
                    choices=["auto", "nvlink", "rdma", "shm", "tcp", "none"],
                    help="the UCX transport KV peers should use; a worse one is logged as a "
                         "KV TRANSPORT FALLBACK warning and counted in "
                         "pdserve_kv_transport_fallback_peers (auto: shm on one host, rdma "
                         "between hosts that have an RDMA device)")
    ap.add_argument("--kv-ucx-err-mode", choices=["auto", "peer", "none"], default="auto",
                    help="UCX endpoint error handling of the KV agents. peer: UCX detects "
                         "dead peers itself, but on one CPU host that leaves only RMA "
                         "emulated over TCP; none: shared-memory RMA (1.5x faster here), dead "
                         "peers are still reported by NIXL and bounded by our timeouts and "
                         "leases. auto: none for KV in host memory, peer for GPU memory")
    ap.add_argument("--kv-mode", choices=KV_MODES, default="pull",
                    help="pull: the decode engine READs the prompt's KV after prefill; push: "
                         "it offers blocks first and the prefill engine WRITEs each layer "
                         "as it is computed (layer-pipelined); push-whole: WRITEs "
                         "everything after the last prefill step (docs/design.md)")
    ap.add_argument("--kv-push-ttl-s", type=float, default=60.0,
                    help="push: a decode engine waits this long for the prefill engine's "
                         "WRITEs (queueing and prefill included), then cancels and "
                         "recomputes or fails")
    ap.add_argument("--kv-checksum", default=False,
                    action=argparse.BooleanOptionalAction,
                    help="debug: CRC32 every transferred KV block range on both sides and "
                         "compare; a mismatch fails the load (then recompute or fail, per "
                         "--load-failure-policy). Costs a read of the bytes on each side")
    ap.add_argument("--drain-timeout-s", type=float, default=60.0,
                    help="on SIGTERM a worker deregisters, then waits up to this long for its "
                         "requests (and KV held for decode workers) to finish")


def engine_config(ns, cores: str) -> EngineConfig:
    return EngineConfig(
        model=resolve_model(ns.model), served_model_name=ns.served_model_name, dtype=ns.dtype,
        max_model_len=ns.max_model_len, block_size=ns.block_size,
        kv_cache_bytes=int(ns.kv_cache_gib * 2**30), cpu_cores=cores,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        enable_prefix_caching=not ns.no_prefix_caching,
        vllm=getattr(ns, "vllm", None) or {})


def kv_config(ns) -> KVTransferConfig:
    # a consumer's pin (and each renewal) extends the lease by one lease length
    return KVTransferConfig(lease_s=ns.lease_s, acquire_extend_s=ns.lease_s,
                            transfer_timeout_s=ns.transfer_timeout_s,
                            load_failure_policy=ns.load_failure_policy,
                            progress_delay_us=ns.kv_progress_delay_us,
                            expect_transport=ns.kv_expect_transport,
                            ucx_err_mode=ns.kv_ucx_err_mode,
                            checksum=ns.kv_checksum, mode=ns.kv_mode,
                            push_ttl_s=ns.kv_push_ttl_s)


async def _until_signal(run) -> None:
    """Run `run(stop_event)`; SIGTERM/SIGINT set the event for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)


def log_role(ns) -> str:
    """The role in an engine command's log lines."""
    if ns.cmd == "serve":
        return "launcher"
    return f"{ns.role}-{ns.worker_id}" if ns.worker_id else ns.role


def cmd_worker(ns) -> int:
    setup_logging(log_role(ns))
    if ns.gpus:
        from pdserve.engine import id_list
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(id_list(ns.gpus))
    cfg = WorkerConfig(
        role=ns.role, worker_id=ns.worker_id or f"{ns.role}-{ns.port}",
        engine=engine_config(ns, ns.cores), host=ns.host, port=ns.port,
        metrics_port=ns.metrics_port, scheduler_address=ns.scheduler,
        kv_agent_port=ns.kv_agent_port, kv=kv_config(ns), drain_timeout_s=ns.drain_timeout_s,
        tpot_slo_ms=ns.tpot_slo_ms, ttft_slo_ms=ns.ttft_slo_ms)
    from pdserve.worker import EXIT_ENGINE_DEAD, EngineDied
    try:
        asyncio.run(_until_signal(lambda stop: run_worker(cfg, stop=stop)))
    except EngineDied:
        return EXIT_ENGINE_DEAD
    return 0


async def run_worker(cfg: WorkerConfig, ready: asyncio.Event | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """One worker: its engine produces and consumes KV, and it serves both the prefill and
    the decode service; its role (scheduler/roles.py) says what the scheduler sends it."""
    from decode_worker.server import DecodeServicer
    from pdserve.rpc import pd_pb2_grpc
    from pdserve.worker import WorkerRuntime
    from prefill_worker.server import PrefillServicer

    rt = WorkerRuntime(cfg)

    def add(server) -> None:
        pd_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(rt), server)
        pd_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(rt), server)
    await rt.run(add, ready, stop)


def cmd_scheduler(ns) -> int:
    setup_logging("scheduler")
    from scheduler.server import serve

    placement = PlacementConfig(**{name: getattr(ns, name)
                                   for name, _t, _h in PLACEMENT_FLAGS.values()})
    cfg = SchedulerConfig(host=ns.host, port=ns.port, metrics_port=ns.metrics_port,
                          heartbeat_interval_s=ns.heartbeat_s,
                          heartbeat_timeout_s=ns.heartbeat_timeout_s, placement=placement,
                          autoscale=autoscale_config(ns),
                          role_planning=ns.role_planner == "on", roles=role_config(ns))
    pin_serving()
    asyncio.run(_until_signal(lambda stop: serve(cfg, stop=stop)))
    return 0


def cmd_frontend(ns) -> int:
    setup_logging("frontend")
    import uvicorn

    from frontend import security
    from frontend.app import create_app
    from frontend.gen_config import parse_override
    from frontend.tokens import load_chat_template

    model = resolve_model(ns.model)
    from pathlib import Path
    cfg = FrontendConfig(model=model, served_model_name=ns.served_model_name or Path(model).name,
                         max_model_len=ns.max_model_len, host=ns.host, port=ns.port,
                         scheduler_address=ns.scheduler, ttft_slo_ms=ns.ttft_slo_ms,
                         tpot_slo_ms=ns.tpot_slo_ms, kv_mode=ns.kv_mode,
                         api_keys=security.load_keys(ns.api_key, ns.api_key_file),
                         protect_metrics=ns.protect_metrics,
                         allowed_origins=security.parse_origins(ns.allowed_origins),
                         expose_routing=ns.expose_routing, max_body_bytes=ns.max_body_bytes,
                         max_inflight=ns.max_inflight, request_timeout_s=ns.request_timeout_s,
                         enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
                         enable_force_include_usage=ns.enable_force_include_usage,
                         enable_auto_tool_choice=ns.enable_auto_tool_choice,
                         tool_call_parser=ns.tool_call_parser,
                         reasoning_parser=ns.reasoning_parser,
                         chat_template=(load_chat_template(ns.chat_template)
                                        if ns.chat_template else ""),
                         trust_request_chat_template=ns.trust_request_chat_template,
                         default_chat_template_kwargs=ns.default_chat_template_kwargs or {},
                         generation_config=ns.generation_config,
                         override_generation_config=parse_override(
                             ns.override_generation_config))
    if not cfg.api_keys:
        logging.getLogger("pdserve.frontend").warning(
            "no API key: anyone who reaches %s:%d can use the API (--api-key)", cfg.host,
            cfg.port)
    app = create_app(cfg)
    pin_serving()
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                timeout_graceful_shutdown=ns.shutdown_grace_s,
                ssl_certfile=ns.ssl_certfile or None,
                ssl_keyfile=ns.ssl_keyfile or None)
    return 0


def cmd_serve(ns) -> int:
    setup_logging(log_role(ns))
    from pdserve.launcher import run_cluster
    return run_cluster(ns, parse_args)


def cmd_dryrun(ns) -> int:
    from scheduler.dryrun import main as dryrun_main
    return dryrun_main(ns, planner_config(ns),
                       role_config(ns) if ns.role_planner == "on" else None)


def cmd_set_role(ns) -> int:
    """Admin: change a worker's role (it drains first when the new role drops work)."""
    from pdserve.rpc import pd_pb2, pd_pb2_grpc
    role = {"prefill": pd_pb2.ROLE_PREFILL, "decode": pd_pb2.ROLE_DECODE,
            "mixed": pd_pb2.ROLE_MIXED}[ns.role]
    with auth.channel(ns.scheduler, auth.from_env(auth.ADMIN)) as ch:
        r = pd_pb2_grpc.SchedulerStub(ch).SetRole(
            pd_pb2.SetRoleRequest(worker_id=ns.worker_id, role=role), timeout=10)
    if not r.found:
        print(f"no worker {ns.worker_id!r}", file=sys.stderr)
        return 1
    name = pd_pb2.Role.Name
    print(f"{ns.worker_id}: role {name(r.role)}" +
          (f", {name(r.pending_role)} once drained" if r.pending_role else ""))
    return 0


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

    s = sub.add_parser("serve", help="run a local cluster: scheduler, workers, frontend "
                       "(also takes vLLM's engine arguments, e.g. --max-logprobs 5)",
                       allow_abbrev=False)
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="OpenAI API port")
    s.add_argument("--scheduler-port", type=int, default=50051)
    s.add_argument("--prefill-workers", type=int, default=1)
    s.add_argument("--decode-workers", type=int, default=1)
    s.add_argument("--prefill-block-size", type=int, default=0,
                   help="tokens per KV block of the prefill workers (default: --block-size); "
                        "decode workers pull and lay out blocks of another size (CPU, pull)")
    s.add_argument("--cores", default="",
                   help="comma list of cores to spread workers over (default: all allowed)")
    s.add_argument("--serving-cores", type=launcher.serving_cores_arg,
                   default=os.environ.get("PDSERVE_SERVING_CORES", "auto"),
                   help="cores of the processes around the engines (frontend, scheduler, "
                        "workers): 'auto' (CPU engines on cores of their own: the prefill "
                        "pool's, off the decode engines' steps), 'all' (wherever the kernel "
                        "puts them), or a comma list (default: $PDSERVE_SERVING_CORES or "
                        "auto)")
    s.add_argument("--keep-going", default=False,
                   action=argparse.BooleanOptionalAction,
                   help="a worker that exits (after its restarts) does not stop the cluster "
                        "(the scheduler drops it); a scheduler that exits is restarted")
    s.add_argument("--prefill-args", default="",
                   help="flags for the prefill workers only, pdserve's or vLLM's, after the "
                        "shared ones (e.g. \"--block-size 64 --max-num-seqs 8\")")
    s.add_argument("--decode-args", default="", help="the same, for the decode workers")
    s.add_argument("--mixed", default=False, action=argparse.BooleanOptionalAction,
                   help="every worker starts mixed: it serves remote prefills, decodes and "
                        "prefills locally, and the adaptive choice places each request "
                        "among all of them (the pools still give each worker its flags "
                        "and cores)")
    s.add_argument("--prefill-gpus", default="",
                   help="CUDA devices of the prefill workers: one entry per worker, in order, "
                        "comma-separated; '+' joins devices of one worker (\"0,1\", \"0+1\")")
    s.add_argument("--decode-gpus", default="", help="the same, for the decode workers")
    s.add_argument("--worker-restarts", type=int, default=3,
                   help="start a worker that exited (its engine died, it crashed) again, "
                        "at most this many times each (0: never)")
    placement_args(s)
    autoscale_args(s)
    role_args(s)
    auth.secret_arg(s)
    http_args(s)
    s.set_defaults(func=cmd_serve)

    for role in ("prefill", "decode", "mixed"):
        w = sub.add_parser(role, help=f"run one worker, starting as a {role} worker (also "
                           "takes vLLM's engine arguments)", allow_abbrev=False)
        _engine_args(w)
        w.add_argument("--worker-id", default="")
        w.add_argument("--host", default="127.0.0.1")
        w.add_argument("--port", type=int, default=0)
        w.add_argument("--metrics-port", type=int, default=0)
        w.add_argument("--kv-agent-port", type=int, default=0,
                       help="KV agent (handshake + leases) port; 0 picks a free one")
        w.add_argument("--cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND for this engine "
                       "(a core list, split over its tensor-parallel ranks, or vLLM's own "
                       "per-rank form 0|1)")
        w.add_argument("--gpus", default="",
                       help="this engine's GPUs, one per tensor-parallel rank: 0, 0,1 or 0-1 "
                            "(CUDA_VISIBLE_DEVICES; the range form fits a systemd instance "
                            "name). Default: the environment's")
        w.add_argument("--scheduler", default="127.0.0.1:50051")
        w.add_argument("--tpot-slo-ms", type=float, default=100.0,
                       help="the engine holds prefill chunks beside running streams to what "
                            "their TPOT allows (pdserve/step_budget.py; 0: no budget)")
        w.add_argument("--ttft-slo-ms", type=float, default=0.0,
                       help="the TTFT SLO the frontend keeps: while local prompts are "
                            "computed alone, streams landing from a prefill worker wait for "
                            "them as long as this leaves them in time (0: they never wait)")
        auth.secret_arg(w)
        w.set_defaults(func=cmd_worker, role=role)

    s = sub.add_parser("scheduler", help="run the scheduler")
    _config_arg(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--metrics-port", type=int, default=0)
    s.add_argument("--heartbeat-s", type=float, default=1.0)
    s.add_argument("--heartbeat-timeout-s", type=float, default=5.0)
    placement_args(s)
    autoscale_args(s)
    role_args(s)
    auth.secret_arg(s)
    s.set_defaults(func=cmd_scheduler)

    d = sub.add_parser("planner-dryrun", help="replay a load trace through the autoscaling "
                       "planner; print the replica timeline and plot it")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="JSON lines recorded with --planner-record")
    src.add_argument("--synthetic", choices=["spike", "decode-heavy", "diurnal", "flap"],
                     help="a synthetic load shape through a simple capacity model")
    d.add_argument("--plot", default="", help="write a PNG of the timeline here")
    d.add_argument("--duration-s", type=float, default=1800.0)
    d.add_argument("--tick-s", type=float, default=10.0)
    d.add_argument("--prefill-tok-s", type=float, default=600.0,
                   help="synthetic: prefill tokens/s one replica sustains")
    d.add_argument("--decode-step-ms", type=float, default=40.0,
                   help="synthetic: one decode step at batch 1")
    d.add_argument("--decode-step-ms-per-seq", type=float, default=2.0,
                   help="synthetic: added to a step per running sequence")
    d.add_argument("--start-prefill", type=int, default=1)
    d.add_argument("--start-decode", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    autoscale_args(d, planner_only=True)
    role_args(d)
    d.set_defaults(func=cmd_dryrun)

    f = sub.add_parser("frontend", help="run the OpenAI-compatible HTTP frontend")
    _config_arg(f)
    f.add_argument("--model", default=None)
    f.add_argument("--served-model-name", default="")
    f.add_argument("--max-model-len", type=int, default=2048)
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=8000)
    f.add_argument("--scheduler", default="127.0.0.1:50051")
    f.add_argument("--ttft-slo-ms", type=float, default=2000.0,
                   help="goodput counts requests within this TTFT and the TPOT SLO")
    f.add_argument("--tpot-slo-ms", type=float, default=100.0)
    f.add_argument("--kv-mode", choices=KV_MODES, default="pull",
                   help="must match the workers' --kv-mode")
    f.add_argument("--reasoning-parser", default="",
                   help="vLLM's reasoning parser: the answer's reasoning apart from its "
                        "content (give the engines the same; `serve` passes it to both)")
    f.add_argument("--generation-config", default="auto",
                   help="the model's default sampling parameters, as vLLM's flag: auto "
                        "(its generation_config.json), vllm (none) or a folder (`serve` "
                        "passes its own)")
    f.add_argument("--override-generation-config", default="",
                   help="a JSON object over those defaults, as vLLM's flag")
    auth.secret_arg(f)
    http_args(f)
    f.set_defaults(func=cmd_frontend)

    r = sub.add_parser("set-role", help="change a worker's role at runtime (admin)")
    r.add_argument("worker_id")
    r.add_argument("role", choices=["prefill", "decode", "mixed"])
    r.add_argument("--scheduler", default="127.0.0.1:50051")
    auth.secret_arg(r)
    r.set_defaults(func=cmd_set_role)

    m = sub.add_parser("model", help="prepare the bundled model or build the tiny test model")
    m.add_argument("what", choices=["prepare", "tiny"])
    m.add_argument("--out", default="")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_model)
    return ap


def command_flags(ap: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Each command's own option strings."""
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return {cmd: set(p._option_string_actions) for cmd, p in sub.choices.items()}


def parse_args(argv: list[str] | None = None, own: bool = False) -> argparse.Namespace:
    """pdserve's flags, and for the engine commands vLLM's own engine arguments (checked by
    vLLM's parser: pdserve/vllm_args.py) in `ns.vllm` (parsed) and `ns.vllm_argv` (as given,
    for the launcher to hand on). `own`: this process's own command line (`main`), not one
    the launcher checks for a pool."""
    ap = build_parser()
    argv = vllm_args.with_config(list(sys.argv[1:] if argv is None else argv),
                                 command_flags(ap), ENGINE_CMDS)
    ns, rest = ap.parse_known_args(argv)
    if rest and ns.cmd not in ENGINE_CMDS:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(ns, "enable_auto_tool_choice", False) and not ns.tool_call_parser:
        ap.error("--enable-auto-tool-choice needs --tool-call-parser (as vLLM)")
    ns.vllm_argv = rest
    if own and rest and ns.cmd in ENGINE_CMDS:
        # vLLM fixes its log prefix when its parser first imports it, before the command's
        # setup_logging: name this process's role now (pdserve/logs.py)
        os.environ["VLLM_LOGGING_PREFIX"] = f"[{log_role(ns)}] "
    ns.vllm = vllm_args.parse(rest) if ns.cmd in ENGINE_CMDS else {}
    if (int(ns.vllm.get("tensor_parallel_size") or 1) > 1
            and getattr(ns, "kv_mode", "pull") != "pull"):
        ap.error(f"--kv-mode {ns.kv_mode} needs tensor parallel size 1; use --kv-mode pull "
                 "(each rank then reads its own heads)")
    return ns


def main(argv: list[str] | None = None) -> int:
    die_with_parent()       # started by the launcher or the local actuator: die with it
    crash_tracebacks()      # a crash in native code leaves its Python stacks in the log
    widen_for_start()       # spawned by a pinned scheduler: start up on every core first
    ns = parse_args(argv, own=True)
    err = auth.check_credentials(ns)
    if err:
        print(err, file=sys.stderr)
        return 2
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
