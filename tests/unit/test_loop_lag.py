"""The event-loop lag watch: a loop blocked by a callback is seen late by as long, and the
stall record keeps only stalls."""

from __future__ import annotations

import asyncio
import time

from pdserve.loop_lag import Stalls, watch


def test_stalls_keeps_only_long_lags():
    s = Stalls(min_s=0.05)
    for due, lag in ((1.0, 0.0), (2.0, 0.049), (3.0, 0.05), (4.0, 0.3)):
        s(due, lag)
    assert s.samples == 4
    assert s.seen == [(3.0, 0.05), (4.0, 0.3)]
    assert s.worst_s() == 0.3
    assert Stalls().worst_s() == 0.0


def test_watch_sees_a_blocked_loop():
    async def main():
        seen = Stalls(min_s=0.1)
        task = asyncio.create_task(watch(seen, period_s=0.005))
        while seen.samples < 3:      # running, and unblocked: no stall
            await asyncio.sleep(0.005)
        assert seen.seen == []
        before = time.monotonic()
        time.sleep(0.15)             # a callback that blocks the loop
        while not seen.seen:
            await asyncio.sleep(0.005)
        task.cancel()
        due, lag = seen.seen[0]
        assert 0.1 <= lag < 1.0
        assert before - 0.01 <= due <= before + 0.15
    asyncio.run(asyncio.wait_for(main(), 10))


def test_serving_processes_watch_every_100_ms_unless_told(monkeypatch):
    """A 10 ms timer woke each serving process ~110 times a second (1.1-1.6% of a core,
    idle); they watch at 100 ms, PDSERVE_LOOP_LAG_PERIOD_S where it is a positive number."""
    from pdserve.loop_lag import SERVING_PERIOD_S, serving_period_s
    monkeypatch.delenv("PDSERVE_LOOP_LAG_PERIOD_S", raising=False)
    assert serving_period_s() == SERVING_PERIOD_S == 0.1
    monkeypatch.setenv("PDSERVE_LOOP_LAG_PERIOD_S", "0.01")
    assert serving_period_s() == 0.01
    for bad in ("0", "-1", "x", "nan", "inf", ""):
        monkeypatch.setenv("PDSERVE_LOOP_LAG_PERIOD_S", bad)
        assert serving_period_s() == 0.1, bad
