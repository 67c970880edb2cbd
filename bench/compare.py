"""Goodput comparison on this machine: the same model, the same 2 cores, the same workload,
four setups started and stopped in turn.

    .venv/bin/python -m bench.compare                     # bundled SmolLM2, defaults below
    .venv/bin/python -m bench.compare --rates 0.2,0.4 --num-requests 16 \\
        --out results/compare.json --plot results/compare

Setups (`--setups`, comma list; all but vllm-2x-chunked by default):
  vllm-1          one colocated vLLM OpenAI server on both cores
  vllm-2x         two colocated vLLM servers, core 0 and core 1, behind a least-outstanding
                  proxy (bench/proxy.py)
  vllm-2x-chunked the same with --max-num-batched-tokens 256 (vLLM's chunked prefill, small
                  chunks: TPOT protected at some TTFT cost)
  vllm-nixl-pd    vLLM's own NixlConnector: prefill server on core 0, decode server on core 1,
                  and the minimal P/D proxy (bench/proxy.py)
  pdserve         ours, `pdserve serve`: 1 prefill (core 0) / 1 decode (core 1); or the
                  one already serving at --pdserve-url

Every vLLM server runs with the same engine settings as ours (bf16, eager, block 128, max
seqs, batched tokens, an explicit KV cache size), its threads bound by
VLLM_CPU_OMP_THREADS_BIND and the whole process tree confined with `taskset` to its cores
(without that, stock NIXL threads drift onto the other engine's core: `ps -L -o psr`).
vLLM's servers run stock: pdserve's quiet-wait plugin stays off for them unless
`--baseline-quiet-wait`. Each rate of the sweep gets its own seeded prompts, the same for
every setup. Prints one table of goodput, TTFT p99 and TPOT p99 per setup and rate, the
ratios of pdserve to each peer, and the project's goals met or not; writes JSON and PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pdserve.config import resolve_dtype
from bench import host
from bench.local_cluster import start_module
from pdserve.engine import free_port, id_list

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "vllm-1": "1 colocated vLLM, cores 0-1",
    "vllm-2x": "2 colocated vLLM (core 0, core 1) + least-outstanding proxy",
    "vllm-2x-chunked": "the same, each with --max-num-batched-tokens 256 (small chunks)",
    "vllm-nixl-pd": "vLLM NixlConnector 1P (core 0) / 1D (core 1) + proxy",
    "pdserve": "pdserve 1P (core 0) / 1D (core 1)",
}
OURS = "pdserve"
ENV_ARG = re.compile(r"^[A-Z_][A-Z0-9_]*=")   # a variant's NAME=VALUE: environment


def quiet_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range, for a server that binds it long after
    it is chosen (vLLM's NIXL side channel, once its engine is up: 10-20 s). No port the
    kernel hands out meanwhile (another `free_port`, a connection's own end) can be this
    one; a `free_port` was, and vLLM's P/D prefill server then lost its handshake listener
    to "address already in use" and the test waited on it."""
    import random

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


class Procs:
    """Processes of one setup, each in its own session; stopped by PID (its group)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.urls: dict[str, str] = {}     # server name -> its own endpoint

    def start(self, name: str, module: str, args: list[str],
              env: dict[str, str] | None = None, cpus: list[int] | None = None):
        """`python -m module *args` on `cpus` (all: None), logging to `<name>.log`: forked
        by the zygote PDSERVE_ZYGOTE names if one answers (a stock server 8 s sooner),
        else a new interpreter under `taskset -c` (`start_module`)."""
        log = open(self.log_dir / f"{name}.log", "w")
        p = start_module(module, args, log, env, cpus=cpus)
        self.procs.append((name, p))
        return p

    def check(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited ({p.returncode}); log tail:\n{tail}")

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT to every server, `grace_s` for all of them to end, then SIGKILL to
        each one's process group."""
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s     # one grace period for all, not one each
        for _name, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:   # engine-core children share the group: make sure none is left
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        self.procs.clear()


