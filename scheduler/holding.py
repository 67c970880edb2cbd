"""Late binding: a request waits in the scheduler, not in an engine's queue.

Routing on arrival commits a request to a worker's prefill queue seconds before that
worker will compute it. While it waits there, nothing can move it: another engine that
turns free meanwhile (a decode engine whose streams ended, a prefill worker that finished
early) stays idle beside the queue, and the requests booked behind it make that engine
look busier than it will be (each booked prefill is a decode stream later, on the
chooser's timeline, scheduler/adaptive.py). So the scheduler holds a request while the
worker its best option names is still busy with earlier prefills, and chooses again,
from the state of that moment, when the worker is about to be free, when any report or
heartbeat changes the picture, or when another option becomes best (an engine that
turned free has no backlog: it is taken at once).

Held requests leave in arrival order, per model: only the oldest one chooses, so a later
request never overtakes an earlier one, with one exception (`Gate.defer`, on unless
`--hold-order fifo`): a request predicted to miss its TTFT SLO wherever it goes (the time
it has waited plus its best option's predicted TTFT is over the SLO) steps aside for the
requests held behind it that can still make theirs, and leaves when none is held, or when
it has been held `max_hold_s`. Serving first what can still meet its SLO is what keeps
goodput up past saturation: in arrival order, once the queue is longer than the SLO every
request misses it, one after the other (what a replica's FIFO queue does). A request
that steps aside stays served, later; it was going to miss its SLO anyway. Late
requests keep their arrival order among themselves.

A request is dispatched a little before its worker is predicted free (`LOOKAHEAD` of its
own prefill time, at least `MIN_AHEAD_S`), so the round trip to the engine does not leave
the engine idle. The hold is bounded by `max_hold_s` and by the caller's deadline.

Dispatched one at a time, every prompt would get a step of its own and pay the step's
fixed part alone. So a short prompt may join the prompts already queued behind the step in
progress on a prefill worker with no stream (`join`): it is dispatched at once, to share
their step, when what its tokens add to each of them costs them less, together, than the
fixed part it saves, and they still make their TTFT SLOs. The fitted step model decides
which prompts are short: on a CPU, where a step's fixed part is a few dozen prompt tokens'
worth, two or three prompts share a step; on a GPU, where it is hundreds, many do.

`hold_for` is pure; `Gate` is the FIFO and the wake-up, on asyncio alone.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

LOOKAHEAD = 0.25       # dispatch when the backlog is at most this share of its own prefill
MIN_AHEAD_S = 0.02     # ... or this many seconds (a round trip to the engine)
POLL_S = 0.5           # re-choose at least this often while held


def hold_for(backlog_s: float, prefill_s: float, held_s: float, max_hold_s: float) -> float:
    """Seconds to wait before choosing again; 0: dispatch now. `backlog_s`: predicted
    prefill work before this request on the worker its best option names; `prefill_s`:
    its own prefill there; `held_s`: how long it has waited in the scheduler."""
    ahead = max(MIN_AHEAD_S, LOOKAHEAD * prefill_s)
    if backlog_s <= ahead or held_s >= max_hold_s:
        return 0.0
    return max(0.0, min(backlog_s - ahead, POLL_S, max_hold_s - held_s))


def joins(queued_tokens: int, own_tokens: int, step_tokens: int, batch_end_s: float,
          own_s: float, fixed_s: float, dues_s: list[float]) -> bool:
    """Whether a held request may join the prompts queued on its prefill worker (booked
    behind the step in progress, so they share the next step). The engine packs queued
    prompts into one step up to `step_tokens` (pdserve/step_budget.py `fcfs_tokens`), so a
    request that joins them pays no step's fixed part (`fixed_s`) of its own, where one
    dispatched after them waits for their step and then pays one; its `own_s` of compute
    delays each of them instead. It joins only when that costs them less, together, than
    the fixed part saves it (short prompts where a step's fixed part is most of it; a long
    prompt never joins: joining at any cost the SLOs allowed lost on long prompts,
    docs/design.md), and only while they still make their TTFT SLOs; their step is
    predicted to end in `batch_end_s`, `dues_s` is seconds from now to each one's due (one
    already predicted past it is late and keeps no SLO)."""
    if queued_tokens <= 0 or queued_tokens + own_tokens > step_tokens:
        return False
    if len(dues_s) * own_s >= fixed_s:
        return False
    return all(batch_end_s + own_s <= due for due in dues_s if batch_end_s <= due)


def join(started_s: float, queued_tokens: int, dues_s: list[float], own_tokens: int,
         coef, step_tokens: int) -> tuple[float, float] | None:
    """A prompt of `own_tokens` facing prompts queued behind the step in progress on a
    prefill worker with no stream (`started_s`: seconds until that step ends; `coef`: the
    worker's fitted step model, pdserve/latency.py): when it may join them (`joins`),
    (seconds until their shared step starts: what it waits for before dispatch, the
    backlog its TTFT is predicted behind: that wait plus the queued prompts' tokens, the
    shared step's fixed part being in its own prefill's prediction). None: it waits for
    the whole backlog."""
    if coef is None or queued_tokens <= 0:
        return None
    per = coef.per_token()
    batch_end = started_s + coef.step + queued_tokens * per
    if not joins(queued_tokens, own_tokens, step_tokens, batch_end, own_tokens * per,
                 coef.step, dues_s):
        return None
    return started_s, started_s + queued_tokens * per


class Gate:
    """FIFO queues of held requests (one per model), in which late requests step aside
    (`defer`), and one wake-up for all of them."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[int]] = {}
        self._late: set[int] = set()
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self.prefill_s: dict[int, float] = {}    # each held request's own prefill, last seen

    def enter(self, model: str) -> int:
        t = next(self._ids)
        self._queues.setdefault(model, deque()).append(t)
        return t

    def leave(self, model: str, ticket: int) -> None:
        q = self._queues.get(model)
        if q is not None:
            was_head = self.head(model, ticket)
            try:
                q.remove(ticket)
            except ValueError:
                pass
            if not q:
                del self._queues[model]
            if was_head:
                self.notify()
        self._late.discard(ticket)
        self.prefill_s.pop(ticket, None)

    def head(self, model: str, ticket: int) -> bool:
        """`ticket` chooses next: the oldest request held for `model` that is not late, or
        the oldest late one when all are."""
        q = self._queues.get(model)
        if not q:
            return False
        first = next((t for t in q if t not in self._late), q[0])
        return first == ticket

    def late(self, ticket: int) -> bool:
        return ticket in self._late

    def defer(self, model: str, ticket: int) -> bool:
        """`ticket` will miss its TTFT SLO: from now on every request held for `model` that
        is not late chooses before it, and the late ones in arrival order (so one that
        could not make it either does not overtake it). False when it was late already or
        is the only one held (it does not wait for nothing)."""
        q = self._queues.get(model, ())
        if ticket in self._late or ticket not in q or len(q) < 2:
            return False
        self._late.add(ticket)
        self.notify()
        return True

    def held(self) -> int:
        """Requests waiting now (the head of each queue included)."""
        return sum(len(q) for q in self._queues.values())

    def work_ahead(self, model: str, own_s: float) -> float:
        """Predicted prefill seconds held for `model` now (ahead of a request entering):
        each one's own where known, else the known mean, else `own_s`."""
        return self._prefill_of(self._queues.get(model, ()), own_s)

    def _prefill_of(self, tickets, guess_s: float) -> float:
        """The held `tickets`' predicted prefill seconds: each one's own where known, else
        the known mean, else `guess_s`."""
        if not tickets:
            return 0.0
        known = self.prefill_s.values()
        guess = sum(known) / len(known) if known else guess_s
        return sum(self.prefill_s.get(t, guess) for t in tickets)

    def behind(self, model: str, ticket: int) -> tuple[int, float]:
        """The requests held for `model` after `ticket` (in arrival order) and their
        predicted prefill seconds (`work_ahead`'s estimate)."""
        q = list(self._queues.get(model, ()))
        if ticket not in q:
            return 0, 0.0
        after = q[q.index(ticket) + 1:]
        return len(after), self._prefill_of(after, 0.0)

    def held_prefill_s(self) -> float:
        """Predicted prefill work held, every model's (`work_ahead`'s estimate; nothing
        while no held request has chosen yet)."""
        return sum(self.work_ahead(m, 0.0) for m in self._queues)

    def notify(self) -> None:
        """Something changed (a report, a heartbeat, a dispatch): every waiter looks again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Until the next `notify` or `timeout_s`, whichever comes first."""
        ev = self._changed
        try:
            await asyncio.wait_for(ev.wait(), max(0.0, timeout_s))
        except TimeoutError:
            pass
