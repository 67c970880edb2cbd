"""Does vLLM's own client agree with ours? Run `vllm bench serve` (the installed package,
through `python -m bench.vllm_cli`, forked by the zygote PDSERVE_ZYGOTE names, if any) and
`bench.serve` with the same command line (vLLM's
flags: random prompts from the tokenizer, or a ShareGPT file) against the same endpoint,
one after the other, and print their result files' fields side by side.

    .venv/bin/python -m bench.check_vllm_bench --url http://127.0.0.1:8000 \\
        --tokenizer <model dir> --input-len 512 --output-len 32 --num-requests 16

At a fixed concurrency the two clients see the same service, so their medians should
agree within the machine's noise; request and token counts must agree exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

METRICS = ("completed", "total_output_tokens", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "request_goodput")


def common_argv(url: str, model: str, tokenizer: str, ns) -> list[str]:
    """`vllm bench serve` flags both clients take, with the same meaning."""
    argv = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", tokenizer, "--num-prompts", str(ns.num_requests),
            "--max-concurrency", str(ns.concurrency), "--request-rate", "inf",
            "--ignore-eos", "--seed", str(ns.seed), "--num-warmups", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--goodput", f"ttft:{ns.slo_ttft_ms:g}", f"tpot:{ns.slo_tpot_ms:g}"]
    if getattr(ns, "dataset_path", ""):
        return argv + ["--dataset-name", "sharegpt", "--dataset-path", ns.dataset_path]
    return argv + ["--dataset-name", "random", "--random-input-len", str(ns.input_len),
                   "--random-output-len", str(ns.output_len), "--random-range-ratio", "0"]


def run_vllm_bench(argv: list[str], out_dir: Path, timeout_s: float) -> dict:
    from bench.local_cluster import run_module

    p = run_module("bench.vllm_cli", ["bench", "serve", *argv, "--save-result",
                                      "--result-dir", str(out_dir),
                                      "--result-filename", "vllm.json"], timeout=timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({p.returncode}):\n"
                           f"{p.stdout[-3000:]}")
    return json.loads((out_dir / "vllm.json").read_text())


def run_ours(argv: list[str], out_dir: Path) -> dict:
    from bench.serve import main as serve

    rc = serve([*argv, "--label", "bench.serve", "--disable-tqdm", "--save-result",
                "--result-dir", str(out_dir), "--result-filename", "ours.json"])
    if rc != 0:
        raise RuntimeError(f"bench.serve exited {rc}")
    return json.loads((out_dir / "ours.json").read_text())


def compare(url: str, model: str, tokenizer: str, ns) -> dict[str, tuple[float, float]]:
    """The same `vllm bench serve` command line through both clients, one after the
    other; the fields of their result files side by side."""
    argv = common_argv(url, model, tokenizer, ns)
    with tempfile.TemporaryDirectory() as d:
        theirs = run_vllm_bench(argv, Path(d), ns.timeout_s)
        ours = run_ours(argv, Path(d))
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
    ap.add_argument("--dataset-path", default="",
                    help="a ShareGPT-format JSON file instead of random prompts")
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