def wait_ready(url: str, procs: Procs, timeout_s: float = 400.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        try:
            if (httpx.get(f"{url}/health", timeout=2).status_code == 200
                    and httpx.get(f"{url}/v1/models", timeout=5).status_code == 200):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)       # a refused connection costs nothing: a second a start less
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def vllm_server(procs: Procs, ns, name: str, cores: str, extra: list[str] = (),
                env: dict[str, str] | None = None) -> str:
    port = free_port()
    argv = ["--model", ns.model, "--served-model-name", ns.served_name,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", resolve_dtype(ns.dtype),
            "--max-model-len", str(ns.max_model_len), "--block-size", "128",
            "--max-num-seqs", str(ns.max_num_seqs),
            "--max-num-batched-tokens", str(ns.max_num_batched_tokens),
            "--enforce-eager", "--disable-uvicorn-access-log", *extra]
    one = getattr(ns, "vllm_one_process", False)
    if one:
        argv += ["--distributed-executor-backend", "uni"]
    cpus = [int(c) for c in id_list(cores)]
    procs.start(name, "vllm.entrypoints.openai.api_server", argv, cpus=cpus, env={
        "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": str(ns.kv_cache_gib),
        "PDSERVE_QUIET_WAIT": "1" if ns.baseline_quiet_wait else "0",
        # vLLM's CPU platform turns "uni" into its multiprocess executor unless this reads 0
        # and its engine core forked, not spawned (pdserve/engine_fork.py)
        **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PDSERVE_FORK_ENGINE": "1"} if one else {}),
        **(env or {})})
    procs.urls[name] = f"http://127.0.0.1:{port}"
    return procs.urls[name]


def proxy(procs: Procs, name: str, args: list[str]) -> str:
    port = free_port()
    procs.start(name, "bench.proxy", ["--port", str(port), *args])
    return f"http://127.0.0.1:{port}"


def start_setup(setup: str, ns, procs: Procs) -> str:
    """Start one setup; returns its OpenAI endpoint once every server is ready."""
    if setup == "vllm-1":
        url = vllm_server(procs, ns, "vllm-1", "0-1")
        wait_ready(url, procs)
        return url
    if setup in ("vllm-2x", "vllm-2x-chunked"):
        small = ["--max-num-batched-tokens", "256"] if setup == "vllm-2x-chunked" else []
        a = vllm_server(procs, ns, "vllm-core0", "0", small)
        b = vllm_server(procs, ns, "vllm-core1", "1", small)
        for u in (a, b):
            wait_ready(u, procs)
        url = proxy(procs, "proxy-lo", ["--mode", "least-outstanding", "--backend", a,
                                         "--backend", b])
        wait_ready(url, procs)
        return url
    if setup == "vllm-nixl-pd":
        kv = ["--kv-transfer-config", json.dumps({
            "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"})]
        side = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"}
        p = vllm_server(procs, ns, "vllm-prefill", "0", kv,
                        {**side, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(quiet_port())})
        d = vllm_server(procs, ns, "vllm-decode", "1", kv,
                        {**side, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(quiet_port())})
        for u in (p, d):
            wait_ready(u, procs)
        url = proxy(procs, "proxy-pd", ["--mode", "pd", "--prefill", p, "--decode", d])
        wait_ready(url, procs)
        return url
    if setup == OURS and getattr(ns, "pdserve_url", ""):
        wait_ready(ns.pdserve_url, procs)     # one already serving: measured, not started
        return ns.pdserve_url
    if setup == OURS or setup in ns.variants:
        port, sport = free_port(), free_port()
        procs.start("pdserve", "pdserve.cli", [
            "serve", "--model", ns.model,
            "--served-model-name", ns.served_name, "--port", str(port),
            "--scheduler-port", str(sport), "--kv-cache-gib", str(ns.kv_cache_gib),
            "--max-model-len", str(ns.max_model_len), "--max-num-seqs", str(ns.max_num_seqs),
            "--max-num-batched-tokens", str(ns.max_num_batched_tokens),
            "--dtype", resolve_dtype(ns.dtype),
            "--expose-routing",      # the x-pdserve-route header: options taken, forecasts
            *ns.pdserve_arg,
            *[a for a in ns.variants.get(setup, []) if not ENV_ARG.match(a)]],
            env=dict(a.split("=", 1) for a in ns.variants.get(setup, []) if ENV_ARG.match(a)))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 400
        log = procs.log_dir / "pdserve.log"
        while "pdserve.launcher: ready:" not in log.read_text(errors="replace"):
            procs.check()
            if time.monotonic() > deadline:
                raise RuntimeError("pdserve not ready")
            time.sleep(0.2)
        wait_ready(url, procs)
        return url
    raise ValueError(f"unknown setup {setup!r}; known: {', '.join(SETUPS)}")


