"""Does vLLM's own client agree with ours? Run `vllm bench serve` (the installed package,
through `python -m bench.vllm_cli`) and `bench.serve` against the same endpoint, the same
lengths and the same concurrency, one after the other, and print both side by side.

    .venv/bin/python -m bench.check_vllm_bench --url http://127.0.0.1:8000 \\
        --tokenizer <model dir> --input-len 512 --output-len 32 --num-requests 16

At a fixed concurrency the two clients see the same service, so their medians should
agree within the machine's noise; request and token counts must agree exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("completed", "total_output_tokens", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "request_goodput")


def run_vllm_bench(url: str, model: str, tokenizer: str, ns, out_dir: Path) -> dict:
    argv = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(ns.input_len), "--random-output-len", str(ns.output_len),
            "--random-range-ratio", "0", "--num-prompts", str(ns.num_requests),
            "--max-concurrency", str(ns.concurrency), "--request-rate", "inf",
            "--ignore-eos", "--seed", str(ns.seed), "--num-warmups", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--goodput", f"ttft:{ns.slo_ttft_ms:g}", f"tpot:{ns.slo_tpot_ms:g}",
            "--save-result", "--result-dir", str(out_dir), "--result-filename", "vllm.json"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=ns.timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({p.returncode}):\n"
                           f"{(p.stdout + p.stderr)[-3000:]}")
    return json.loads((out_dir / "vllm.json").read_text())


def run_ours(url: str, ns) -> dict:
    from bench.serve import sweep

    args = argparse.Namespace(
        num_requests=ns.num_requests, arrival="poisson", burstiness=1.0, rates="0",
        concurrency=ns.concurrency, input=f"fixed:{ns.input_len}",
        output=f"fixed:{ns.output_len}", shared_prefix=0, prefix_groups=1, turns=1,
        vocab=ns.vocab, seed=ns.seed, slo_ttft_ms=ns.slo_ttft_ms, slo_tpot_ms=ns.slo_tpot_ms,
        timeout_s=ns.timeout_s)
    (run,) = asyncio.run(sweep(url, args, "bench.serve"))
    s = run["summary"]
    return {"completed": s["completed"],
            "total_output_tokens": sum(r["output_tokens"] for r in run["requests"] if r["ok"]),
            "median_ttft_ms": s["ttft_ms"]["p50"], "p99_ttft_ms": s["ttft_ms"]["p99"],
            "median_tpot_ms": s["tpot_ms"]["p50"], "p99_tpot_ms": s["tpot_ms"]["p99"],
            "median_itl_ms": s["itl_ms"]["p50"], "request_goodput": s["goodput"]}


def compare(url: str, model: str, tokenizer: str, ns) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as d:
        theirs = run_vllm_bench(url, model, tokenizer, ns, Path(d))
    ours = run_ours(url, ns)
    return {k: (float(ours[k]), float(theirs.get(k, float("nan")))) for k in METRICS}


def format_rows(rows: dict[str, tuple[float, float]]) -> str:
    out = [f"{'metric':<22} {'bench.serve':>12} {'vllm bench':>12} {'ratio':>7}"]
    for k, (a, b) in rows.items():
        r = a / b if b else float("nan")
        out.append(f"{k:<22} {a:>12.2f} {b:>12.2f} {r:>7.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="", help="served model name (default: /v1/models)")
    ap.add_argument("--tokenizer", required=True, help="the model directory")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--out", default="")
    ns = ap.parse_args(argv)
    if not ns.model:
        from bench.serve import served_model
        ns.model = asyncio.run(served_model(ns.url))
    rows = compare(ns.url, ns.model, ns.tokenizer, ns)
    print(format_rows(rows), flush=True)
    if ns.out:
        Path(ns.out).write_text(json.dumps(rows, indent=1))
    ok = rows["completed"][0] == rows["completed"][1] == ns.num_requests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
