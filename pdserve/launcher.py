"""`pdserve serve`: start scheduler, workers and frontend as separate processes; stop them all.

Each child runs in its own process group (so its vLLM engine-core grandchildren go
with it) and dies with the launcher (PR_SET_PDEATHSIG). Ctrl-C or SIGTERM stops the
frontend first, then the scheduler (and the workers its autoscaler started), then the
workers (graceful: deregister, drain, stop the engine); whatever is left after the grace
period is killed by process group.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from pdserve import vllm_args
from pdserve.config import id_list
from pdserve.core_share import CORES_ENV, DIR_ENV, shared_cores
from pdserve.flags import autoscale_argv, placement_argv, role_argv
from pdserve.procs import SERVING_CPUS_ENV, START_CPUS_ENV, spawn

log = logging.getLogger("pdserve.launcher")

GRACE_S = 20.0
# set by the launcher itself from its own view of the cluster
AUTOSCALE_LAUNCHER_FLAGS = ("--autoscale-worker-args", "--autoscale-prefill-worker-args",
                            "--autoscale-decode-worker-args",
                            "--autoscale-prefill-cores",
                            "--autoscale-decode-cores", "--autoscale-base")


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.proc = spawn(argv, env)      # own process group, dies with us
        log.info("started %s (pid %d)", name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def stop_all(children: list[Child], grace: float = GRACE_S) -> None:
    """Frontend -> scheduler -> workers, by PID/process group; kill what lingers.

    The scheduler goes before the workers: its autoscaler would otherwise see the pools
    shrink and start replacements. It stops the workers its autoscaler started; ours
    drain without it (their deregistration fails harmlessly)."""
    for group in (children[-1:], children[:1], children[1:-1]):
        for c in group:
            if c.alive():
                c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in group:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing", c.name, grace)
        for c in group:
            c.signal_group(signal.SIGKILL)  # engine-core grandchildren included
            if c.alive():
                c.proc.wait(timeout=5)
    log.info("all processes stopped")


def _cores(spec: str) -> list[str]:
    if spec:
        return [c.strip() for c in spec.split(",") if c.strip()]
    return [str(c) for c in sorted(os.sched_getaffinity(0))]


def _wait_healthy(url: str, timeout: float, children: list[Child], n_prefill: int,
                  n_decode: int) -> bool:
    """Until /health reports every configured worker registered (not just one of each)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(not c.alive() for c in children):
            return False
        try:
            # our own frontend on our own host: its certificate may be self-signed
            ctx = ssl._create_unverified_context() if url.startswith("https") else None
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                body = json.loads(r.read() or b"{}")
                if (r.status == 200 and body.get("prefill_workers", 0) >= n_prefill
                        and body.get("decode_workers", 0) >= n_decode):
                    return True
        except (OSError, ValueError, http.client.HTTPException):
            # not up yet, or something else answers on the port (a process that bound it
            # first: the frontend then fails to bind, and exits, which ends this wait)
            pass
        time.sleep(0.5)
    return False


def worker_argv(ns, role: str, wid: str, cores: str, scheduler: str) -> list[str]:
    """A pool's worker; with `--mixed` it starts mixed (its pool still gives its flags)."""
    start = "mixed" if getattr(ns, "mixed", False) else role
    return [sys.executable, "-m", "pdserve.cli", start, "--worker-id", wid, "--cores", cores,
            "--scheduler", scheduler, "--host", ns.host, *engine_argv(ns), *pool_argv(ns, role)]


def pool_argv(ns, role: str) -> list[str]:
    """Flags only one pool's workers get, after the shared ones (the last one counts): the
    config file's section for the pool, then `--prefill-args` / `--decode-args`."""
    argv = []
    if role == "prefill" and getattr(ns, "prefill_block_size", 0):
        argv += ["--block-size", str(ns.prefill_block_size)]
    if getattr(ns, "config", ""):
        argv += vllm_args.config_argv(ns.config, role)
    return argv + shlex.split(getattr(ns, f"{role}_args", ""))