def run_setup(setup: str, ns, body=None):
    """Start `setup`, warm it up, run `body(url)` (default: the sweep of ns), stop it."""
    from bench.serve import sweep

    procs = Procs(ns.log_dir)
    t0 = time.monotonic()
    try:
        print(f"== {setup}: {SETUPS[setup]} (starting)", file=sys.stderr, flush=True)
        url = start_setup(setup, ns, procs)
        print(f"== {setup}: ready in {time.monotonic() - t0:.0f}s at {url}", file=sys.stderr,
              flush=True)
        if ns.warmup:
            warm = argparse.Namespace(**{**vars(ns), "num_requests": ns.warmup,
                                         "rates": "0", "concurrency": 1, "seed": 999_999})
            asyncio.run(sweep(url, warm, f"{setup} warm-up"))
        if body is not None:
            return body(url)
        return asyncio.run(sweep(url, ns, setup))
    finally:
        procs.stop()


# ---------------------------------------------------------------------- report (pure)

def _cell(x: float, fmt: str) -> str:
    """`x` formatted; a dash of the same width when there is no figure."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return format("-", ">" + fmt.split(".")[0])
    return format(x, fmt)


def ratio(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return math.nan
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def table(results: dict[str, list[dict]]) -> str:
    """One row per setup and rate: goodput, TTFT p99, TPOT p99 (and what else helps read it)."""
    lines = [f"{'setup':<14} {'rate':>5} {'ok':>6} {'goodput':>8} {'TTFT p50':>9} "
             f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p99':>8}",
             f"{'':<14} {'req/s':>5} {'':>6} {'req/s':>8} {'ms':>9} {'ms':>9} {'ms':>9} "
             f"{'ms':>9} {'ms':>8}"]
    for setup, runs in results.items():
        for run in runs:
            s = run["summary"]
            lines.append(
                f"{setup:<14} {float(s['rate']):>5g} {s['completed']:>3}/{s['requests']:<2} "
                f"{s['goodput']:>8.3f} {_cell(s['ttft_ms']['p50'], '9.0f')} "
                f"{_cell(s['ttft_ms']['p99'], '9.0f')} {_cell(s['tpot_ms']['p50'], '9.1f')} "
                f"{_cell(s['tpot_ms']['p99'], '9.1f')} {_cell(s['itl_ms']['p99'], '8.0f')}")
    return "\n".join(lines)


def by_rate(runs: list[dict]) -> dict[float, dict]:
    return {r["summary"]["rate"]: r["summary"] for r in runs}


def ratios(results: dict[str, list[dict]], ours: str = OURS) -> list[dict]:
    """Per peer and rate: ours / peer for goodput, TTFT p99 and TPOT p99."""
    if ours not in results:
        return []
    mine = by_rate(results[ours])
    out = []
    for peer, runs in results.items():
        if peer == ours:
            continue
        for rate, s in by_rate(runs).items():
            m = mine.get(rate)
            if m is None:
                continue
            out.append({"peer": peer, "rate": rate,
                        "goodput": ratio(m["goodput"], s["goodput"]),
                        "ttft_p99": ratio(m["ttft_ms"]["p99"], s["ttft_ms"]["p99"]),
                        "tpot_p99": ratio(m["tpot_ms"]["p99"], s["tpot_ms"]["p99"])})
    return out


def goals(results: dict[str, list[dict]], ours: str = OURS) -> list[tuple[str, bool | None, str]]:
    """The project's goals (issue 5), each (text, met or None when not measured, figures)."""
    out: list[tuple[str, bool | None, str]] = []
    mine = by_rate(results.get(ours, []))

    def peak(runs):
        return max((r["summary"]["goodput"] for r in runs), default=math.nan)

    if mine and "vllm-2x" in results:
        r = ratio(peak(results[ours]), peak(results["vllm-2x"]))
        out.append(("peak goodput >= 1.5x two colocated replicas (vllm-2x)", r >= 1.5,
                    f"{peak(results[ours]):.3f} vs {peak(results['vllm-2x']):.3f} req/s = "
                    f"{r:.2f}x"))
    if mine and "vllm-1" in results:
        peer = by_rate(results["vllm-1"])
        rs = {rate: ratio(mine[rate]["tpot_ms"]["p99"], s["tpot_ms"]["p99"])
              for rate, s in peer.items() if rate in mine}
        ok = all(v <= 0.5 for v in rs.values()) if rs else None
        out.append(("TPOT p99 <= 0.5x one colocated vLLM (vllm-1) at every rate", ok,
                    ", ".join(f"{float(k):g}: {v:.2f}x" for k, v in rs.items())))
    if mine and "vllm-nixl-pd" in results:
        peer = by_rate(results["vllm-nixl-pd"])
        rs = {rate: (mine[rate]["goodput"], s["goodput"]) for rate, s in peer.items()
              if rate in mine}
        ok = all(a >= b for a, b in rs.values()) if rs else None
        out.append(("goodput >= vLLM NixlConnector 1P1D (vllm-nixl-pd) at every rate", ok,
                    ", ".join(f"{float(k):g}: {a:.3f} vs {b:.3f}" for k, (a, b) in rs.items())))
    return out


