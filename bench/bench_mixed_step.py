"""What a prompt chunk adds to a decode step: N streams decoding alone, then beside a long
prompt computed k tokens a step (vLLM's own `long_prefill_token_threshold`), in one vLLM
engine in this process, bound to one core. The latency model's `mixed` term and the step
budget's floor (pdserve/latency.py, pdserve/step_budget.py) are about this cost.

    .venv/bin/python -m bench.bench_mixed_step                  # 6 streams, 600-token prompts
    .venv/bin/python -m bench.bench_mixed_step --streams 9 --ctx 1024 --chunks 1,4,16,64

Prints one row per chunk size: the median plain decode step, the median step with the
chunk, and the difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=600, help="each stream's prompt tokens")
    ap.add_argument("--chunks", default="1,16,64", help="prompt tokens a step, comma-separated")
    ap.add_argument("--steps", type=int, default=40, help="steps measured per setting")
    ap.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1)
    ns = ap.parse_args(argv)
    chunks = [int(x) for x in ns.chunks.split(",")]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # the engine core in-process
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(ns.core)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from pdserve.models import ensure_bundled_model

    model = ns.model or str(ensure_bundled_model())
    eng = LLMEngine.from_engine_args(EngineArgs(
        model=model, enforce_eager=True, max_model_len=4096, block_size=128,
        max_num_batched_tokens=4096, max_num_seqs=64, enable_prefix_caching=True))
    sched = eng.engine_core.engine_core.scheduler
    base = sched.scheduler_config.long_prefill_token_threshold
    out = ns.steps * (len(chunks) * 2 + 2) + 64

    def step() -> float:
        t = time.perf_counter()
        eng.step()
        return time.perf_counter() - t

    stream = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0)
    for i in range(ns.streams):
        ids = [(7 * j + i) % 900 + 10 for j in range(ns.ctx)]
        eng.add_request(f"s{i}", {"prompt_token_ids": ids}, stream)
    while len(sched.running) < ns.streams or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        step()
    print(f"{ns.streams} streams, {ns.ctx}-token prompts, core {ns.core}, {model}")
    print(f"{'chunk':>6} {'decode ms':>10} {'with chunk ms':>14} {'added ms':>9}")
    for n, k in enumerate(chunks):
        sched.scheduler_config.long_prefill_token_threshold = base
        plain = [step() for _ in range(ns.steps)]
        sched.scheduler_config.long_prefill_token_threshold = k
        ids = [(5 * j + n) % 900 + 10 for j in range(k * ns.steps + 8)]
        eng.add_request(f"p{n}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=1))
        mixed = [step() for _ in range(ns.steps)]
        eng.abort_request([f"p{n}"])
        d, m = statistics.median(plain) * 1e3, statistics.median(mixed) * 1e3
        print(f"{k:>6} {d:>10.2f} {m:>14.2f} {m - d:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