def check_pool_args(ns, parse_args) -> dict[str, dict]:
    """Refuse bad per-pool flags now, not when a worker starts (exits 2 with a message).
    `parse_args`: the command line's parser (pdserve/cli.py, which calls us). -> each
    pool's vLLM engine arguments, as its workers will parse them."""
    return {role: parse_args([role, *engine_argv(ns), *pool_argv(ns, role)]).vllm
            for role in ("prefill", "decode")}


def pool_tp(engine: dict) -> int:
    """The tensor-parallel size of a pool's engines, from its vLLM arguments."""
    return int(engine.get("tensor_parallel_size") or 1)


def gpu_env(spec: str, i: int, pool: str) -> dict[str, str] | None:
    """CUDA_VISIBLE_DEVICES of a pool's i-th worker from `--prefill-gpus`/`--decode-gpus`
    ("0,1": one device each; "0+1,2+3": two each). None: inherit."""
    if not spec:
        return None
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if i >= len(entries):
        raise SystemExit(f"pdserve: error: --{pool}-gpus names {len(entries)} worker(s) "
                         f"but the pool has more")
    return {"CUDA_VISIBLE_DEVICES": entries[i].replace("+", ",")}


def engine_argv(ns) -> list[str]:
    """The engine and KV flags every worker of this cluster gets."""
    argv = ["--model", ns.model,
            "--dtype", ns.dtype, "--max-model-len", str(ns.max_model_len),
            "--block-size", str(ns.block_size), "--kv-cache-gib", str(ns.kv_cache_gib),
            "--max-num-seqs", str(ns.max_num_seqs),
            "--max-num-batched-tokens", str(ns.max_num_batched_tokens),
            "--lease-s", str(ns.lease_s), "--transfer-timeout-s", str(ns.transfer_timeout_s),
            "--load-failure-policy", ns.load_failure_policy,
            "--kv-progress-delay-us", str(ns.kv_progress_delay_us),
            "--kv-expect-transport", ns.kv_expect_transport,
            "--kv-ucx-err-mode", ns.kv_ucx_err_mode,
            "--kv-mode", ns.kv_mode, "--kv-push-ttl-s", str(ns.kv_push_ttl_s),
            "--drain-timeout-s", str(ns.drain_timeout_s),
            "--tpot-slo-ms", str(getattr(ns, "tpot_slo_ms", 100.0)),
            "--ttft-slo-ms", str(getattr(ns, "ttft_slo_ms", 0.0))]
    if ns.served_model_name:
        argv += ["--served-model-name", ns.served_model_name]
    if ns.no_prefix_caching:
        argv.append("--no-prefix-caching")
    if ns.kv_checksum:
        argv.append("--kv-checksum")
    # vLLM's own engine arguments, as the user gave them (checked by vLLM's parser already)
    return argv + list(getattr(ns, "vllm_argv", []))


def lend_cores(ns, engine_cores: list[str]) -> str:
    """With PDSERVE_CORE_SHARE=1: the lock folder through which the engines lend each
    other their cores (pdserve/core_share.py), in the environment the workers inherit."""
    cores = shared_cores(engine_cores, bool(ns.prefill_gpus or ns.decode_gpus),
                         ns.autoscale == "local")
    for k in (DIR_ENV, CORES_ENV):
        os.environ.pop(k, None)
    if not cores:
        return ""
    folder = tempfile.mkdtemp(prefix="pdserve-cores-")
    os.environ.update({DIR_ENV: folder, CORES_ENV: cores})
    log.info("engines lend each other cores %s between their steps (%s)", cores, folder)
    return folder


