"""Late binding's pure rule and its FIFO gate (scheduler/holding.py)."""

import asyncio

import pytest

from scheduler.holding import LOOKAHEAD, MIN_AHEAD_S, POLL_S, Gate, hold_for, join, joins


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


def test_a_held_prompt_joins_the_queued_step_when_it_costs_them_less_than_it_saves():
    # 100 tokens queued behind the step in progress, their step ends in 0.3 s, due in 0.5 s;
    # a step's fixed part is 0.06 s
    assert joins(100, 50, 1000, 0.3, 0.05, 0.06, [0.5])
    assert not joins(0, 50, 1000, 0.3, 0.05, 0.06, [])          # nothing queued to join
    assert not joins(100, 950, 1000, 0.3, 0.05, 0.06, [0.5])    # the engine's step is full
    assert not joins(100, 50, 1000, 0.3, 0.25, 1.0, [0.5])      # it would make them late
    assert joins(100, 50, 1000, 0.3, 0.25, 1.0, [0.2])          # late anyway: no SLO to keep
    assert not joins(100, 50, 1000, 0.3, 0.25, 1.0, [0.2, 0.5])  # ...but one on time is
    # a long prompt delays the queued ones by more than a step's fixed part: it waits
    assert not joins(100, 500, 1000, 0.3, 0.26, 0.06, [5.0])
    # two queued ones delayed 0.025 s each cost 0.05 s < 0.06 s; three cost 0.075 s
    assert joins(100, 50, 1000, 0.3, 0.025, 0.06, [5.0, 5.0])
    assert not joins(100, 50, 1000, 0.3, 0.025, 0.06, [5.0, 5.0, 5.0])


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


def test_gate_counts_the_requests_held_behind_one():
    g = Gate()
    a, b, c = g.enter("m"), g.enter("m"), g.enter("m")
    g.enter("other")
    assert g.behind("m", a) == (2, 0.0)          # nothing known of their prefills yet
    g.prefill_s[b], g.prefill_s[c] = 0.2, 0.4
    assert g.behind("m", a) == (2, pytest.approx(0.6))
    assert g.behind("m", b) == (1, pytest.approx(0.4)) and g.behind("m", c) == (0, 0.0)
    assert g.behind("other", a) == (0, 0.0) and g.behind("none", a) == (0, 0.0)


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


def test_join_waits_only_for_the_step_in_progress_and_predicts_the_shared_step():
    from pdserve.latency import Coef
    # a CPU-like engine: 57 ms a step, 0.52 ms a prompt token
    c = Coef(step=0.057, prefill_ktok=0.52)
    # 40 tokens queued behind a step that ends in 20 ms, due in 1 s: a 40-token prompt
    # (21 ms of its own) joins them, dispatched at once to catch their step
    wait, backlog = join(0.02, 40, [1.0], 40, c, 2000)
    assert wait == 0.02 and backlog == pytest.approx(0.02 + 0.0208)
    # its TTFT: that backlog, then its own prefill (the step's fixed part and its tokens),
    # is the shared step's end
    assert backlog + c.prefill_time(40) == pytest.approx(0.02 + c.step_time(80))
    assert join(0.02, 40, [1.0], 400, c, 2000) is None       # 208 ms against 57: it waits
    assert join(0.02, 0, [], 40, c, 2000) is None             # nothing queued
    assert join(0.02, 40, [1.0], 40, None, 2000) is None      # no model yet
    # a GPU-like engine, whose step is mostly its fixed part, packs longer prompts
    g = Coef(step=0.015, prefill_ktok=0.01)
    assert join(0.02, 2000, [1.0], 1000, g, 8192) is not None
