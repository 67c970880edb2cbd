"""Fault injection with real processes, in the middle of KV transfers.

Cluster: 1 prefill + 2 decode workers (tiny model), --keep-going, leases of 4 s. The
consumer waits 1.5 s between pinning a lease and READing (PDSERVE_DEBUG_KV_LOAD_DELAY_S, a
test-only switch), so a test can act while loads are in flight:
1. clients hang up during the loads: both sides free everything;
2. a decode worker is killed with SIGKILL (its whole process group) during its loads: the
   prefill worker frees the blocks when the leases end, every request ends, the other
   decode worker serves the next requests;
3. the prefill worker is killed with SIGKILL during the loads: the decode worker notices
   within the transfer timeout, recomputes the prompts itself (counted), and serves the next
   requests with no prefill worker left.
Every request ends, completed or with a clear OpenAI-style error; the survivors' KV usage
returns to zero.
"""

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import assert_idle, by_role, metric_value, pid_of, wait_until
from tests.e2e.conftest import serving, words

LEASE_S = 4.0
DELAY_S = 1.5


@pytest.fixture(scope="module")
def fc(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "faults",
                       env={"PDSERVE_DEBUG_KV_LOAD_DELAY_S": str(DELAY_S)},
                       extra=["--prefill-workers", "1", "--decode-workers", "2",
                              "--keep-going",
                              "--worker-restarts", "0",   # killed workers stay dead here
                              "--lease-s", str(LEASE_S), "--transfer-timeout-s", "3",
                              # transfers must happen here: the adaptive policy would
                              # learn the injected 1.5 s loads and prefill locally instead
                              "--policy", "kv"])


def wait_loading(c, timeout=30.0) -> pd_pb2.WorkerInfo:
    """A decode worker with KV loads in flight (pinned, not yet read)."""
    return wait_until(lambda: next((w for w in by_role(c, pd_pb2.ROLE_DECODE)
                                    if c.status(w).load.kv_leases_held > 0), None),
                      timeout, 0.05, "a decode worker's KV load")


