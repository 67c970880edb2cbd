"""How an engine starts: pdserve's engine at one rank on CPU with vLLM's worker inside
the engine core (the uniprocess executor) and that process forked (`uni`, pdserve's
default), the same spawned (`uni-spawn`, `PDSERVE_ENGINE_FORK=0`: what vLLM's CPU
platform asks for), vLLM's multiprocess executor (`mp`, `--distributed-executor-backend
mp`, what vLLM's CPU platform picks) with its processes forked (`mp`) or spawned
(`mp-spawn`), and two ranks (`tp2`, `--tensor-parallel-size 2` on `--tp-cores`, forked;
`tp2-spawn`), started one after the other in one run.

    .venv/bin/python -m bench.bench_engine_start                 # tiny model, 2 starts each
    .venv/bin/python -m bench.bench_engine_start --model PATH --repeat 3
    .venv/bin/python -m bench.bench_engine_start --kinds tp2,tp2-spawn

Prints per start: seconds to ready, CPU seconds of the engine's processes by then, the
processes, a short prompt's time to its first token (120 words) and a greedy generation's time per
output token; the generations at the same number of ranks must match.
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
KINDS = ("uni", "uni-spawn", "mp", "mp-spawn", "tp2", "tp2-spawn")


def child(model: str, executor: str, cores: str) -> dict:
    """In a fresh interpreter: start, generate, report (one JSON line on stdout)."""
    import asyncio

    import psutil

    t0 = time.monotonic()
    from pdserve.config import EngineConfig
    from pdserve.engine import build_engine

    vllm = {"distributed_executor_backend": "mp"} if executor.startswith("mp") else \
        {"tensor_parallel_size": 2} if executor.startswith("tp2") else {}
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
        return ids, t1, (tn - t1) / 64

    ids, ttft, tpot = asyncio.run(run())
    eng.shutdown()
    return {"executor": executor, "ready_s": ready, "cpu_s": cpu, "procs": names,
            "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "ids": ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="default: the tiny test model")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cores", default="0")
    ap.add_argument("--tp-cores", default="0,1", help="the cores of tp2: one per rank")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ", ".join(KINDS))
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
    kinds = [k for k in a.kinds.split(",") if k]
    if not set(kinds) <= set(KINDS):
        ap.error(f"--kinds: one of {', '.join(KINDS)}")
    for i in range(a.repeat):
        for ex in kinds:
            out = subprocess.run(
                [sys.executable, "-m", "bench.bench_engine_start", "--model", model,
                 "--cores", a.tp_cores if ex.startswith("tp2") else a.cores, "--child", ex],
                cwd=ROOT, capture_output=True, text=True, timeout=900,
                env={**os.environ, "PYTHONPATH": str(ROOT),
                     "PDSERVE_ENGINE_FORK": "0" if ex.endswith("-spawn") else "1"})
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(line[-1])
            rows.append(r)
            print(f"{ex:9} start {i + 1}: ready {r['ready_s']:5.1f} s  cpu {r['cpu_s']:5.1f} s  "
                  f"TTFT {r['ttft_ms']:6.1f} ms  TPOT {r['tpot_ms']:6.1f} ms  "
                  f"processes {', '.join(r['procs'])}", flush=True)
    # one rank against one rank, two against two (a sum over ranks may round otherwise)
    groups = {r["executor"].startswith("tp2") for r in rows}
    same = all(len({tuple(r["ids"]) for r in rows if r["executor"].startswith("tp2") == g})
               == 1 for g in groups)
    for ex in kinds:
        rs = [r for r in rows if r["executor"] == ex]
        ready, cpu, ttft, tpot = (float(np.median([r[k] for r in rs]))
                                  for k in ("ready_s", "cpu_s", "ttft_ms", "tpot_ms"))
        print(f"{ex:9} median: ready {ready:.1f} s, cpu {cpu:.1f} s, TTFT {ttft:.1f} ms, "
              f"TPOT {tpot:.1f} ms")
    print("greedy outputs equal:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
