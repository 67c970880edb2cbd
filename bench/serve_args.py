"""`bench.serve`'s command line in `vllm bench serve`'s names, and its result file in vLLM's
shape.

vLLM's own dataset flags come from vLLM (`add_dataset_parser`: `--dataset-name random|
sharegpt|custom|...`, `--dataset-path`, `--random-input-len`, `--num-prompts`, `--seed`,
...) and its own code samples them, so they mean what they mean there. The serving flags
are vLLM's names with vLLM's meaning: `--base-url`/`--host`/`--port`, `--endpoint`,
`--backend openai|openai-chat`, `--model`, `--tokenizer`, `--request-rate` (inf: all at
once), `--burstiness` (the gaps' gamma shape), `--max-concurrency`, `--ignore-eos`,
`--goodput ttft:MS tpot:MS`, `--save-result`/`--result-dir`/`--result-filename`,
`--percentile-metrics`, `--metric-percentiles`, `--num-warmups`, `--disable-tqdm`.
Without `--dataset-name` the harness's own synthetic workload runs (`--input`, `--output`,
`--rates`, ...: token-id prompts of exact lengths, end of sequence ignored).
"""

from __future__ import annotations

import argparse
import math
import time

from bench.stats import percentile

METRICS = ("ttft", "tpot", "itl", "e2el")


def add_workload_args(ap: argparse.ArgumentParser, seed: bool = True) -> None:
    """The synthetic workload's flags (`seed`: also --seed, which vLLM's dataset flags
    bring themselves)."""
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--arrival", choices=["poisson", "bursty"], default="poisson")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="bursty: the gaps' gamma shape, as vLLM's flag (< 1 bursts)")
    ap.add_argument("--rates", default="0.5",
                    help="comma list of request rates (req/s; inf: all at once)")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="> 0: at most this many in flight (alone: all sent at once)")
    ap.add_argument("--input", default="fixed:1024",
                    help="prompt tokens: fixed:N, uniform:A:B, mix:P:LONG:SHORT")
    ap.add_argument("--output", default="fixed:64", help="output tokens, same forms")
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--prefix-groups", type=int, default=1)
    ap.add_argument("--turns", type=int, default=1, help="> 1: multi-turn conversations")
    ap.add_argument("--vocab", type=int, default=40000)
    if seed:
        ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--timeout-s", type=float, default=600.0)


def build_parser(doc: str | None = None) -> argparse.ArgumentParser:
    from vllm.benchmarks.datasets import add_dataset_parser

    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_parser(ap)                   # vLLM's: --dataset-*, --num-prompts, --seed
    ap.set_defaults(dataset_name=None, num_prompts=None)
    add_workload_args(ap, seed=False)
    ap.add_argument("--url", default=None, help="the endpoint (or vLLM's --base-url)")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backend", default="openai", choices=["openai", "openai-chat", "vllm"])
    ap.add_argument("--endpoint", default=None,
                    help="/v1/completions or /v1/chat/completions (default: the backend's)")
    ap.add_argument("--model", default=None, help="served model name (default: /v1/models)")
    ap.add_argument("--tokenizer", default=None, help="for datasets (default: --model)")
    ap.add_argument("--request-rate", default=None, help="req/s, or inf: all at once")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--goodput", nargs="+", default=None, help="ttft:MS tpot:MS")
    ap.add_argument("--save-result", action="store_true", help="a result file as vLLM's")
    ap.add_argument("--result-dir", default=None)
    ap.add_argument("--result-filename", default=None)
    ap.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    ap.add_argument("--metric-percentiles", default="99")
    ap.add_argument("--disable-tqdm", action="store_true")
    ap.add_argument("--num-warmups", type=int, default=0)
    ap.add_argument("--label", default="endpoint")
    ap.add_argument("--out", default="", help="write the runs as JSON here (ours)")
    ap.add_argument("--plot", default="", help="PNG prefix: <prefix>-cdf.png, -goodput.png")
    return ap


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """vLLM's names onto the harness's settings."""
    ns.url = (ns.base_url or ns.url or f"http://{ns.host}:{ns.port}").rstrip("/")
    ns.api_model = ns.model
    ns.endpoint = ns.endpoint or ("/v1/chat/completions" if ns.backend == "openai-chat"
                                  else "/v1/completions")
    if ns.num_prompts is not None:
        ns.num_requests = ns.num_prompts
    ns.rates_given = ns.request_rate is not None
    if ns.request_rate is not None:
        ns.rates = ns.request_rate
    if ns.max_concurrency is not None:
        ns.concurrency = ns.max_concurrency
    if ns.burstiness != 1.0:
        ns.arrival = "bursty"
    for g in ns.goodput or ():
        k, _, v = g.partition(":")
        if k not in ("ttft", "tpot") or not v:
            raise SystemExit(f"--goodput takes ttft:MS and tpot:MS, got {g!r}")
        setattr(ns, f"slo_{k}_ms", float(v))
    bad = set(ns.percentile_metrics.split(",")) - set(METRICS)
    if bad:
        raise SystemExit(f"--percentile-metrics: unknown {sorted(bad)}; {','.join(METRICS)}")
    return ns


def _word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def vllm_result(run: dict, ns) -> dict:
    """One run as `vllm bench serve --save-result` writes it (the fields its readers use)."""
    import numpy as np

    s, reqs = run["summary"], run["requests"]
    ok = [r for r in reqs if r["ok"]]
    rate = s["rate"]
    out = {
        "date": time.strftime("%Y%m%d-%H%M%S"), "endpoint_type": ns.backend,
        "backend": ns.backend, "label": ns.label, "model_id": s["model"],
        "tokenizer_id": ns.tokenizer or s["model"], "num_prompts": len(reqs),
        "request_rate": rate if rate == "inf" else float(rate),
        "burstiness": ns.burstiness, "max_concurrency": ns.concurrency or None,
        "duration": s["duration_s"], "completed": s["completed"], "failed": s["failed"],
        "total_input_tokens": sum(r["prompt_tokens"] for r in ok),
        "total_output_tokens": sum(r["output_tokens"] for r in ok),
        "request_throughput": s["request_throughput"],
        "request_goodput": s["goodput"] if ns.goodput else None,
        "output_throughput": s["output_throughput"],
        "total_token_throughput": s["total_token_throughput"],
        "input_lens": [r["prompt_tokens"] for r in reqs],
        "output_lens": [r["output_tokens"] for r in reqs],
        "ttfts": [r["ttft"] if r["ok"] else 0.0 for r in reqs],
        "itls": [r["itl"] for r in reqs],
        "generated_texts": [r["text"] for r in reqs],
        "errors": [r["error"] for r in reqs],
    }
    series = {"ttft": [r["ttft"] for r in ok], "tpot": [r["tpot"] for r in ok],
              "itl": [g for r in ok for g in r["itl"]], "e2el": [r["e2e"] for r in ok]}
    qs = [float(q) for q in ns.metric_percentiles.split(",")]
    for m in ns.percentile_metrics.split(","):
        ms = [x * 1e3 for x in series[m] if not math.isnan(x)]
        out[f"mean_{m}_ms"] = float(np.mean(ms)) if ms else 0.0
        out[f"median_{m}_ms"] = percentile(ms, 50) if ms else 0.0
        out[f"std_{m}_ms"] = float(np.std(ms)) if ms else 0.0
        for q in qs:
            out[f"p{_word(q)}_{m}_ms"] = percentile(ms, q) if ms else 0.0
    return out