def body(c, i, n_words=300, max_tokens=8, stream=False):
    return {"model": c.model_name, "prompt": words(n_words, seed=9000 + i),
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def send(client, c, i):
    r = await client.post(f"{c.url}/v1/completions", json=body(c, i))
    return r.status_code, r.json()


def ended_cleanly(status, js):
    if status == 200:
        return len(js["choices"][0]["text"]) > 0 or js["usage"]["completion_tokens"] > 0
    return status >= 400 and js["error"]["message"] and js["error"]["type"]


def next_requests_succeed(c, n=3):
    for i in range(n):
        r = httpx.post(f"{c.url}/v1/completions", json=body(c, 500 + i, 120, 4), timeout=60)
        assert r.status_code == 200, r.text


def cpu_seconds(pid: int) -> float:
    """CPU time of a worker's process tree (its vLLM engine-core and worker processes)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def test_engines_sleep_while_only_transfers_are_pending(fc):
    """While the one request's load waits (the 1.5 s debug delay), the prefill engine
    holds its blocks under lease and the decode engine waits on the load: neither has a
    step to take. Both engine cores sleep (kv_transfer/wakeup.py) instead of stepping
    empty in a loop, which kept a whole core busy on each side. And the worker half wakes
    its engine core when the load ends: the decode engine's first token follows the load
    by far less than the sleep's bound (HOLD_WAIT_S), which a missed wakeup would add."""
    from kv_transfer.wakeup import HOLD_WAIT_S

    async def stream():
        times, rec = [], None
        async with client.stream("POST", f"{fc.url}/v1/completions",
                                 json=body(fc, 50, max_tokens=4, stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.monotonic())
                rec = ev.get("kv_transfer") or rec
        return times, rec

    async with httpx.AsyncClient(timeout=60) as client:
        req = asyncio.create_task(stream())
        d = await asyncio.to_thread(wait_loading, fc)
        pids = {"prefill-0": pid_of(fc, "prefill-0"), d.worker_id: pid_of(fc, d.worker_id)}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.monotonic()
        await asyncio.sleep(0.8)   # inside the 1.5 s between the lease pin and the READ
        used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        wall = time.monotonic() - t0
        times, rec = await req
    # a busy empty-step loop costs most of a core (0.5-1 CPU-s per s here); asleep, the
    # progress thread, heartbeats and 10 ms polls cost a few percent
    assert all(u < 0.3 * wall for u in used.values()), (used, wall)
    assert rec is not None and rec["status"] == "ok", rec
    # first token: the prefill worker's; second: the decode worker's, after its load
    # (rec["seconds"]: the whole load, the debug delay included)
    assert len(times) >= 2, times
    after_load = times[1] - times[0] - rec["seconds"]
    assert after_load < 0.6 * HOLD_WAIT_S, (after_load, rec)


async def test_clients_hang_up_during_kv_loads(fc):
    async with httpx.AsyncClient(timeout=60) as client:
        async def hang_up(i):
            async with client.stream("POST", f"{fc.url}/v1/completions",
                                     json=body(fc, i, max_tokens=64, stream=True)) as s:
                async for _ in s.aiter_lines():
                    await asyncio.sleep(30)     # never read on: cancelled below
        tasks = [asyncio.create_task(hang_up(i)) for i in range(3)]
        await asyncio.to_thread(wait_loading, fc)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert_idle(fc, fc.workers())
    next_requests_succeed(fc)


async def test_sigkill_decode_worker_mid_transfer(fc):
    prefill = by_role(fc, pd_pb2.ROLE_PREFILL)[0]
    async with httpx.AsyncClient(timeout=120) as client:
        reqs = [asyncio.create_task(send(client, fc, 100 + i)) for i in range(4)]
        victim = await asyncio.to_thread(wait_loading, fc)
        os.killpg(pid_of(fc, victim.worker_id), signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*reqs), 90)
    assert all(ended_cleanly(s, js) for s, js in results), results
    assert time.monotonic() - t0 < 60
    # the dead consumer never released its pinned blocks: the frontend, seeing the decode
    # worker gone before any output, releases them (else they expire after a lease)
    assert "placing request" in fc.log_path.read_text()
    survivors = [w for w in fc.workers() if w.worker_id != victim.worker_id]
    assert prefill.worker_id in {w.worker_id for w in survivors}
    assert_idle(fc, survivors, timeout=LEASE_S + 15)
    next_requests_succeed(fc)


async def test_sigkill_prefill_worker_mid_transfer(fc):
    decodes = by_role(fc, pd_pb2.ROLE_DECODE)
    assert len(decodes) == 1          # the previous test killed the other one
    d = decodes[0]
    before = fc.metrics(d)
    async with httpx.AsyncClient(timeout=120) as client:
        reqs = [asyncio.create_task(send(client, fc, 200 + i)) for i in range(3)]
        await asyncio.to_thread(wait_loading, fc)
        os.killpg(pid_of(fc, "prefill-0"), signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*reqs), 90)
    waited = time.monotonic() - t0
    # the decode worker noticed within its transfer budget and recomputed the prompts
    assert all(s == 200 for s, _ in results), results
    assert waited < DELAY_S + 3 + 10, waited
    after = fc.metrics(d)
    fallbacks = (metric_value(after, "pdserve_kv_recompute_fallbacks_total")
                 - metric_value(before, "pdserve_kv_recompute_fallbacks_total"))
    failures = (metric_value(after, "pdserve_kv_transfer_failures_total")
                - metric_value(before, "pdserve_kv_transfer_failures_total"))
    assert fallbacks >= 1 and failures == fallbacks, (fallbacks, failures)
    assert_idle(fc, [d])
    # no prefill worker left: the decode worker prefills the next requests itself
    next_requests_succeed(fc)
    # the dead worker leaves on heartbeat timeout
    wait_until(lambda: not by_role(fc, pd_pb2.ROLE_PREFILL), 30, 0.25,
               "the dead prefill worker's removal")
    next_requests_succeed(fc)
