"""Admission control: refuse what the cluster cannot serve in time, instead of queueing it.

A queue that only grows makes every request late: the ones admitted first wait behind
nothing, but each one admitted later waits behind all of them, until clients time out.
The latency model already forecasts the TTFT of the option the scheduler would take
(scheduler/adaptive.py); when even that best option is forecast to take more than
`factor` times the TTFT SLO, the request is refused with a retry hint (the frontend turns
it into 429 with Retry-After) and the ones already admitted keep their place. A cold
model (no forecast) admits everything. Pure logic.
"""

from __future__ import annotations


def retry_after_s(pred_ttft_s: float, ttft_slo_s: float, factor: float) -> float:
    """Seconds after which to try again; 0: admit."""
    if factor <= 0 or ttft_slo_s <= 0 or pred_ttft_s <= factor * ttft_slo_s:
        return 0.0
    # the backlog in front of it has to shrink by the excess before it would be admitted
    return max(1.0, pred_ttft_s - factor * ttft_slo_s)
