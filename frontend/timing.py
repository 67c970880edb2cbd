"""Per-request latency, as the frontend sees it: TTFT, inter-token gaps, TPOT, end to end,
and whether the request met both SLOs (goodput). Exported as Prometheus metrics."""

from __future__ import annotations

import time

from pdserve import metrics as M


class Timing:
    def __init__(self, slo: tuple[float, float] = (0.0, 0.0)) -> None:
        self.slo = slo                     # (TTFT, TPOT) in seconds; 0: no SLO
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.n = 0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.perf_counter()
        if self.first is None:
            self.first = t
            M.TTFT.observe(t - self.t0)
        elif self.last is not None:
            M.ITL.observe(t - self.last)
        self.last = t
        self.n += n

    def done(self) -> None:
        t = time.perf_counter()
        M.E2E.observe(t - self.t0)
        tpot = 0.0
        if self.first is not None and self.n > 1:
            tpot = (t - self.first) / (self.n - 1)
            M.TPOT.observe(tpot)
        M.GEN_TOKENS.inc(self.n)
        ttft_slo, tpot_slo = self.slo
        if self.first is not None and (not ttft_slo or self.first - self.t0 <= ttft_slo) \
                and (not tpot_slo or tpot <= tpot_slo):
            M.GOODPUT.inc()           # within both SLOs: counts toward goodput