def assign_cores(cores: list[str], n_p: int, n_d: int, tp_p: int = 1, tp_d: int = 1
                 ) -> tuple[list[str], list[str]]:
    """One core per engine and tensor-parallel rank, round-robin within its pool's share of
    the cores; an engine of TP > 1 gets vLLM's per-rank binding ("0|1": rank 0 on core 0,
    rank 1 on core 1).

    The pools never share a core when there are at least two: a prefill engine next to a
    decode engine stalls its decode steps (the point of disaggregation is lost), and a
    KV producer and its consumer on one core made UCX wire-up take 25-60 s (measured,
    docs/design.md). The prefill pool gets a share of cores proportional to its ranks,
    at least one, leaving at least one for decode."""
    need_p, need_d = n_p * tp_p, n_d * tp_d
    if len(cores) < 2 or not n_p or not n_d:
        pc, dc = cores, cores[::-1]
    else:
        k = (need_p if need_p + need_d <= len(cores) else
             min(len(cores) - 1, max(1, round(len(cores) * need_p / (need_p + need_d)))))
        pc, dc = cores[:k], cores[k:]

    def engines(pool: list[str], n: int, tp: int) -> list[str]:
        return ["|".join(pool[(i * tp + r) % len(pool)] for r in range(tp)) for i in range(n)]

    return engines(pc, n_p, tp_p), engines(dc, n_d, tp_d)


def serving_cores_arg(v: str) -> str:
    """`--serving-cores`: auto, all, or core numbers in the syntax of every other core and
    device list (`config.id_list`: "0,2-3"), as a plain comma list (argparse type)."""
    v = v.strip()
    if v in ("auto", "all"):
        return v
    try:
        ids = id_list(v) if all(p.strip() for p in v.split(",")) else []
    except ValueError:
        ids = []
    if not ids or not all(i.isdigit() for i in ids):
        raise argparse.ArgumentTypeError(
            f"{v!r}: auto, all, or a comma list of core numbers (e.g. 0,1 or 0-3)")
    return ",".join(ids)


def serving_cores(spec: str, p_cores: list[str], d_cores: list[str], gpus: bool
                  ) -> set[int] | None:
    """The cores the processes around the engines (frontend, scheduler, workers) run on;
    the engines bind themselves to their own. None: wherever the kernel puts them.

    `spec`: "all" (None), a comma list, or "auto": on CPU engines whose pools have cores of
    their own, the prefill pool's. A decode step is most of the TPOT SLO there and every
    millisecond another process takes from its core lengthens it: with the serving
    processes free to run anywhere, the decode engine's compute thread waited for its own
    core for 18% of the time it ran (`bench.cpu_use`, docs/benchmarks.md), while a prompt
    on the prefill engine has a TTFT SLO of seconds to absorb the same share. With GPU
    engines (or a shared core) the engines do not compute on these cores: "auto" leaves
    them alone."""
    if spec == "all":
        return None
    if spec != "auto":
        return {int(c) for c in spec.split(",") if c.strip()}
    flat = [{int(c) for e in pool for c in e.split("|")} for pool in (p_cores, d_cores)]
    if gpus or not all(flat) or flat[0] & flat[1]:
        return None
    return flat[0]


def cluster_credentials() -> dict[str, str | None]:
    """Internal auth with no setup: a new secret for this cluster unless one is given.

    The scheduler and the workers (and those the autoscaler starts) inherit the secret from
    our environment; the frontend, the process facing HTTP clients, gets the returned
    environment: its own role's token and no secret (it cannot register as a worker or
    sign KV handles)."""
    from pdserve import auth

    if auth.off():
        log.warning("internal auth is off (%s=off): anyone who reaches a port is trusted",
                    auth.ENV_OFF)
        return {}
    if not (os.environ.get(auth.ENV_SECRET) or os.environ.get(auth.ENV_SECRET_FILE)):
        os.environ[auth.ENV_SECRET] = auth.new_secret()
    fe = auth.from_env(auth.FRONTEND, required=True)
    return {auth.ENV_SECRET: None, auth.ENV_SECRET_FILE: None, auth.ENV_TOKEN: fe.token}


