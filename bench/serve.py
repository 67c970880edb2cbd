"""Serving benchmark against any OpenAI-compatible endpoint: goodput under TTFT/TPOT SLOs.

    .venv/bin/python -m bench.serve --url http://127.0.0.1:8000 --rates 0.25,0.5,1 \\
        --num-requests 24 --input mix:0.25:2048:256 --output fixed:64 \\
        --slo-ttft-ms 3000 --slo-tpot-ms 100 --out results/run.json --plot results/run

Streams every request (`/v1/completions`, token-id prompts, `ignore_eos`), measures TTFT,
TPOT, every inter-token gap and end-to-end latency, and reports p50/p90/p99, requests/s,
tokens/s and goodput (requests/s within both SLOs). One run per rate (or per
`--concurrency`), same seeded workload in each. Writes JSON (summary + every request) and
PNG plots: latency CDFs, and goodput against request rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import httpx

from bench.stats import Result, parse_route, result_dict, summarize
from bench.workload import Request, WorkloadSpec, build


async def one(client: httpx.AsyncClient, url: str, model: str, req: Request) -> Result:
    res = Result(req.index, False, len(req.prompt))
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json={
                "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            res.route_text = r.headers.get("x-pdserve-route", "")
            res.route, res.pred_ttft, res.pred_tpot = parse_route(res.route_text)
            n_chunks = 0
            usage = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res.error = str(ev["error"].get("message", ev["error"]))
                    return res
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("pdserve_route") and not res.route:   # pdserve, streamed
                    res.route_text = ev["pdserve_route"]
                    res.route, res.pred_ttft, res.pred_tpot = parse_route(res.route_text)
                if ev.get("choices") and ev["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    n_chunks += 1
        res.e2e = time.perf_counter() - t0
        res.output_tokens = usage["completion_tokens"] if usage else n_chunks
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens received"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


class Progress:
    def __init__(self, total: int, label: str, stream=sys.stderr) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def tick(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.monotonic()
        if now - self._last > 2 or self.done == self.total:
            self._last = now
            print(f"  [{self.label}] {self.done}/{self.total} done, {self.failed} failed, "
                  f"{now - self.t0:.0f}s", file=self.stream, flush=True)


async def run_once(url: str, model: str, reqs: list[Request], concurrency: int,
                   label: str, timeout_s: float) -> tuple[list[Result], float]:
    """Send `reqs` at their offsets (or `concurrency` at a time when > 0)."""
    prog = Progress(len(reqs), label)
    limits = httpx.Limits(max_connections=max(64, concurrency * 2))
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrency > 0:
            sem = asyncio.Semaphore(concurrency)

            async def bounded(r):
                async with sem:
                    res = await one(client, url, model, r)
                    prog.tick(res.ok)
                    return res
            results = await asyncio.gather(*[bounded(r) for r in reqs])
        else:
            async def timed(r):
                await asyncio.sleep(max(0.0, r.at - (time.perf_counter() - t0)))
                res = await one(client, url, model, r)
                prog.tick(res.ok)
                return res
            results = await asyncio.gather(*[timed(r) for r in reqs])
        return list(results), time.perf_counter() - t0


async def served_model(url: str) -> str:
    async with httpx.AsyncClient(timeout=30) as c:
        return (await c.get(f"{url}/v1/models")).json()["data"][0]["id"]


def plot_cdfs(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for run in runs:
            xs = sorted(r[key] * 1e3 for r in run["requests"]
                        if r["ok"] and not math.isnan(r[key]))
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label=run["label"])
        slo = runs[0]["summary"]["slo"][f"{key}_ms"]
        ax.axvline(slo, color="gray", ls="--", lw=0.8, label="SLO")
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_goodput(series: dict[str, list[tuple[float, float]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s within SLOs)")
    ax.set_title("Goodput against request rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--arrival", choices=["poisson", "bursty"], default="poisson")
    ap.add_argument("--burstiness", type=float, default=2.0,
                    help="bursty: coefficient of variation of the gaps")
    ap.add_argument("--rates", default="0.5", help="comma list of request rates (req/s)")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="> 0: a fixed number in flight instead of a rate")
    ap.add_argument("--input", default="fixed:1024",
                    help="prompt tokens: fixed:N, uniform:A:B, mix:P:LONG:SHORT")
    ap.add_argument("--output", default="fixed:64", help="output tokens, same forms")
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--prefix-groups", type=int, default=1)
    ap.add_argument("--turns", type=int, default=1, help="> 1: multi-turn conversations")
    ap.add_argument("--vocab", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--timeout-s", type=float, default=600.0)


def spec_for(ns, rate: float, seed: int | None = None) -> WorkloadSpec:
    return WorkloadSpec(
        num_requests=ns.num_requests,
        arrival="concurrency" if ns.concurrency > 0 else ns.arrival, rate=rate,
        burstiness=ns.burstiness, input=ns.input, output=ns.output,
        shared_prefix=ns.shared_prefix, prefix_groups=ns.prefix_groups, turns=ns.turns,
        vocab=ns.vocab, seed=ns.seed if seed is None else seed)


async def sweep(url: str, ns, label: str) -> list[dict]:
    model = await served_model(url)
    rates = [float(x) for x in ns.rates.split(",")] if ns.concurrency <= 0 else [0.0]
    runs = []
    for i, rate in enumerate(rates):
        # each rate its own prompts (no prefix-cache hits from the previous rate's run), the
        # same for every setup measured with the same seed
        spec = spec_for(ns, rate if rate > 0 else 1.0, seed=ns.seed + 1000 * i)
        reqs = build(spec)
        tag = f"{label} c={ns.concurrency}" if ns.concurrency > 0 else f"{label} {rate} req/s"
        results, dur = await run_once(url, model, reqs, ns.concurrency, tag, ns.timeout_s)
        summary = summarize(results, dur, ns.slo_ttft_ms / 1e3, ns.slo_tpot_ms / 1e3)
        summary.update(rate=rate, concurrency=ns.concurrency, model=model, setup=label)
        runs.append({"label": tag, "summary": summary,
                     "requests": [result_dict(r) for r in results]})
        print(format_summary(tag, summary), flush=True)
    return runs


def format_summary(tag: str, s: dict) -> str:
    f = lambda d: f"{d['p50']:.0f}/{d['p90']:.0f}/{d['p99']:.0f}"  # noqa: E731
    return (f"{tag}: {s['completed']}/{s['requests']} ok, {s['request_throughput']:.3f} req/s, "
            f"{s['output_throughput']:.1f} out tok/s, goodput {s['goodput']:.3f} req/s "
            f"({s['good']} within SLO) | TTFT p50/p90/p99 {f(s['ttft_ms'])} ms | "
            f"TPOT {f(s['tpot_ms'])} ms | ITL p99 {s['itl_ms']['p99']:.0f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--label", default="endpoint")
    ap.add_argument("--out", default="", help="write the runs as JSON here")
    ap.add_argument("--plot", default="", help="PNG prefix: <prefix>-cdf.png, -goodput.png")
    add_workload_args(ap)
    ns = ap.parse_args(argv)
    runs = asyncio.run(sweep(ns.url, ns, ns.label))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(runs, indent=1))
    if ns.plot:
        Path(ns.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_cdfs(runs, f"{ns.plot}-cdf.png")
        if ns.concurrency <= 0:
            plot_goodput({ns.label: [(r["summary"]["rate"], r["summary"]["goodput"])
                                     for r in runs]}, f"{ns.plot}-goodput.png")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
