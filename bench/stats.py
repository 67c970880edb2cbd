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

    @property
    def tpot(self) -> float:
        if not self.ok or self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100); NaN for no data."""
    v = sorted(x for x in xs if not math.isnan(x))
    if not v:
        return math.nan
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def within_slo(r: Result, ttft_slo: float, tpot_slo: float) -> bool:
    if not r.ok or r.ttft > ttft_slo:
        return False
    return r.output_tokens < 2 or r.tpot <= tpot_slo


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
    return out


def result_dict(r: Result) -> dict:
    d = asdict(r)
    d["tpot"] = r.tpot
    return d