def http_argv(ns) -> list[str]:
    argv = [f"--{f.replace('_', '-')}" for f in ("protect_metrics", "expose_routing",
                                                 "enable_prompt_tokens_details",
                                                 "enable_force_include_usage",
                                                 "enable_auto_tool_choice",
                                                 "trust_request_chat_template")
            if getattr(ns, f)]
    argv += ["--max-body-bytes", str(ns.max_body_bytes), "--max-inflight", str(ns.max_inflight),
             "--request-timeout-s", str(ns.request_timeout_s),
             "--shutdown-grace-s", str(ns.shutdown_grace_s)]
    for flag in ("ssl_certfile", "ssl_keyfile", "allowed_origins", "tool_call_parser",
                 "chat_template"):
        if getattr(ns, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(ns, flag)]
    if ns.default_chat_template_kwargs:
        argv += ["--default-chat-template-kwargs", json.dumps(ns.default_chat_template_kwargs)]
    # a vLLM engine argument: the engines gate structured outputs on it, the frontend
    # splits the answer with it
    vllm = getattr(ns, "vllm", None) or {}
    if vllm.get("reasoning_parser"):
        argv += ["--reasoning-parser", vllm["reasoning_parser"]]
    # vLLM engine arguments its server applies to requests: so does the frontend
    if vllm.get("generation_config"):
        argv += ["--generation-config", vllm["generation_config"]]
    if vllm.get("override_generation_config"):
        argv += ["--override-generation-config",
                 json.dumps(vllm["override_generation_config"])]
    return argv


def api_key_env(ns) -> dict[str, str]:
    """The frontend's API keys go by environment, not argv (which `ps` shows anyone)."""
    from frontend.security import ENV_KEY, load_keys
    keys = load_keys(ns.api_key, ns.api_key_file)
    return {ENV_KEY: ",".join(keys)} if keys else {}


