"""How late an asyncio event loop runs what is due: a process's stalls, seen from inside.

A task sleeps `period` and measures how much later than that it woke. The lateness is
the time the loop could not run it: a callback that blocked the loop, or the process
waiting for a CPU. On a host whose cores also run vLLM engines (a CPU deployment, or a
GPU node whose CPU is overcommitted), the second happens: a frontend's or a benchmark
client's loop was seen waiting 100-360 ms in the kernel's run queue while both of a
2-core host's cores ran engine steps, and every stream it served showed that gap, though
the engines had computed the tokens. The cause there was Linux's autogroup scheduling
(docs/benchmarks.md, "Where the long gaps are, measured"; docs/operations.md).

Every serving process exports it (`pdserve_event_loop_lag_seconds`, by process), and the
benchmark client records its own stalls beside its measurements (bench/serve.py): a gap
a client saw during its own stall is the client's, not the server's.

`watch` is the only part with a clock and a sleep; `Stalls` is pure."""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from pdserve import metrics as M

PERIOD_S = 0.01          # the benchmark client's period: 100 wake-ups a second
# a serving process's period (PDSERVE_LOOP_LAG_PERIOD_S): at 10 ms each process's loop
# woke about 110 times a second and used 1.1-1.6% of a core doing it, idle (measured,
# 4 processes on the prefill engine's core under `--serving-cores auto`); at 100 ms
# every stall of 100 ms or more is still seen (the ones found were 100-365 ms), and a
# shorter one of L with a chance of L/period
SERVING_PERIOD_S = 0.1
STALL_S = 0.05           # a lag this long is a stall worth its own record


@dataclass
class Stalls:
    """Lags of at least `min_s`, each as (when the late wake-up was due, how late it
    came), and how many wake-ups were measured. Pure."""
    min_s: float = STALL_S
    seen: list[tuple[float, float]] = field(default_factory=list)
    samples: int = 0

    def __call__(self, due: float, lag_s: float) -> None:
        self.samples += 1
        if lag_s >= self.min_s:
            self.seen.append((due, lag_s))

    def worst_s(self) -> float:
        return max((lag for _, lag in self.seen), default=0.0)


async def watch(observe: Callable[[float, float], None], period_s: float = PERIOD_S,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Forever: sleep `period_s`, then `observe(due, lag)`: when the wake-up was due
    (`clock`'s time) and how much later it came (0 or more). Cancel it to stop."""
    while True:
        due = clock() + period_s
        await asyncio.sleep(period_s)
        observe(due, max(0.0, clock() - due))


def serving_period_s() -> float:
    """SERVING_PERIOD_S, or PDSERVE_LOOP_LAG_PERIOD_S where set to a positive number."""
    try:
        v = float(os.environ.get("PDSERVE_LOOP_LAG_PERIOD_S", ""))
    except ValueError:
        return SERVING_PERIOD_S
    return v if math.isfinite(v) and v > 0 else SERVING_PERIOD_S


def export(process: str) -> asyncio.Task:
    """Watch the running loop into `pdserve_event_loop_lag_seconds{process=...}`, every
    `serving_period_s()`."""
    hist = M.EVENT_LOOP_LAG.labels(process)
    return asyncio.get_running_loop().create_task(
        watch(lambda _due, lag: hist.observe(lag), period_s=serving_period_s()),
        name=f"loop-lag-{process}")
