"""Drive a pdserve cluster with concurrent streaming requests and print latency and KV figures.

    # start a local cluster (bundled SmolLM2), measure, stop it:
    .venv/bin/python -m bench.bench_cluster --start --requests 24 --concurrency 4
    # or against a running OpenAI-compatible endpoint:
    .venv/bin/python -m bench.bench_cluster --url http://127.0.0.1:8000

Prompts are random token ids (unique per request, so no prefix-cache hits), generation is
--output-tokens long with ignore_eos. Per request: TTFT, TPOT (mean gap after the first
token), every inter-token gap, and the KV transfer record the decode worker returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from bench.stats import percentile


def pct(xs, q):
    return percentile(list(xs), q)


async def one(client, url, model, ids, out_tokens):
    t0 = time.perf_counter()
    first = None
    stamps = []
    kv = None
    n = 0
    async with client.stream("POST", f"{url}/v1/completions", json={
            "model": model, "prompt": ids, "max_tokens": out_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("kv_transfer"):
                kv = ev["kv_transfer"]
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            if ev["choices"] and ev["choices"][0]["text"]:
                t = time.perf_counter()
                if first is None:
                    first = t
                stamps.append(t)
    end = time.perf_counter()
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": first - t0, "e2e": end - t0, "tokens": n,
            "tpot": (end - first) / max(n - 1, 1), "itl": itl, "kv": kv,
            "prompt_tokens": len(ids)}


async def run(ns) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(f"{ns.url}/v1/models")).json()["data"][0]["id"]
        rng = random.Random(ns.seed)
        prompts = [[rng.randrange(200, ns.vocab) for _ in range(ns.prompt_tokens)]
                   for _ in range(ns.requests + ns.warmup)]
        for p in prompts[:ns.warmup]:
            await one(client, ns.url, model, p, 4)
        sem = asyncio.Semaphore(ns.concurrency)

        async def bounded(p):
            async with sem:
                return await one(client, ns.url, model, p, ns.output_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*[bounded(p) for p in prompts[ns.warmup:]])
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in res]
    tpot = [r["tpot"] for r in res]
    itl = [g for r in res for g in r["itl"]]
    kvs = [r["kv"] for r in res if r["kv"] and r["kv"]["status"] == "ok"]
    out_tok = sum(r["tokens"] for r in res)
    in_tok = sum(r["prompt_tokens"] for r in res)
    summary = {
        "model": model, "requests": len(res), "concurrency": ns.concurrency,
        "prompt_tokens": ns.prompt_tokens, "output_tokens": ns.output_tokens,
        "wall_s": wall, "req_per_s": len(res) / wall, "output_tok_per_s": out_tok / wall,
        "total_tok_per_s": (in_tok + out_tok) / wall,
        "ttft_ms": {"p50": pct(ttft, 50) * 1e3, "p99": pct(ttft, 99) * 1e3},
        "tpot_ms": {"p50": pct(tpot, 50) * 1e3, "p99": pct(tpot, 99) * 1e3},
        "itl_ms": {"p50": pct(itl, 50) * 1e3, "p99": pct(itl, 99) * 1e3},
        "kv_transfers": len(kvs),
        "kv_bytes_per_req": statistics.mean(k["bytes"] for k in kvs) if kvs else 0,
        "kv_ms": {"p50": pct([k["seconds"] for k in kvs], 50) * 1e3,
                  "p99": pct([k["seconds"] for k in kvs], 99) * 1e3},
        "kv_failed": sum(1 for r in res if r["kv"] and r["kv"]["status"] != "ok"),
        "kv_gbps": {"p50": pct([k["bytes"] / k["seconds"] / 1e9 for k in kvs], 50),
                    "min": min((k["bytes"] / k["seconds"] / 1e9 for k in kvs), default=0)},
        "kv_read_ms": {"p50": pct([k["read_seconds"] for k in kvs], 50) * 1e3,
                       "p99": pct([k["read_seconds"] for k in kvs], 99) * 1e3},
        "kv_read_gbps": {"p50": pct([k["bytes"] / k["read_seconds"] / 1e9 for k in kvs
                                     if k["read_seconds"] > 0], 50)},
        "kv_descriptors_per_req": statistics.mean(k["descriptors"] for k in kvs) if kvs else 0,
    }
    if kvs:  # the memory ceiling on this machine, same bytes, measured in this run
        nbytes = int(summary["kv_bytes_per_req"])
        a, b = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        best = min(_timed(np.copyto, b, a) for _ in range(7))
        summary["memcpy_gbps"] = nbytes / best / 1e9
    return summary


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def show(s: dict) -> None:
    print(f"\nmodel {s['model']}: {s['requests']} requests, concurrency {s['concurrency']}, "
          f"{s['prompt_tokens']} prompt + {s['output_tokens']} output tokens each")
    rows = [
        ("TTFT p50 / p99 (ms)", f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f}"),
        ("TPOT p50 / p99 (ms)", f"{s['tpot_ms']['p50']:.1f} / {s['tpot_ms']['p99']:.1f}"),
        ("ITL p50 / p99 (ms)", f"{s['itl_ms']['p50']:.1f} / {s['itl_ms']['p99']:.1f}"),
        ("throughput (req/s)", f"{s['req_per_s']:.2f}"),
        ("output tokens/s", f"{s['output_tok_per_s']:.1f}"),
        ("total tokens/s", f"{s['total_tok_per_s']:.1f}"),
        ("KV bytes per request (MB)", f"{s['kv_bytes_per_req'] / 1e6:.1f}"),
        ("KV transfer p50 / p99 (ms)", f"{s['kv_ms']['p50']:.2f} / {s['kv_ms']['p99']:.2f}"),
        ("KV GB/s p50 (min)", f"{s['kv_gbps']['p50']:.2f} ({s['kv_gbps']['min']:.2f})"),
        ("  of which UCX READ p50 / p99 (ms)",
         f"{s['kv_read_ms']['p50']:.2f} / {s['kv_read_ms']['p99']:.2f}"),
        ("  UCX READ GB/s p50", f"{s['kv_read_gbps']['p50']:.2f}"),
        ("in-process memcpy of same bytes GB/s", f"{s.get('memcpy_gbps', float('nan')):.2f}"),
        ("KV transfers ok / failed", f"{s['kv_transfers']} / {s['kv_failed']}"),
        ("KV descriptors per request", f"{s['kv_descriptors_per_req']:.0f}"),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--start", action="store_true", help="start a local cluster and stop it")
    ap.add_argument("--model", default=None, help="with --start: model dir (default bundled)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=40000, help="upper bound of random token ids")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="with --start: extra `pdserve serve` argument (repeatable)")
    ns = ap.parse_args(argv)
    proc = None
    if ns.start:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pdserve.models import ensure_bundled_model
        from bench.local_cluster import start_cluster, stop_cluster_proc

        model = ns.model or str(ensure_bundled_model())
        c = start_cluster(model, Path("/tmp/pdserve-bench-cluster.log"),
                          extra=["--kv-cache-gib", "1", *ns.serve_arg])
        ns.url, proc = c.url, c.proc
    try:
        s = asyncio.run(run(ns))
    finally:
        if proc is not None:
            stop_cluster_proc(proc)
    show(s)
    if ns.out:
        ns.out.write_text(json.dumps(s, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
