"""Serving benchmark against any OpenAI-compatible endpoint: goodput under TTFT/TPOT SLOs.

    .venv/bin/python -m bench.serve --url http://127.0.0.1:8000 --rates 0.25,0.5,1 \\
        --num-requests 24 --input mix:0.25:2048:256 --output fixed:64 \\
        --slo-ttft-ms 3000 --slo-tpot-ms 100 --out results/run.json --plot results/run

or with `vllm bench serve`'s flags and datasets (bench/serve_args.py), e.g.

    .venv/bin/python -m bench.serve --base-url http://127.0.0.1:8000 --backend openai-chat \\
        --dataset-name sharegpt --dataset-path sharegpt.json --tokenizer MODEL_DIR \\
        --num-prompts 100 --request-rate 2 --goodput ttft:3000 tpot:100 --save-result

Streams every request (`/v1/completions` or `/v1/chat/completions`), measures TTFT, TPOT,
every inter-token gap and end-to-end latency, and reports p50/p90/p99, requests/s,
tokens/s and goodput (requests/s within both SLOs), with a tqdm bar while it runs. One run
per rate, same seeded workload in each. Writes our JSON (summary + every request), vLLM's
result file (`--save-result`) and PNG plots: latency CDFs, and goodput against request
rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from pdserve.loop_lag import Stalls, watch

from bench.serve_args import add_workload_args  # noqa: F401 - the workload flags, for others
from bench.stats import Result, parse_route, result_dict, summarize
from bench.workload import Request, WorkloadSpec, build, from_samples


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def body(model: str, req: Request, endpoint: str, ignore_eos: bool) -> dict:
    """The request as `vllm bench serve`'s openai and openai-chat backends send it; a
    synthetic prompt goes as token ids, a dataset's as text."""
    b: dict = {"model": model, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    if ignore_eos:
        b["ignore_eos"] = True
    if endpoint == CHAT:
        if not req.text:
            raise ValueError("chat needs text prompts: give --dataset-name (and --tokenizer)")
        return {**b, "messages": [{"role": "user", "content": req.text}],
                "max_completion_tokens": req.max_tokens}
    return {**b, "prompt": req.text or req.prompt, "max_tokens": req.max_tokens}


def _piece(ev: dict) -> str:
    c = ev["choices"][0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def one(client: httpx.AsyncClient, url: str, model: str, req: Request,
              endpoint: str = COMPLETIONS, ignore_eos: bool = True) -> Result:
    res = Result(req.index, False, req.prompt_tokens)
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{url}{endpoint}",
                                 json=body(model, req, endpoint, ignore_eos)) as r:
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
                if ev.get("kv_transfer"):                        # pdserve, disaggregated
                    res.kv = ev["kv_transfer"]
                if ev.get("pdserve_route") and not res.route:   # pdserve, streamed
                    res.route_text = ev["pdserve_route"]
                    res.route, res.pred_ttft, res.pred_tpot = parse_route(res.route_text)
                piece = _piece(ev) if ev.get("choices") else ""
                if piece:
                    res.text += piece
                    now = time.perf_counter()
                    res.token_times.append(now)
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


async def run_once(url: str, model: str, reqs: list[Request], concurrency: int,
                   label: str, timeout_s: float, endpoint: str = COMPLETIONS,
                   ignore_eos: bool = True, tqdm_off: bool = False,
                   stalls: Stalls | None = None) -> tuple[list[Result], float]:
    """Send `reqs` at their offsets, at most `concurrency` in flight when > 0 (vLLM's
    `--request-rate` with `--max-concurrency`); a tqdm bar counts them done. `stalls`:
    records this client's own event-loop stalls meanwhile (pdserve/loop_lag.py)."""
    from tqdm import tqdm

    bar = tqdm(total=len(reqs), desc=label, disable=tqdm_off, file=sys.stderr)
    limits = httpx.Limits(max_connections=max(64, concurrency * 2))
    sem = asyncio.Semaphore(concurrency) if concurrency > 0 else None
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def send(r):
            await asyncio.sleep(max(0.0, r.at - (time.perf_counter() - t0)))
            if sem is None:
                res = await one(client, url, model, r, endpoint, ignore_eos)
            else:
                async with sem:
                    res = await one(client, url, model, r, endpoint, ignore_eos)
            bar.update(1)
            return res
        # on the token times' clock
        lag = (asyncio.create_task(watch(stalls, clock=time.perf_counter))
               if stalls is not None else None)
        try:
            results = await asyncio.gather(*[send(r) for r in reqs])
        finally:
            bar.close()
            if lag is not None:
                lag.cancel()
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


def spec_for(ns, rate: float, seed: int | None = None) -> WorkloadSpec:
    at_once = rate <= 0 or not math.isfinite(rate)      # vLLM's --request-rate inf
    return WorkloadSpec(
        num_requests=ns.num_requests, arrival="concurrency" if at_once else ns.arrival,
        rate=rate if math.isfinite(rate) and rate > 0 else 1.0,
        burstiness=ns.burstiness, input=ns.input, output=ns.output,
        shared_prefix=ns.shared_prefix, prefix_groups=ns.prefix_groups, turns=ns.turns,
        vocab=ns.vocab, seed=ns.seed if seed is None else seed)


def rates_of(ns) -> list[float]:
    """`--rates` (or vLLM's `--request-rate`); with `--concurrency` alone, all at once."""
    if ns.concurrency > 0 and not getattr(ns, "rates_given", False):
        return [math.inf]
    return [float(x) for x in str(ns.rates).split(",")]


def requests_for(ns, spec: WorkloadSpec, tok) -> list[Request]:
    """The synthetic workload's requests, or a vLLM dataset's (`--dataset-name`) sampled by
    vLLM's own code, at the spec's arrivals."""
    if getattr(ns, "dataset_name", None) is None:
        return build(spec)
    from vllm.benchmarks.datasets import get_samples

    vns = argparse.Namespace(**{**vars(ns), "num_prompts": ns.num_requests,
                                "seed": spec.seed})
    return from_samples(get_samples(vns, tok), spec)


async def sweep(url: str, ns, label: str) -> list[dict]:
    # vLLM's --model names the served model (`api_model`); other callers' `model` is a
    # directory to start servers from
    model = getattr(ns, "api_model", None) or await served_model(url)
    endpoint = getattr(ns, "endpoint", None) or COMPLETIONS
    dataset = getattr(ns, "dataset_name", None)
    tok = None
    if dataset is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(ns.tokenizer or model)
    # a synthetic prompt's length is exact only if the end of sequence never cuts it
    ignore_eos = getattr(ns, "ignore_eos", False) or dataset is None
    runs = []
    offsets = getattr(ns, "rate_seed_offsets", None)   # bench.matrix: by rate multiplier
    for i, rate in enumerate(rates_of(ns)):
        # each rate its own prompts (no prefix-cache hits from the previous rate's run), the
        # same for every setup measured with the same seed
        spec = spec_for(ns, rate, seed=ns.seed + (offsets[i] if offsets else 1000 * i))
        reqs = requests_for(ns, spec, tok)
        tag = f"{label} {rate:g} req/s" + (f" c={ns.concurrency}" if ns.concurrency else "")
        warm = getattr(ns, "num_warmups", 0)
        if warm and reqs:     # vLLM's --num-warmups: the first request, one at a time
            await run_once(url, model, [replace(reqs[0], at=0.0)] * warm, 1, f"{tag} warm-up",
                           ns.timeout_s, endpoint, ignore_eos, True)
        stalls = Stalls()
        results, dur = await run_once(url, model, reqs, ns.concurrency, tag, ns.timeout_s,
                                      endpoint, ignore_eos, getattr(ns, "disable_tqdm", False),
                                      stalls)
        summary = summarize(results, dur, ns.slo_ttft_ms / 1e3, ns.slo_tpot_ms / 1e3)
        summary.update(rate=rate if math.isfinite(rate) else "inf",
                       concurrency=ns.concurrency, model=model, setup=label,
                       endpoint=endpoint, client_stalls=len(stalls.seen),
                       client_stall_max_ms=stalls.worst_s() * 1e3)
        runs.append({"label": tag, "summary": summary,
                     "requests": [result_dict(r) for r in results],
                     "client_stalls": stalls.seen})
        print(format_summary(tag, summary), flush=True)
        if stalls.seen:     # the gaps the client saw then are its own, not the server's
            print(f"  (this client's event loop stalled {len(stalls.seen)} times for "
                  f"{stalls.min_s * 1e3:.0f} ms or more, at worst {stalls.worst_s() * 1e3:.0f} "
                  "ms: bench.step_trace --gaps names the gaps inside them)", flush=True)
    return runs


def format_summary(tag: str, s: dict) -> str:
    f = lambda d: f"{d['p50']:.0f}/{d['p90']:.0f}/{d['p99']:.0f}"  # noqa: E731
    return (f"{tag}: {s['completed']}/{s['requests']} ok, {s['request_throughput']:.3f} req/s, "
            f"{s['output_throughput']:.1f} out tok/s, goodput {s['goodput']:.3f} req/s "
            f"({s['good']} within SLO) | TTFT p50/p90/p99 {f(s['ttft_ms'])} ms | "
            f"TPOT {f(s['tpot_ms'])} ms | ITL p99 {s['itl_ms']['p99']:.0f} ms")


def main(argv=None) -> int:
    from bench.serve_args import build_parser, resolve, vllm_result

    ns = resolve(build_parser(__doc__).parse_args(argv))
    runs = asyncio.run(sweep(ns.url, ns, ns.label))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(runs, indent=1))
    if ns.save_result:
        d = Path(ns.result_dir or ".")
        d.mkdir(parents=True, exist_ok=True)
        for i, run in enumerate(runs):
            name = ns.result_filename or f"{ns.label}-{run['summary']['rate']}qps.json"
            if len(runs) > 1 and ns.result_filename:
                name = f"{Path(name).stem}-{i}{Path(name).suffix}"
            (d / name).write_text(json.dumps(vllm_result(run, ns), indent=1))
    if ns.plot:
        Path(ns.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_cdfs(runs, f"{ns.plot}-cdf.png")
        if len(runs) > 1 or ns.concurrency <= 0:
            plot_goodput({ns.label: [(float(r["summary"]["rate"]), r["summary"]["goodput"])
                                     for r in runs]}, f"{ns.plot}-goodput.png")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
