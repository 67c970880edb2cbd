"""How pdserve patches vLLM: each patch is behind an environment switch that pdserve sets
for its own engines only (other uses of vLLM in the same virtualenv are untouched), and
applies at most once per process (vLLM may load a general plugin more than once)."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator


def switched_once(switch: str) -> Callable[[Callable[[], bool]], Callable[[], bool]]:
    """Decorate a patch `apply() -> bool` (True: applied; False: this vLLM has nothing to
    patch, so a later call may try again). The decorated call runs `apply` only while
    `switch` is "1" in the environment and it has not applied yet, and says whether it
    applied now. `.applied` on it is the state (tests reset it)."""
    def decorate(apply: Callable[[], bool]) -> Callable[[], bool]:
        @functools.wraps(apply)
        def run() -> bool:
            if run.applied or os.environ.get(switch, "0") != "1":
                return False
            run.applied = bool(apply())
            return run.applied
        run.applied = False
        run.switch = switch
        return run
    return decorate


def scheduled(out: Any, requests: dict) -> Iterator[tuple[Any, int, int]]:
    """Each request one vLLM scheduler step scheduled, from its SchedulerOutput `out` and
    the scheduler's `requests`: (request, tokens scheduled, tokens computed before the
    step). vLLM advances `num_computed_tokens` in schedule(), so the step's own tokens are
    taken off it; a request the scheduler no longer holds is skipped."""
    for rid, n in out.num_scheduled_tokens.items():
        r = requests.get(rid)
        if r is not None:
            yield r, n, r.num_computed_tokens - n
