"""The streams expected to land on a decode worker from requests that have not arrived
yet, as timeline spans (scheduler/timeline.py): what a long local prefill computes
beside. Pure: no I/O, time passed in.

A local prompt is chunked under its engine's per-step budget while streams decode there
(pdserve/step_budget.py), and a step beside a stream carries that stream's decode work
and leaves the prompt only the rest of the TPOT allowance: on a 2-core CPU host a
1,024-token prompt took 85 tokens a step beside one stream. The timeline at placement
holds the streams decoding and booked now; the requests that arrive while a long prompt
computes land beside it too, and recent long local prefills ran 1.2-1.8x (median) over
their prediction on the long-prompt mix while remote ones ran 1.04-1.08x (docs/design.md,
"Arrivals beside a local prompt"). So the chooser adds the streams the recent arrival rate
at that worker predicts: the k-th at (k - 1/2) / rate (the middle of its expected
interval: the streams present on average are rate x life, as Little's law has it) plus
the delay before recent requests there started decoding (their predicted TTFT), each for
the life and context of recent streams there (medians)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0       # bookings older than this say nothing about the rate now
KEEP = 32             # bookings kept per worker, at most
MIN_SEEN = 4          # bookings on a worker before it has a rate
MAX_SPANS = 16        # expected streams added to one prediction, at most


@dataclass(frozen=True)
class Seen:
    at: float           # when it was booked
    first_s: float      # its predicted TTFT: when its stream starts, from then
    life_s: float       # its predicted decode time: (output tokens - 1) x TPOT
    ctx: float          # its context tokens while it decodes, on average


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2]


class Arrivals:
    """The streams booked onto each worker lately, and the ones their rate predicts."""

    def __init__(self) -> None:
        self.seen: dict[str, deque[Seen]] = {}

    def add(self, worker_id: str, now: float, first_s: float, out_tokens: int,
            tpot_s: float, prompt_tokens: int) -> None:
        """A stream booked onto `worker_id` at `now`."""
        q = self.seen.setdefault(worker_id, deque(maxlen=KEEP))
        q.append(Seen(now, max(0.0, first_s), max(1, out_tokens - 1) * max(0.0, tpot_s),
                      prompt_tokens + out_tokens / 2))

    def forget(self, worker_id: str) -> None:
        self.seen.pop(worker_id, None)

    def rate(self, worker_id: str, now: float) -> float:
        """Streams booked onto `worker_id` per second lately: (n - 1) over the time since
        the first of the last n within WINDOW_S (so it decays once they stop); 0 with
        fewer than MIN_SEEN."""
        recent = [s for s in self.seen.get(worker_id, ()) if now - s.at <= WINDOW_S]
        if len(recent) < MIN_SEEN:
            return 0.0
        span = now - recent[0].at
        return (len(recent) - 1) / span if span > 0 else 0.0

    def spans(self, worker_id: str, now: float, horizon_s: float) -> tuple:
        """Timeline spans (start s, end s, 1, context tokens) from now of the streams
        expected to start on `worker_id` within `horizon_s`; () without a rate."""
        lam = self.rate(worker_id, now)
        if lam <= 0 or horizon_s <= 0:
            return ()
        recent = [s for s in self.seen[worker_id] if now - s.at <= WINDOW_S]
        delay = _median([s.first_s for s in recent])
        life = _median([s.life_s for s in recent])
        ctx = _median([s.ctx for s in recent])
        if life <= 0:
            return ()
        out = []
        for k in range(1, MAX_SPANS + 1):
            start = (k - 0.5) / lam + delay
            if start >= horizon_s:
                break
            out.append((start, start + life, 1, ctx))
        return tuple(out)
