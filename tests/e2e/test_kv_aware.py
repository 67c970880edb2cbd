"""KV-aware placement with real engines: 2 prefill workers + 1 decode worker (tiny model).

First, that worker counts are options: the 2P1D cluster gives the 1P1D one's answers.

vLLM's KV events travel worker -> scheduler; the scheduler's prediction of cached tokens
must equal what the prefill engine then really finds in its cache, requests sharing a
system prompt must land where it is cached, and the prefill engines' own counters must
show the hits. Then a prefill worker is killed with SIGKILL under load: every request
completes (re-placed) or ends with a clear error, and the dead worker leaves the index.
"""

import asyncio
import os
import re
import signal

import httpx
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import metric_value, pid_of, sched, wait_until
from tests.e2e.conftest import serving, words

BS = 128


@pytest.fixture(scope="module")
def kv_cluster(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "kv_aware",
                       extra=["--prefill-workers", "2", "--decode-workers", "1", "--policy",
                              "kv", "--keep-going", "--worker-restarts", "0"])


def complete(c, prompt, max_tokens=4):
    r = httpx.post(f"{c.url}/v1/completions", json={
        "model": c.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120)
    assert r.status_code == 200, r.text
    route = dict(re.findall(r"(\w+)=(\S+)", r.headers["x-pdserve-route"]))
    return r.json(), route


def prefix_hits(c, worker_id):
    w = next(w for w in c.workers() if w.worker_id == worker_id)
    return metric_value(c.metrics(w), "vllm:prefix_cache_hits_total")


def wait_indexed(c, worker_id, at_least, timeout=10.0):
    def indexed():
        st = sched(c).IndexStats(pd_pb2.IndexStatsRequest(), timeout=5)
        return st if st.blocks_by_worker.get(worker_id, 0) >= at_least else None
    return wait_until(indexed, timeout, 0.1, f"{at_least} blocks of {worker_id} indexed")


def test_requests_sharing_a_system_prompt_go_where_it_is_cached(kv_cluster):
    c = kv_cluster
    sys_a, sys_b = words(5 * BS, seed=11), words(5 * BS, seed=12)
    s = sched(c)
    # pin each system prompt to a different worker by draining the other one once
    first = {}
    for sysp, drained in ((sys_a, "prefill-1"), (sys_b, "prefill-0")):
        assert s.Drain(pd_pb2.DrainRequest(worker_id=drained, drain=True)).found
        _, route = complete(c, sysp + " " + words(40, seed=1))
        s.Drain(pd_pb2.DrainRequest(worker_id=drained, drain=False))
        first[sysp] = route["prefill"]
        wait_indexed(c, route["prefill"], 5)
    assert first[sys_a] == "prefill-0" and first[sys_b] == "prefill-1"
    wait_sched_idle(c)

    hits0 = {w: prefix_hits(c, w) for w in ("prefill-0", "prefill-1")}
    expected_hits = {"prefill-0": 0, "prefill-1": 0}
    for i in range(4):
        for sysp in (sys_a, sys_b):
            body, route = complete(c, sysp + " " + words(30 + 7 * i, seed=100 + i))
            # placement follows the cache, not the (idle, equal) load
            assert route["prefill"] == first[sysp], (route, c.workers())
            # the scheduler's prediction from KV events == what the engine really found
            cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == int(route["predicted_cached"]) == 5 * BS, (body["usage"], route)
            expected_hits[route["prefill"]] += cached
    hits = {w: prefix_hits(c, w) - hits0[w] for w in hits0}
    assert hits == expected_hits and all(v == 4 * 5 * BS for v in hits.values()), hits
    st = s.IndexStats(pd_pb2.IndexStatsRequest())
    assert st.hit_blocks >= 8 * 5 and st.decisions["disagg:kv"] >= 8


async def test_two_prefill_workers_share_load_and_agree_with_1p1d(cluster, kv_cluster):
    """Worker counts are options: 2 prefill workers + 1 decode worker, each its own
    process, give the 1P1D cluster's answers and both prefill workers take a share."""
    c = kv_cluster
    roles = sorted(w.role for w in c.workers())
    assert roles == [pd_pb2.ROLE_PREFILL, pd_pb2.ROLE_PREFILL, pd_pb2.ROLE_DECODE]
    prompts = [words(120 + 10 * i, seed=900 + i) for i in range(12)]

    def served():
        return {w.worker_id: metric_value(c.metrics(w), "pdserve_worker_requests_total",
                                          outcome="ok")
                for w in c.workers() if w.role == pd_pb2.ROLE_PREFILL}

    async def texts(c):
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(p):
                r = await client.post(f"{c.url}/v1/completions", json={
                    "model": c.model_name, "prompt": p, "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*[one(p) for p in prompts])

    before = served()
    assert await texts(c) == await texts(cluster)
    after = served()
    share = {w: after[w] - before.get(w, 0) for w in after}
    # every prompt prefilled remotely (--policy kv), on both workers
    assert len(share) == 2 and all(n > 0 for n in share.values()), share
    assert sum(share.values()) == len(prompts), share


def wait_sched_idle(c, timeout=10.0):
    """Until the scheduler's view of every worker shows no load (heartbeats caught up)."""
    wait_until(lambda: all(not (w.inflight or w.load.prefill_tokens or w.load.running)
                           for w in c.workers()), timeout, 0.1, "no load in the scheduler's view")


async def test_sigkill_of_a_prefill_worker_under_load(kv_cluster):
    c = kv_cluster
    victim = "prefill-1"
    prompts = [words(900, seed=500 + i) for i in range(8)]

    async def one(client, p):
        r = await client.post(f"{c.url}/v1/completions", json={
            "model": c.model_name, "prompt": p, "max_tokens": 6, "temperature": 0})
        return r.status_code, r.json()

    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(one(client, p)) for p in prompts]
        await asyncio.sleep(0.5)                 # requests are in flight on both workers
        os.kill(pid_of(c, victim), signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)
    for status, body in results:
        # completed elsewhere, or a clear OpenAI error: never a hang
        assert status == 200 or body["error"]["message"], body
    assert sum(status == 200 for status, _ in results) >= len(prompts) - 1, results
    # the scheduler drops the dead worker and its index entries; the next requests succeed
    wait_until(lambda: victim not in {w.worker_id for w in c.workers()}, 15, 0.25,
               f"{victim} dropped")
    assert victim not in sched(c).IndexStats(pd_pb2.IndexStatsRequest()).blocks_by_worker
    for i in range(3):
        _, route = complete(c, words(200, seed=900 + i))
        assert route["prefill"] == "prefill-0"
    loads = c.wait_idle()
    assert all(not (v.running or v.waiting or v.kv_usage or v.kv_leases_held)
               for v in loads.values()), loads


def test_scheduler_restart_rebuilds_the_index_and_routing_continues(kv_cluster):
    """SIGKILL the scheduler: the launcher (--keep-going) starts a new one, workers register
    again by themselves and resend their KV snapshots, and placement is KV-aware again."""
    c = kv_cluster
    sysp = words(5 * BS, seed=21)
    _, route = complete(c, sysp + " " + words(20, seed=3))
    owner = route["prefill"]
    wait_indexed(c, owner, 5)
    before = {w.worker_id for w in c.workers()}
    old = pid_of(c, "scheduler")
    os.kill(old, signal.SIGKILL)
    # requests sent while the scheduler is down wait (Route retries), then succeed
    body, route = complete(c, words(50, seed=4))
    assert body["choices"][0]["text"] is not None
    assert re.findall(r"started scheduler \(pid (\d+)\)", c.log_path.read_text())[-1] != str(old)
    # every worker registers again by itself, each on its own heartbeat: the request above
    # needed only one of them (with no decode worker back yet, the prefill worker serves
    # it whole: overflow's fallback), and until the decode worker is back so would the next
    wait_until(lambda: before <= {w.worker_id for w in c.workers()}, 20, 0.2,
               f"{sorted(before)} registered again")
    wait_indexed(c, owner, 5)                     # the snapshot came back with the worker
    wait_sched_idle(c)
    _, route = complete(c, sysp + " " + words(25, seed=5))
    assert route["prefill"] == owner and int(route["predicted_cached"]) == 5 * BS


def test_a_prefill_worker_joins_and_leaves_at_runtime(kv_cluster, tmp_path):
    """A `pdserve prefill` started by hand against the running scheduler registers, gets
    traffic, and on SIGTERM deregisters (drained first) without failing any request."""
    from bench.local_cluster import start_module
    from tests.e2e.cluster import TEST_SECRET
    from tests.e2e.conftest import TEST_DTYPE
    c = kv_cluster
    log = open(tmp_path / "extra.log", "w")
    # joining takes the cluster's secret, as on another host: here by file
    secret = tmp_path / "cluster-secret"
    secret.write_text(TEST_SECRET)
    p = start_module("pdserve.cli", ["prefill", "--worker-id",
                                     "prefill-extra", "--cores", "0", "--scheduler", c.scheduler,
                                     "--model", c.model_dir, "--kv-cache-gib", "0.25",
                                     *TEST_DTYPE,   # its KV layout must match the cluster's
                                     "--cluster-secret-file", str(secret)], log)
    try:
        def registered():
            assert p.poll() is None, (tmp_path / "extra.log").read_text()[-3000:]
            return "prefill-extra" in {w.worker_id for w in c.workers()}
        wait_until(registered, 180, 0.5, "the new worker's registration")
        s = sched(c)
        others = [w.worker_id for w in c.workers()
                  if w.role == pd_pb2.ROLE_PREFILL and w.worker_id != "prefill-extra"]
        for o in others:
            s.Drain(pd_pb2.DrainRequest(worker_id=o, drain=True))
        try:
            for i in range(3):
                _, route = complete(c, words(150, seed=700 + i))
                assert route["prefill"] == "prefill-extra", route
        finally:
            for o in others:
                s.Drain(pd_pb2.DrainRequest(worker_id=o, drain=False))
        # leave: drain, then SIGTERM; requests meanwhile go elsewhere and succeed
        s.Drain(pd_pb2.DrainRequest(worker_id="prefill-extra", drain=True))
        p.send_signal(signal.SIGTERM)
        for i in range(3):
            _, route = complete(c, words(150, seed=800 + i))
            assert route["prefill"] != "prefill-extra"
        assert p.wait(timeout=60) == 0
        assert "prefill-extra" not in {w.worker_id for w in c.workers()}
        assert "prefill-extra" not in sched(c).IndexStats(
            pd_pb2.IndexStatsRequest()).blocks_by_worker
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