def report(results: dict[str, list[dict]]) -> str:
    parts = [table(results)]
    peers = {s: r for s, r in results.items() if not s.startswith(OURS)}
    for ours in [s for s in results if s.startswith(OURS)]:
        mine = {**peers, OURS: results[ours]}
        rs = ratios(mine)
        if rs:
            parts.append(f"\n{ours} / peer{'':<{max(0, 9 - len(ours))}} rate  goodput  "
                         "TTFT p99  TPOT p99")
            for r in rs:
                parts.append(f"{r['peer']:<16} {float(r['rate']):>6g} "
                             f"{_cell(r['goodput'], '8.2f')} "
                             f"{_cell(r['ttft_p99'], '9.2f')} {_cell(r['tpot_p99'], '9.2f')}")
        gs = goals(mine)
        if gs:
            parts.append(f"\ngoals ({ours}):")
            for text, ok, fig in gs:
                mark = "MET " if ok else ("not measured" if ok is None else "MISSED")
                parts.append(f"  [{mark}] {text}: {fig}")
    return "\n".join(parts)


def plots(results: dict[str, list[dict]], prefix: str) -> list[str]:
    from bench.serve import plot_cdfs, plot_goodput

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    out = [f"{prefix}-goodput.png"]
    plot_goodput({s: [(float(r["summary"]["rate"]), r["summary"]["goodput"]) for r in runs]
                  for s, runs in results.items()}, out[0])
    rates = sorted({r["summary"]["rate"] for runs in results.values() for r in runs})
    for rate in rates:
        runs = [dict(r, label=s) for s, rs in results.items() for r in rs
                if r["summary"]["rate"] == rate]
        path = f"{prefix}-cdf-{float(rate):g}.png"
        plot_cdfs(runs, path)
        out.append(path)
    return out


