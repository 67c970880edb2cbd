"""Admission control: refuse what the cluster cannot serve in time, instead of queueing it.

A queue that only grows makes every request late: the ones admitted first wait behind
nothing, but each one admitted later waits behind all of them, until clients time out.
The latency model already forecasts the TTFT of the option the scheduler would take
(scheduler/adaptive.py); when even that best option is forecast to take more than
`factor` times the TTFT SLO, the request is refused with a retry hint (the frontend turns
it into 429 with Retry-After) and the ones already admitted keep their place. A cold
model (no forecast) admits everything.

A request whose own prefill (`own_s`, its compute alone) already takes longer than the SLO
would be refused on an idle cluster too, and again after every Retry-After: a 429 that can
never turn into an answer. Such a prompt's excess over the SLO is added to the bound, so
what refuses it is a backlog in front of it, as for any other request. (Seen on a 2-core
AVX2 host: a 2,048-token prompt of the bundled model computes in about 11 s, over the
default 4 x 2 s, and got a 429 on an idle cluster.) Pure logic.
"""

from __future__ import annotations


def retry_after_s(pred_ttft_s: float, ttft_slo_s: float, factor: float,
                  own_s: float = 0.0) -> float:
    """Seconds after which to try again; 0: admit."""
    if factor <= 0 or ttft_slo_s <= 0:
        return 0.0
    bound = factor * ttft_slo_s + max(0.0, own_s - ttft_slo_s)
    if pred_ttft_s <= bound:
        return 0.0
    # the backlog in front of it has to shrink by the excess before it would be admitted
    return max(1.0, pred_ttft_s - bound)
