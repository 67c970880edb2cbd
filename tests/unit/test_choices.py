"""Several choices per request (frontend/choices.py): indexes and seeds as vLLM's server
gives them, the samples of one prompt waiting for its prefill, and the first failure
cancelling the rest. No network: `run` is a fake stream."""

import asyncio

import pytest

from frontend import choices
from pdserve.rpc import pd_pb2


def sp(seed=None):
    s = pd_pb2.SamplingParams(max_tokens=4)
    if seed is not None:
        s.seed = seed
    return s


def test_plan_indexes_ids_and_seeds():
    jobs = choices.plan("r", [([1, 2], sp(10)), ([3], sp(10))], n=3)
    assert [(j.index, j.prompt) for j in jobs] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1),
                                                  (5, 1)]
    assert [j.sampling.seed for j in jobs] == [10, 11, 12, 10, 11, 12]   # vLLM: seed + j
    assert len({j.request_id for j in jobs}) == 6
    (one,) = choices.plan("r", [([1], sp())], n=1)
    assert one.request_id == "r" and not one.sampling.HasField("seed")
    assert all(not j.sampling.HasField("seed") for j in choices.plan("r", [([1], sp())], 3))


async def collect(jobs, run):
    return [(j.index, ch) async for j, ch in choices.run_jobs(jobs, run)]


async def test_samples_of_a_prompt_wait_for_its_first_token():
    events = []
    gate = asyncio.Event()

    async def run(rid, ids, s):
        events.append(("start", rid))
        if rid.endswith("-0"):
            await gate.wait()          # the leader's prefill takes a while
        yield f"{rid}:a"
        events.append(("first", rid))
        yield f"{rid}:b"

    jobs = choices.plan("r", [([1], sp()), ([2], sp())], n=2)
    task = asyncio.create_task(collect(jobs, run))
    for _ in range(20):
        await asyncio.sleep(0)
    # prompt 0's second sample waits; prompt 1 (its own leader) and its sample proceed
    started = {rid for what, rid in events if what == "start"}
    assert "r-0" in started and "r-1" not in started and {"r-2", "r-3"} <= started
    gate.set()
    got = await task
    assert sorted(got) == sorted((i, f"r-{i}:{x}") for i in range(4) for x in "ab")
    assert events.index(("start", "r-1")) > events.index(("first", "r-0"))


async def test_the_first_failure_cancels_the_others_and_is_raised():
    cancelled = []

    async def run(rid, ids, s):
        if rid == "r-1":
            yield "x"
            raise RuntimeError("decode worker died")
        try:
            while True:
                yield "y"
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.append(rid)
            raise

    jobs = choices.plan("r", [([1], sp())], n=3)
    with pytest.raises(RuntimeError, match="decode worker died"):
        await collect(jobs, run)
    assert sorted(cancelled) == ["r-0", "r-2"]


async def test_closing_early_cancels_every_job():
    cancelled = []

    async def run(rid, ids, s):
        try:
            while True:
                yield rid
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.append(rid)
            raise

    it = choices.run_jobs(choices.plan("r", [([1], sp()), ([2], sp())], n=1), run)
    await it.__anext__()
    await it.aclose()                  # the client hung up
    assert sorted(cancelled) == ["r-0", "r-1"]
