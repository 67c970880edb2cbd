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
than `--gap-ms` between two pieces a client got is put down to what took three quarters
of it or more (`gap_cause`): one engine step that carried streams and a prompt's tokens,
a plain decode step, the client's own event-loop stall (its `client_stalls`), or none of
them (the tokens held between the engine and the client). The client's `token_times`, its stalls
and the trace's monotonic step ends share a clock.
"""

from __future__ import annotations

import argparse
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


def step_spans(path: str) -> list[tuple[float, float, int, int]]:
    """(start, end, prompt tokens, decode sequences) of every traced step: monotonic, from
    the trace's eighth column (the end) and first (the step's seconds)."""
    with open(path) as f:
        rows = [x for x in (line.split() for line in f) if len(x) >= 8]
    return [(float(x[7]) - float(x[0]), float(x[7]), int(x[1]), int(x[3])) for x in rows]


def client_gaps(token_times: list[list[float]], min_s: float) -> list[tuple[float, float]]:
    """(start, end) of every gap longer than `min_s` between a stream's pieces."""
    return [(t[i - 1], t[i]) for t in token_times for i in range(1, len(t))
            if t[i] - t[i - 1] > min_s]


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def gap_cause(gap: tuple[float, float], steps: list[tuple[float, float, int, int]],
              stalls: list[tuple[float, float]], share: float = 0.75) -> tuple[str, int]:
    """Why a client waited `gap`, and a step's prompt tokens where a step is why. Pure.

    - "client": the client's own event loop stalled for `share` of the gap or more (its
      `client_stalls`: when each late wake-up was due, how late it came);
    - "prompt step": one step that carried decode streams and prompt tokens took that
      share (a prompt computed beside the streams, as the step budget allowed);
    - "decode step": a step of decode streams only did (the engine itself was slow);
    - "between": none of these. The engines stepped as usual: the tokens were held
      between the engine and the client (the decode worker, the frontend: see
      `pdserve_event_loop_lag_seconds`), or the stream sat the steps out (its KV loading).
    """
    a, b = gap
    need = share * (b - a)
    if any(_overlap(a, b, due, due + lag) >= need for due, lag in stalls):
        return "client", 0
    longest = max((s for s in steps if s[3] > 0), key=lambda s: _overlap(a, b, s[0], s[1]),
                  default=None)
    if longest is not None and _overlap(a, b, longest[0], longest[1]) >= need:
        return ("prompt step", longest[2]) if longest[2] else ("decode step", 0)
    return "between", 0


CAUSES = ("prompt step", "decode step", "client", "between")


def results_token_times(path: str) -> tuple[list[list[float]], list[tuple[float, float]]]:
    """Every request's `token_times` in a bench JSON (all mixes, setups and runs), and
    every run's `client_stalls`."""
    data = json.loads(Path(path).read_text())["results"]
    # bench.compare's {setup: [run]}, or bench.matrix's {mix: {setup: [run]}}
    lists = [v for x in data.values() for v in (x.values() if isinstance(x, dict) else [x])]
    runs = [r for rs in lists for r in rs]
    return ([q.get("token_times") or [] for r in runs for q in r["requests"]],
            [tuple(x) for r in runs for x in r.get("client_stalls", [])])


def gaps_report(gaps: list[tuple[float, float]], steps: list[tuple[float, float, int, int]],
                stalls: list[tuple[float, float]]) -> str:
    causes = [gap_cause(g, steps, stalls) for g in gaps]
    counts = {c: sum(k == c for k, _ in causes) for c in CAUSES}
    tokens = [t for k, t in causes if k == "prompt step"]
    tok = f" (prompt tokens p50 {percentile(tokens, 50):.0f})" if tokens else ""
    return ", ".join(f"{c} {n}{tok if c == 'prompt step' else ''}" for c, n in counts.items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--gaps", default="", help="a bench JSON with the clients' token times")
    ap.add_argument("--gap-ms", type=float, default=100.0)
    ns = ap.parse_args(argv)
    if ns.gaps:
        times, stalls = results_token_times(ns.gaps)
        gaps = client_gaps(times, ns.gap_ms / 1e3)
        steps = [s for path in ns.traces for s in step_spans(path)]
        print(f"== {len(gaps)} client gaps over {ns.gap_ms:.0f} ms, by what took most "
              f"of each: {gaps_report(gaps, steps, stalls)}")
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
