"""vLLM's engine-core/worker wait: stock spin (PDSERVE_QUIET_WAIT=0) against pdserve's quiet
wait (the default), same cluster, same seeded workload, measured in one run.

    .venv/bin/python -m bench.bench_quiet_wait                 # bundled SmolLM2, 1P1D
    .venv/bin/python -m bench.bench_quiet_wait --rates 0.25,0.5 --num-requests 16

Prints one row per setting and rate: goodput, TTFT and TPOT percentiles, ITL p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.serve import add_workload_args, sweep
    from pdserve.models import ensure_bundled_model
    from bench.local_cluster import start_cluster, stop_cluster_proc

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="")
    add_workload_args(ap)
    ap.set_defaults(rates="0.25,0.5", num_requests=16)
    ns = ap.parse_args(argv)
    model = ns.model or str(ensure_bundled_model())
    rows = []
    for label, value in (("stock vLLM wait", "0"), ("quiet wait", "1")):
        c = start_cluster(model, Path(f"/tmp/pdserve-quiet-wait-{value}.log"),
                          env={"PDSERVE_QUIET_WAIT": value}, extra=["--kv-cache-gib", "1"])
        try:
            runs = asyncio.run(sweep(c.url, ns, label))
        finally:
            stop_cluster_proc(c.proc)
        rows += [r["summary"] for r in runs]
    print(f"\n{'setting':<16} {'rate':>5} {'goodput':>8} {'TTFT p50/p90/p99 (ms)':>24} "
          f"{'TPOT p50/p90/p99 (ms)':>22} {'ITL p99':>8}")
    for s in rows:
        t, p = s["ttft_ms"], s["tpot_ms"]
        print(f"{s['setup']:<16} {s['rate']:>5} {s['goodput']:>8.3f} "
              f"{t['p50']:>8.0f}/{t['p90']:.0f}/{t['p99']:.0f} "
              f"{p['p50']:>10.1f}/{p['p90']:.1f}/{p['p99']:.1f} {s['itl_ms']['p99']:>8.0f}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