def add_setup_args(ap: argparse.ArgumentParser, setups: str, log_dir: str) -> None:
    """The flags every comparison shares: model, setups, engine settings, outputs."""
    ap.add_argument("--model", default=None, help="HF model directory (default: bundled)")
    ap.add_argument("--served-name", default="model")
    ap.add_argument("--setups", default=setups)
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="per engine (whole GiB)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="auto",
                    help="every engine's (auto: bfloat16 where the CPU computes it natively, "
                         "else float32)")
    ap.add_argument("--baseline-quiet-wait", action="store_true",
                    help="give vLLM's servers pdserve's quiet-wait plugin too")
    ap.add_argument("--vllm-one-process", action="store_true",
                    help="vLLM's servers run their engine in one process (the uniprocess "
                         "executor, as pdserve's engines at one rank) instead of spawning a "
                         "worker for the model: the same outputs and about 8 s less to start "
                         "(and their engine processes forked from the server; quick checks "
                         "such as the test suite's; figures of record keep "
                         "vLLM's default)")
    ap.add_argument("--pdserve-url", default="",
                    help="measure the pdserve already serving at this URL (a deployment on "
                         "these cores) instead of starting one; --pdserve-arg does not "
                         "reach it")
    ap.add_argument("--pdserve-arg", action="append", default=[],
                    help="extra `pdserve serve` argument (repeat; use --pdserve-arg=--flag)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="one more setup of ours with extra `pdserve serve` arguments, e.g. "
                         "--variant 'pdserve-local=--local-prefill-max-tokens 300' (LABEL "
                         "must start with pdserve; add it to --setups or it runs last); "
                         "NAME=VALUE among them sets an environment variable for it")
    ap.add_argument("--warmup", type=int, default=2, help="requests before measuring")
    ap.add_argument("--log-dir", default=log_dir)
    ap.add_argument("--out", default="")
    ap.add_argument("--plot", default="")


def stop_on_sigterm() -> None:
    """SIGTERM ends the run as Ctrl-C does: through `run_setup`'s `finally`, which stops the
    servers it started (by default SIGTERM ended the interpreter there and left them
    running)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def finish_args(ns):
    """The bundled model when none is named; the log directory made; no variants yet;
    SIGTERM stops the servers too (`stop_on_sigterm`)."""
    stop_on_sigterm()
    if not ns.model:
        from pdserve.models import ensure_bundled_model
        ns.model = str(ensure_bundled_model())
    ns.log_dir = Path(ns.log_dir)
    ns.log_dir.mkdir(parents=True, exist_ok=True)
    ns.variants = {}
    return ns


def setup_list(ap: argparse.ArgumentParser, ns) -> list[str]:
    """--setups with the --variant setups (known from now on) after them."""
    for v in ns.variant:
        label, _, args = v.partition("=")
        if not label.startswith(OURS) or label == OURS:
            ap.error(f"a variant's label must start with {OURS} and differ from it: {label!r}")
        ns.variants[label] = args.split()
        SETUPS[label] = f"pdserve 1P/1D with {args}"
    setups = [s.strip() for s in ns.setups.split(",") if s.strip()]
    setups += [v for v in ns.variants if v not in setups]
    for s in setups:
        if s not in SETUPS:
            ap.error(f"unknown setup {s!r}; known: {', '.join(SETUPS)}")
    return setups


def main(argv=None) -> int:
    from bench.serve import add_workload_args

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap, ",".join(s for s in SETUPS if s != "vllm-2x-chunked"),
                   "/tmp/pdserve-compare")
    add_workload_args(ap)
    ap.set_defaults(rates="0.2,0.4,0.6", num_requests=20, input="mix:0.25:1536:256",
                    output="fixed:64", slo_ttft_ms=5000.0, slo_tpot_ms=80.0)
    ns = finish_args(ap.parse_args(argv))
    setups = setup_list(ap, ns)
    hf = host.facts()
    print(host.describe(hf), flush=True)
    print(f"workload: {ns.num_requests} requests per rate, rates {ns.rates}, input "
          f"{ns.input}, output {ns.output}, {ns.arrival}, seed {ns.seed}; SLO TTFT "
          f"{ns.slo_ttft_ms:g} ms, TPOT {ns.slo_tpot_ms:g} ms", flush=True)
    results: dict[str, list[dict]] = {}
    for s in setups:
        results[s] = run_setup(s, ns)
    args = sys.argv[1:] if argv is None else argv
    if ns.out:      # the measurements first: a report that fails must not lose them
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps({"argv": args, "host": hf, "results": results},
                                            indent=1))
    text = report(results)
    print("\n" + text, flush=True)
    if ns.out:
        Path(ns.out).write_text(json.dumps({"argv": args, "host": hf, "report": text,
                                            "results": results}, indent=1))
    if ns.plot:
        for p in plots(results, ns.plot):
            print(f"wrote {p}", flush=True)
    failed = sum(r["summary"]["failed"] for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
