"""When the frontend sends a remote prefill's first token that it keeps for its stream
(`--first-token with_stream`, frontend/client.py `_kept_first`), and so when the scheduler
predicts the client sees it (scheduler/adaptive.py `released`). Pure: no I/O."""

from __future__ import annotations

# A kept first token goes out by this share of the TTFT SLO at the latest, or earlier by
# DELIVERY_S where that is more: keeping it longer moves the rest of its handoff from the
# client's TPOT into its TTFT, which stays met; what is left covers the frontend's and the
# network's delivery, up to 30 ms on a saturated 2-core host (docs/design.md)
SAFETY = 0.97
DELIVERY_S = 0.05


def release_after(ttft_slo_s: float) -> float:
    """Seconds after the request's arrival when a kept first token goes out anyway."""
    return max(0.0, min(SAFETY * ttft_slo_s, ttft_slo_s - DELIVERY_S))
