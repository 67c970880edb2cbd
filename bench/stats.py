"""Benchmark arithmetic: per-request latencies -> percentiles, throughput, goodput. Pure.

Definitions (the ones DistServe, vLLM's `bench serve` and this project's docs use):
* TTFT: request sent -> first token received (streaming).
* TPOT: (end - first token) / (output tokens - 1), per request; undefined for 1 token.
* ITL: every gap between consecutive streamed chunks.
* Goodput: completed requests with TTFT <= SLO_ttft and TPOT <= SLO_tpot, per second of the
  run (a request with one output token has no TPOT and needs only the TTFT SLO).
* Percentiles: linear interpolation between order statistics (numpy's default, as vLLM's
  benchmark reports them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Result:
    index: int
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    error: str = ""
    # pdserve's x-pdserve-route header: the option taken and the latency model's forecast
    route: str = ""
    pred_ttft: float = math.nan
    pred_tpot: float = math.nan
    route_text: str = ""      # the whole route (the runner-up's forecast too)
    text: str = ""            # what was generated
    kv: dict = field(default_factory=dict)   # pdserve's kv_transfer record (disaggregated)
    # each streamed piece's arrival, `time.perf_counter()`: CLOCK_MONOTONIC on Linux, the
    # clock of the engines' step trace (PDSERVE_STEP_TRACE's monotonic end), so a client's
    # gap can be set against the steps the engine ran meanwhile
    token_times: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        if not self.ok or self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(xs: list[float], q: float) -> float:
    """numpy's percentile (linear interpolation, q in 0..100), as vLLM's benchmark computes
    it; NaN for no data. The one percentile of every benchmark here."""
    import numpy as np
    v = [x for x in xs if not math.isnan(x)]
    return float(np.percentile(v, q)) if v else math.nan


def _within(ok: bool, ttft: float, output_tokens: int, tpot: float, ttft_slo: float,
            tpot_slo: float) -> bool:
    if not ok or ttft > ttft_slo:
        return False
    return output_tokens < 2 or tpot <= tpot_slo


def within_slo(r: Result, ttft_slo: float, tpot_slo: float) -> bool:
    return _within(r.ok, r.ttft, r.output_tokens, r.tpot, ttft_slo, tpot_slo)


def within_slo_dict(d: dict, ttft_slo: float, tpot_slo: float) -> bool:
    """`within_slo` of a request as `result_dict` wrote it (a results JSON)."""
    return _within(d["ok"], d["ttft"], d["output_tokens"], d["tpot"], ttft_slo, tpot_slo)


def within_by_request(runs: list[dict], ttft_slo: float, tpot_slo: float) -> dict[tuple, bool]:
    """{(rate, request index): within both SLOs} over a setup's runs of one mix (as a
    bench.matrix JSON holds them): the pairs of a request-by-request comparison."""
    return {(x["summary"]["rate"], r["index"]): within_slo_dict(r, ttft_slo, tpot_slo)
            for x in runs for r in x["requests"]}


def sent_at(d: dict) -> float | None:
    """When a request (as `result_dict` wrote it) was sent, on its `token_times` clock: its
    first token less its TTFT; None for one that got no token."""
    tt = d.get("token_times")
    return tt[0] - d["ttft"] if tt else None


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's, exact) of paired outcomes: the chance of a
    split at least this uneven between `wins` and `losses` if either side were as likely
    to win each discordant pair. The setups of a benchmark serve the same requests at the
    same arrival times, so each request is a pair; ties (both made it, or both missed)
    say nothing of which is better."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def parse_route(header: str) -> tuple[str, float, float]:
    """(mode, predicted TTFT s, predicted TPOT s) from an x-pdserve-route header."""
    mode = header.split(":", 1)[0] if header else ""
    got = {}
    for part in header.split(";", 1)[0].split():
        k, _, v = part.partition("=")
        if k in ("predicted_ttft_ms", "predicted_tpot_ms"):
            try:
                got[k] = float(v) / 1e3
            except ValueError:
                pass
    return mode, got.get("predicted_ttft_ms", math.nan), got.get("predicted_tpot_ms", math.nan)


def model_error(results: list[Result]) -> dict:
    """Median absolute relative error of the predicted TTFT and TPOT, over the completed
    requests that carried a prediction; and how many did."""
    out: dict = {}
    for name, pairs in (("ttft", [(r.pred_ttft, r.ttft) for r in results if r.ok]),
                        ("tpot", [(r.pred_tpot, r.tpot) for r in results if r.ok])):
        errs = [abs(p - m) / m for p, m in pairs
                if not math.isnan(p) and not math.isnan(m) and m > 0]
        out[name] = percentile(errs, 50)
        out[f"{name}_n"] = len(errs)
    return out


def summarize(results: list[Result], duration_s: float, ttft_slo_s: float,
              tpot_slo_s: float) -> dict:
    ok = [r for r in results if r.ok]
    dur = max(duration_s, 1e-9)
    out = {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur,
        "output_throughput": sum(r.output_tokens for r in ok) / dur,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in ok) / dur,
        "slo": {"ttft_ms": ttft_slo_s * 1e3, "tpot_ms": tpot_slo_s * 1e3},
        "good": sum(within_slo(r, ttft_slo_s, tpot_slo_s) for r in results),
    }
    out["goodput"] = out["good"] / dur
    for name, xs in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok]),
                     ("itl", [g for r in ok for g in r.itl]), ("e2e", [r.e2e for r in ok])):
        out[f"{name}_ms"] = {f"p{q}": percentile(xs, q) * 1e3 for q in (50, 90, 99)}
        vals = [x for x in xs if not math.isnan(x)]
        out[f"{name}_ms"]["mean"] = (sum(vals) / len(vals) * 1e3) if vals else math.nan
    out["model_error"] = model_error(results)
    routes: dict[str, int] = {}
    for r in results:
        if r.route:
            routes[r.route] = routes.get(r.route, 0) + 1
    out["routes"] = routes
    return out


def result_dict(r: Result) -> dict:
    d = asdict(r)
    d["tpot"] = r.tpot
    return d