def run_cluster(ns, parse_args) -> int:
    """`pdserve serve`; `parse_args`: the command line's parser, to check each pool's
    flags before anything starts."""
    from pdserve.models import resolve_model

    ns.model = resolve_model(ns.model)
    pools = check_pool_args(ns, parse_args)
    fe_env = cluster_credentials()
    cores = _cores(ns.cores)
    scheduler = f"{ns.host}:{ns.scheduler_port}"
    children: list[Child] = []
    stopping = {"flag": False}
    share_dir = ""

    def _on_signal(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        n_p, n_d = ns.prefill_workers, ns.decode_workers
        p_cores, d_cores = assign_cores(cores, n_p, n_d, pool_tp(pools["prefill"]),
                                        pool_tp(pools["decode"]))
        mine = serving_cores(ns.serving_cores, p_cores, d_cores,
                             bool(ns.prefill_gpus or ns.decode_gpus))
        share_dir = lend_cores(ns, p_cores + d_cores)
        if mine:
            # each child moves itself there once it is up (procs.pin_serving); the ones
            # started later (restarts, the autoscaler's) inherit the variable
            allowed = set(os.sched_getaffinity(0))
            if not mine <= allowed:
                log.error("--serving-cores %s: not cores this process may use (%s)",
                          ",".join(map(str, sorted(mine))),
                          ",".join(map(str, sorted(allowed))))
                return 2
            os.environ[SERVING_CPUS_ENV] = ",".join(map(str, sorted(mine)))
            # ...and start up on every core of ours, spawned by a pinned process or not
            os.environ[START_CPUS_ENV] = ",".join(map(str, sorted(allowed)))
            log.info("frontend, scheduler and workers on cores %s once started; engines "
                     "on their own", os.environ[SERVING_CPUS_ENV])
        else:
            os.environ.pop(SERVING_CPUS_ENV, None)
            os.environ.pop(START_CPUS_ENV, None)
        sched_argv = [sys.executable, "-m", "pdserve.cli", "scheduler", "--host", ns.host,
                      "--port", str(ns.scheduler_port)] + placement_argv(ns) + role_argv(ns)
        sched_argv += autoscale_argv(ns, skip=AUTOSCALE_LAUNCHER_FLAGS)
        if ns.autoscale == "local":
            # the autoscaler starts workers like ours, on each pool's cores
            sched_argv += ["--autoscale-worker-args", shlex.join(engine_argv(ns)),
                           "--autoscale-prefill-worker-args",
                           shlex.join(pool_argv(ns, "prefill")),
                           "--autoscale-decode-worker-args", shlex.join(pool_argv(ns, "decode")),
                           "--autoscale-prefill-cores", ",".join(dict.fromkeys(p_cores)),
                           "--autoscale-decode-cores", ",".join(dict.fromkeys(d_cores)),
                           "--autoscale-base", f"{n_p},{n_d}"]
        children.append(Child("scheduler", sched_argv))
        for i, c in enumerate(p_cores):
            children.append(Child(f"prefill-{i}", worker_argv(ns, "prefill", f"prefill-{i}", c,
                                                              scheduler),
                                  gpu_env(ns.prefill_gpus, i, "prefill")))
        for i, c in enumerate(d_cores):
            children.append(Child(f"decode-{i}", worker_argv(ns, "decode", f"decode-{i}", c,
                                                            scheduler),
                                  gpu_env(ns.decode_gpus, i, "decode")))
        fe = [sys.executable, "-m", "pdserve.cli", "frontend", "--model", ns.model,
              "--host", ns.host, "--port", str(ns.port), "--scheduler", scheduler,
              "--max-model-len", str(ns.max_model_len),
              "--ttft-slo-ms", str(ns.ttft_slo_ms), "--tpot-slo-ms", str(ns.tpot_slo_ms),
              "--kv-mode", ns.kv_mode]
        if ns.served_model_name:
            fe += ["--served-model-name", ns.served_model_name]
        fe += http_argv(ns)
        fe_env.update(api_key_env(ns))
        children.append(Child("frontend", fe, fe_env))
        url = f"{'https' if ns.ssl_certfile else 'http'}://{ns.host}:{ns.port}"
        ok = False
        deadline = time.monotonic() + 600
        while not stopping["flag"] and time.monotonic() < deadline:
            ok = _wait_healthy(f"{url}/health", 2, children, n_p, n_d)
            if ok or any(not c.alive() for c in children):
                break
        if ok:
            log.info("ready: OpenAI API on %s/v1 (model %s); Ctrl-C stops everything", url,
                     ns.served_model_name or os.path.basename(ns.model.rstrip("/")))
        elif not stopping["flag"]:
            log.error("cluster did not become healthy")
            return 1
        gone: set[str] = set()
        restarts: dict[str, int] = {}
        while not stopping["flag"]:
            dead = [c for c in children if not c.alive() and c.name not in gone]
            for c in dead:
                if c.name == "scheduler" and ns.keep_going:
                    # it keeps no state that matters: workers register again and resend
                    # their KV index snapshots, the frontend retries routing meanwhile
                    log.warning("scheduler exited with code %s; restarting it (--keep-going)",
                                c.proc.returncode)
                    children[0] = Child("scheduler", sched_argv)
                    continue
                worker = c.name.startswith(("prefill-", "decode-"))
                if (worker and c.proc.returncode != 0
                        and restarts.get(c.name, 0) < ns.worker_restarts):
                    # as systemd or Kubernetes would: a worker whose engine died (or that
                    # crashed) comes back with the same id and cores
                    restarts[c.name] = restarts.get(c.name, 0) + 1
                    log.warning("%s exited with code %s; restarting it (%d of %d)", c.name,
                                c.proc.returncode, restarts[c.name], ns.worker_restarts)
                    children[children.index(c)] = Child(c.name, c.argv, c.env)
                    continue
                if not (worker and ns.keep_going):
                    log.error("%s exited with code %s; stopping the cluster", c.name,
                              c.proc.returncode)
                    return 1
                log.warning("%s exited with code %s; the others keep serving (--keep-going)",
                            c.name, c.proc.returncode)
                gone.add(c.name)
            time.sleep(0.5)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # the frontend lets streams finish for its grace period before it is killed
        stop_all(children, max(GRACE_S, ns.shutdown_grace_s + 5))
        if share_dir:
            shutil.rmtree(share_dir, ignore_errors=True)
