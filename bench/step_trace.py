"""What an engine's steps cost, by kind, from its step trace; and how far pdserve's step
model (pdserve/latency.py) is from them.

    PDSERVE_STEP_TRACE=/tmp/tr/trace-%p.txt pdserve serve ...     # or a bench variant:
    .venv/bin/python -m bench.matrix --setups vllm-2x,pdserve-t --mixes prefill \\
        --variant 'pdserve-t=PDSERVE_STEP_TRACE=/tmp/tr/trace-%p.txt'
    .venv/bin/python -m bench.step_trace /tmp/tr/trace-*.txt

Per trace file (one engine): steps by kind (decode only, prompt tokens only, both in
one step: "mixed"), their seconds, by number of decode sequences; the step model fitted
from the same steps as the engine fits them, and its median signed and absolute error
per kind. A mixed step costs more than the decode step with as many sequences plus its
prompt tokens' share: the model's `mixed` term; a bias left in one kind is what the model
still lacks.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from bench.stats import percentile
from pdserve.latency import StepModel, StepSample

KINDS = ("decode", "mixed", "prefill")


def read(path: str) -> list[StepSample]:
    """A step trace's lines (pdserve/step_hook.py): seconds, prompt tokens, attention,
    decode sequences, context, ..."""
    out = []
    with open(path) as f:
        for line in f:
            x = line.split()
            if len(x) >= 5:
                out.append(StepSample(float(x[0]), int(x[1]), float(x[2]), int(x[3]),
                                      int(x[4])))
    return out


def kind(s: StepSample) -> str:
    if s.prefill_tokens and s.decode_seqs:
        return "mixed"
    return "prefill" if s.prefill_tokens else "decode"


def report(steps: list[StepSample]) -> dict:
    """{kind: {"n", "p50_ms", "p90_ms", "err_p50", "abs_err_p50", "by_seqs": {seqs: p50_ms}}}
    with the model fitted from all of `steps` (errors relative to the measured seconds)."""
    model = StepModel()
    for s in steps:
        model.observe(s)
    groups: dict[str, list[StepSample]] = defaultdict(list)
    for s in steps:
        if s.seconds > 0:
            groups[kind(s)].append(s)
    out = {}
    for k in KINDS:
        g = groups.get(k, [])
        if not g:
            continue
        sec = [s.seconds for s in g]
        err = [(model.fit.predict(s.features()) - s.seconds) / s.seconds for s in g]
        by: dict[int, list[float]] = defaultdict(list)
        for s in g:
            by[s.decode_seqs].append(s.seconds)
        out[k] = {"n": len(g), "p50_ms": 1e3 * percentile(sec, 50),
                  "p90_ms": 1e3 * percentile(sec, 90),
                  "err_p50": percentile(err, 50),
                  "abs_err_p50": percentile([abs(e) for e in err], 50),
                  "by_seqs": {n: 1e3 * percentile(v, 50) for n, v in sorted(by.items())}}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+")
    ns = ap.parse_args(argv)
    for path in ns.traces:
        r = report(read(path))
        print(f"== {path}")
        for k, v in r.items():
            seqs = ", ".join(f"{n}: {ms:.1f}" for n, ms in list(v["by_seqs"].items())[:6])
            print(f"  {k:8s} {v['n']:5d} steps  p50 {v['p50_ms']:7.1f} ms  p90 "
                  f"{v['p90_ms']:7.1f} ms  model error p50 {v['err_p50']:+.0%} "
                  f"(|{v['abs_err_p50']:.0%}|)  p50 ms by decode seqs {{{seqs}}}")


if __name__ == "__main__":
    main()
