"""One engine process or two: pdserve's engine at one rank on CPU with vLLM's worker inside
the engine core (the uniprocess executor, pdserve's default) against vLLM's multiprocess
executor (`--distributed-executor-backend mp`, what vLLM's CPU platform picks), started
one after the other on the same core in one run.

    .venv/bin/python -m bench.bench_engine_start                 # tiny model, 2 starts each
    .venv/bin/python -m bench.bench_engine_start --model PATH --repeat 3

Prints per start: seconds to ready, CPU seconds of the engine's processes by then, the
processes, and a greedy generation's time per output token; the generations must match.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12


def child(model: str, executor: str, cores: str) -> dict:
    """In a fresh interpreter: start, generate, report (one JSON line on stdout)."""
    import asyncio

    import psutil

    t0 = time.monotonic()
    from pdserve.config import EngineConfig
    from pdserve.engine import build_engine

    vllm = {} if executor == "uni" else {"distributed_executor_backend": executor}
    cfg = EngineConfig(model=model, cpu_cores=cores, kv_cache_bytes=128 << 20,
                       block_size=32, max_model_len=1024, vllm=vllm)
    eng = build_engine(cfg, None, None)
    ready = time.monotonic() - t0
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    names = sorted(p.name() for p in procs[1:])

    from vllm import SamplingParams

    async def gen(rid: str, n: int):
        out, t = None, time.monotonic()
        async for o in eng.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0,
                                                           ignore_eos=True), rid):
            out = o
        return list(out.outputs[0].token_ids), time.monotonic() - t

    async def run():
        await gen("warm", 4)
        _, t1 = await gen("one", 1)       # the prompt and first token alone
        ids, tn = await gen("many", 65)
        return ids, (tn - t1) / 64

    ids, tpot = asyncio.run(run())
    eng.shutdown()
    return {"executor": executor, "ready_s": ready, "cpu_s": cpu, "procs": names,
            "tpot_ms": tpot * 1e3, "ids": ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="default: the tiny test model")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cores", default="0")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model, a.child, a.cores)), flush=True)
        return 0
    model = a.model
    if not model:
        from pdserve.models import build_tiny_model
        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    rows = []
    for i in range(a.repeat):
        for ex in ("uni", "mp"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_engine_start", "--model", model,
                 "--cores", a.cores, "--child", ex],
                cwd=ROOT, capture_output=True, text=True, timeout=900,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(line[-1])
            rows.append(r)
            print(f"{ex:4} start {i + 1}: ready {r['ready_s']:5.1f} s  cpu {r['cpu_s']:5.1f} s  "
                  f"TPOT {r['tpot_ms']:6.1f} ms  processes {', '.join(r['procs'])}", flush=True)
    same = len({tuple(r["ids"]) for r in rows}) == 1
    for ex in ("uni", "mp"):
        rs = [r for r in rows if r["executor"] == ex]
        ready, cpu, tpot = (float(np.median([r[k] for r in rs]))
                            for k in ("ready_s", "cpu_s", "tpot_ms"))
        print(f"{ex:4} median: ready {ready:.1f} s, cpu {cpu:.1f} s, TPOT {tpot:.1f} ms")
    print("greedy outputs equal:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
