"""Worker counts are options: 2 prefill workers + 1 decode worker, each its own process."""

import asyncio

import httpx
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import metric_value, start_cluster, stop_cluster_proc
from tests.e2e.conftest import assert_no_orphans, words


@pytest.fixture(scope="module")
def two_prefill(tiny_model, tmp_path_factory):
    c = start_cluster(tiny_model, tmp_path_factory.mktemp("logs") / "xpyd.log",
                      extra=["--prefill-workers", "2", "--decode-workers", "1"])
    yield c
    assert stop_cluster_proc(c.proc) == 0
    assert_no_orphans(c.log_path)


async def test_two_prefill_workers_share_load_and_agree_with_1p1d(cluster, two_prefill):
    roles = sorted(w.role for w in two_prefill.workers())
    assert roles == [pd_pb2.ROLE_PREFILL, pd_pb2.ROLE_PREFILL, pd_pb2.ROLE_DECODE]
    prompts = [words(120 + 10 * i, seed=900 + i) for i in range(12)]

    async def texts(c):
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(p):
                r = await client.post(f"{c.url}/v1/completions", json={
                    "model": c.model_name, "prompt": p, "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*[one(p) for p in prompts])

    assert await texts(two_prefill) == await texts(cluster)
    served = {w.worker_id: metric_value(two_prefill.metrics(w), "pdserve_worker_requests_total",
                                        outcome="ok")
              for w in two_prefill.workers() if w.role == pd_pb2.ROLE_PREFILL}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    # the adaptive choice may prefill some of the 12 concurrent prompts on the decode
    # worker while both prefill workers have a queue (scheduler/adaptive.py)
    decode = next(w for w in two_prefill.workers() if w.role == pd_pb2.ROLE_DECODE)
    local = metric_value(two_prefill.metrics(decode), "pdserve_decode_local_prefills_total")
    assert sum(served.values()) + local >= len(prompts), (served, local)
