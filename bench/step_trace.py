"""What an engine's steps cost, by kind, from its step trace; and how far pdserve's step
model (pdserve/latency.py) is from them.

    PDSERVE_STEP_TRACE=/tmp/tr/trace-%p.txt pdserve serve ...     # or a bench variant:
    .venv/bin/python -m bench.matrix --setups vllm-2x,pdserve-t --mixes prefill \\
        --variant 'pdserve-t=PDSERVE_STEP_TRACE=/tmp/tr/trace-%p.txt'
    .venv/bin/python -m bench.step_trace /tmp/tr/trace-*.txt

    .venv/bin/python -m bench.step_trace /tmp/tr/trace-*.txt --gaps results.json

Per trace file (one engine): steps by kind (decode only, prompt tokens only, both in
one step: "mixed"), their seconds, by number of decode sequences; the step model fitted
from the same steps as the engine fits them, and its median signed and absolute error
per kind. A mixed step costs more than the decode step with as many sequences plus its
prompt tokens' share: the model's `mixed` term; a bias left in one kind is what the model
still lacks.

With `--gaps` (a bench JSON: bench.compare's or bench.matrix's `--out`), each gap longer
than `--gap-ms` between two pieces a client got is set against the steps each engine ended
meanwhile (the client's `token_times` and the trace's monotonic end share a clock). Steps
ended inside a stream's gap mean the engine computed while the stream's tokens did not
arrive: held between the engine and the client, or the stream sat those steps out. None
means the engine itself was not stepping.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from pathlib import Path

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


def step_ends(path: str) -> list[float]:
    """The monotonic end of every traced step (the trace's eighth column), in order."""
    with open(path) as f:
        return [float(x[7]) for x in (line.split() for line in f) if len(x) >= 8]


def client_gaps(token_times: list[list[float]], min_s: float) -> list[tuple[float, float]]:
    """(start, end) of every gap longer than `min_s` between a stream's pieces."""
    return [(t[i - 1], t[i]) for t in token_times for i in range(1, len(t))
            if t[i] - t[i - 1] > min_s]


def steps_in_gaps(gaps: list[tuple[float, float]], ends: list[float]) -> list[int]:
    """For each gap, how many of the steps ended strictly inside it. Pure."""
    ends = sorted(ends)
    return [bisect.bisect_left(ends, b) - bisect.bisect_right(ends, a) for a, b in gaps]


def results_token_times(path: str) -> list[list[float]]:
    """Every request's `token_times` in a bench JSON (all setups and runs)."""
    data = json.loads(Path(path).read_text())["results"]
    return [q.get("token_times") or [] for runs in data.values() for r in runs
            for q in r["requests"]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--gaps", default="", help="a bench JSON with the clients' token times")
    ap.add_argument("--gap-ms", type=float, default=100.0)
    ns = ap.parse_args(argv)
    gaps = client_gaps(results_token_times(ns.gaps), ns.gap_ms / 1e3) if ns.gaps else []
    for path in ns.traces:
        if ns.gaps:
            inside = steps_in_gaps(gaps, step_ends(path))
            none, one = inside.count(0), inside.count(1)
            print(f"== {path}: {len(gaps)} client gaps over {ns.gap_ms:.0f} ms; steps this "
                  f"engine ended inside one: none {none}, one {one}, two or more "
                  f"{len(inside) - none - one}")
        r = report(read(path))
        print(f"== {path}")
        for k, v in r.items():
            seqs = ", ".join(f"{n}: {ms:.1f}" for n, ms in list(v["by_seqs"].items())[:6])
            print(f"  {k:8s} {v['n']:5d} steps  p50 {v['p50_ms']:7.1f} ms  p90 "
                  f"{v['p90_ms']:7.1f} ms  model error p50 {v['err_p50']:+.0%} "
                  f"(|{v['abs_err_p50']:.0%}|)  p50 ms by decode seqs {{{seqs}}}")


if __name__ == "__main__":
    main()
