"""A decode engine's streams over time, as the chooser predicts them (scheduler/adaptive.py,
`Node.streams_at`): spans of (start s, end s, sequences, context tokens[, late]) from now,
the streams decoding now and those booked to start when their prefill ends
(scheduler/state.py, `Registry.timelines`). Pure."""

from __future__ import annotations

import math


def is_late(span: tuple) -> bool:
    """Is a `Node.streams_at` span late (its optional fifth field)?"""
    return len(span) > 4 and bool(span[4])


def spent_until(busy: tuple) -> float:
    """When the last of the streams decoding now with an SLO to keep ends (0: none, or one
    with no known end). Until then the engine's slack is theirs: it hands it out first come
    first served (pdserve/step_budget.py), the slack they have now (`Node.allow_s`) to the
    prompt at the head, and then steps at the floor, since a stream that lands meanwhile
    brings slack that the older streams' spent one bounds (the allowance is the least over
    the streams). So a prompt behind others, or one larger than that slack, goes at the
    floor until they end, not at the long-run pace (`stream_tokens`)."""
    ends = [span[1] for span in busy if span[0] <= 0.0 < span[1] and not is_late(span)]
    return max(ends) if ends and all(math.isfinite(e) for e in ends) else 0.0


class Sweep:
    """A stream timeline walked forward in time: (streams, their context tokens, the next
    start or end) at each `at(t)`, for non-decreasing t, and `kept`: how many of those
    streams are not late (an SLO left to keep). Intervals are [start, end)."""

    def __init__(self, busy: tuple) -> None:
        ev = []
        for span in busy:
            start, end, n, c = span[:4]
            k = 0 if is_late(span) else n
            ev.append((start, n, c, k))
            if math.isfinite(end):
                ev.append((end, -n, -c, -k))
        ev.sort(key=lambda e: e[0])
        self.ev, self.i, self.seqs, self.ctx, self.kept = ev, 0, 0, 0.0, 0

    def at(self, t: float) -> tuple[int, float, float]:
        ev = self.ev
        while self.i < len(ev) and ev[self.i][0] <= t:
            _, n, c, k = ev[self.i]
            self.seqs, self.ctx, self.i = self.seqs + n, self.ctx + c, self.i + 1
            self.kept += k
        return self.seqs, max(0.0, self.ctx), ev[self.i][0] if self.i < len(ev) else math.inf


def mean_load(busy: tuple, start_s: float, life_s: float) -> tuple[float, float]:
    """The decode sequences and their context tokens that run beside a stream decoding from
    `start_s` for `life_s` (seconds from now), averaged over that time: the streams
    decoding now count until they end, the booked ones from when they start. A stream's
    decode steps are linear in both (pdserve/latency.py), so its mean step is the step of
    these means. (The count now, held for the whole life, predicted a 1,500-token prompt's
    stream on a 2-core host at 24.7 ms a token beside a stream that ended a second before
    it started; it ran at 19.6 ms: docs/design.md, "The streams beside it over its life".)"""
    sweep = Sweep(busy)
    seqs, ctx, nxt = sweep.at(start_s)
    if life_s <= 0:
        return float(seqs), ctx
    t, end, s_sum, c_sum = start_s, start_s + life_s, 0.0, 0.0
    while True:
        upto = min(nxt, end)
        s_sum += seqs * (upto - t)
        c_sum += ctx * (upto - t)
        t = upto
        if t >= end:
            return s_sum / life_s, c_sum / life_s
        seqs, ctx, nxt = sweep.at(t)
