"""Late binding's pure rule and its FIFO gate (scheduler/holding.py)."""

import asyncio

from scheduler.holding import LOOKAHEAD, MIN_AHEAD_S, POLL_S, Gate, hold_for


def test_dispatch_when_the_worker_is_about_to_be_free():
    assert hold_for(0.0, 3.0, 0.0, 60.0) == 0.0
    assert hold_for(LOOKAHEAD * 3.0, 3.0, 0.0, 60.0) == 0.0           # within the lookahead
    assert hold_for(MIN_AHEAD_S, 0.001, 0.0, 60.0) == 0.0             # a round trip at least
    # busy: wait until the lookahead, polling at least every POLL_S
    assert hold_for(1.0, 2.0, 0.0, 60.0) == POLL_S
    assert abs(hold_for(0.8, 2.0, 0.0, 60.0) - 0.3) < 1e-9


def test_the_hold_is_bounded():
    assert hold_for(10.0, 1.0, 60.0, 60.0) == 0.0
    assert abs(hold_for(10.0, 1.0, 59.9, 60.0) - 0.1) < 1e-9
    assert hold_for(10.0, 1.0, 0.0, 0.0) == 0.0                       # no hold at all


async def test_gate_is_fifo_per_model_and_leaves_cleanly():
    g = Gate()
    a, b = g.enter("m"), g.enter("m")
    c = g.enter("other")
    assert g.head("m", a) and not g.head("m", b) and g.head("other", c)
    assert g.held() == 3
    assert g.work_ahead("m", 0.5) == 1.0 and g.work_ahead("none", 0.5) == 0.0
    g.prefill_s[a] = 1.5
    assert g.work_ahead("m", 0.5) == 3.0         # the known mean for the rest
    assert g.held_prefill_s() == 4.5           # the mean of the known for the rest
    g.prefill_s[b] = 2.0
    assert g.held_prefill_s() == 5.25
    g.leave("m", b)                  # a later one can leave first (cancelled)
    assert g.head("m", a) and g.held() == 2 and g.held_prefill_s() == 3.0
    g.leave("m", a)
    g.leave("other", c)
    assert g.held() == 0 and g.held_prefill_s() == 0.0
    g.leave("m", a)                  # twice: nothing


async def test_gate_wait_wakes_on_notify_and_times_out():
    g = Gate()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await g.wait(0.05)                                 # nothing happens: the timeout
    assert loop.time() - t0 >= 0.04
    waiter = asyncio.create_task(g.wait(30.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    g.notify()
    await asyncio.wait_for(waiter, 5.0)                # woken long before its timeout
    # the head leaving wakes the next one
    a, b = g.enter("m"), g.enter("m")
    waiter = asyncio.create_task(g.wait(30.0))
    await asyncio.sleep(0)
    g.leave("m", a)
    await asyncio.wait_for(waiter, 5.0)
    assert g.head("m", b)


async def test_late_requests_step_aside_and_keep_their_order():
    """A request predicted to miss its TTFT SLO lets every request held that is not late
    choose first; the late ones go in arrival order, after them."""
    g = Gate()
    a = g.enter("m")
    assert not g.defer("m", a) and not g.late(a)     # alone: nobody to let go first
    b, c = g.enter("m"), g.enter("m")
    assert g.defer("m", a) and g.late(a) and not g.late(b)
    assert not g.defer("m", a)                   # once
    assert not g.defer("other", b)               # not held there: nothing changes
    assert g.head("m", b) and not g.head("m", a)
    assert g.defer("m", b)
    assert g.head("m", c)                        # the one that is not late
    assert g.defer("m", c)
    assert g.head("m", a)                        # all late: the oldest
    d = g.enter("m")
    assert g.head("m", d)                        # a new one that can still make it
    g.leave("m", d)
    assert g.head("m", a)
    g.leave("m", a)
    assert g.head("m", b) and not g.late(a)
    waiter = asyncio.create_task(g.wait(30.0))
    await asyncio.sleep(0)
    g.leave("m", b)                              # the head leaving wakes the rest
    await asyncio.wait_for(waiter, 5.0)
    assert g.head("m", c) and g.held() == 1
    g.leave("m", c)
    assert g.held() == 0 and not g._late
