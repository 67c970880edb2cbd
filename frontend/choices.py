"""Several choices in one OpenAI request: a list of prompts, `n` samples of each, or both.

Every choice is one request through the cluster (route, prefill, decode), as vLLM runs
every child of a parallel-sampling request as its own engine request. The `n` samples of
one prompt share its prefill: the first runs alone until its first token is out (its
prompt is then in the prefill worker's prefix cache, and the scheduler's KV-aware
placement sends the others there); the others then start together and each prefills only
what vLLM recomputes on a full prefix hit, its last prompt token. Their decodes read the
same prompt blocks (or hit the decode worker's own prefix cache). Choice `j` of prompt `i`
is index `i * n + j`, with seed `seed + j` when the request is seeded: both as vLLM's
server does.

No HTTP here: the endpoint hands in `run(request_id, prompt_ids, sampling)`, the cluster
client's stream of chunks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from pdserve.rpc import pd_pb2

MAX_CHOICES = 64           # prompts x n per request (each one is a request in the cluster)


@dataclass(frozen=True)
class Job:
    index: int                       # the choice's index in the response
    prompt: int                      # which prompt of the request
    ids: list[int]
    sampling: pd_pb2.SamplingParams
    request_id: str


def plan(request_id: str, prompts: list[tuple[list[int], pd_pb2.SamplingParams]],
         n: int) -> list[Job]:
    """One job per choice: `n` of each (prompt ids, sampling) pair."""
    jobs = []
    single = len(prompts) * n == 1
    for i, (ids, sampling) in enumerate(prompts):
        for j in range(n):
            sp = sampling
            if j and sampling.HasField("seed"):
                sp = pd_pb2.SamplingParams()
                sp.CopyFrom(sampling)
                sp.seed = sampling.seed + j
            k = i * n + j
            jobs.append(Job(k, i, ids, sp, request_id if single else f"{request_id}-{k}"))
    return jobs


_END = object()


async def run_jobs(jobs: list[Job], run: Callable[..., AsyncIterator[Any]]
                   ) -> AsyncIterator[tuple[Job, Any]]:
    """(job, chunk) as the chunks come, from every job. The first failure cancels the
    other jobs (their workers abort and free their KV) and is raised; so is closing the
    iterator early (a client that hung up)."""
    q: asyncio.Queue = asyncio.Queue()
    leaders = {}
    for job in jobs:
        leaders.setdefault(job.prompt, job.index)
    gates = {p: asyncio.Event() for p in leaders}

    async def one(job: Job) -> None:
        lead = leaders[job.prompt] == job.index
        try:
            if not lead:
                await gates[job.prompt].wait()
            async for ch in run(job.request_id, job.ids, job.sampling):
                if lead:
                    gates[job.prompt].set()
                await q.put((job, ch))
            await q.put((job, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            await q.put((job, e))
        finally:
            if lead:
                gates[job.prompt].set()

    tasks = [asyncio.create_task(one(j)) for j in jobs]
    left = len(jobs)
    try:
        while left:
            job, item = await q.get()
            if item is _END:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield job, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
