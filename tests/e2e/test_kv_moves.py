"""The KV really moves: destroy the transferred blocks and the output changes.

A second cluster runs with PDSERVE_DEBUG_CORRUPT_KV=zero, which makes the decode
worker zero every block right after it arrives over UCX. If decode recomputed the
prompt instead of using the transferred KV, its output would not change.
"""

import httpx
import pytest

from tests.e2e.cluster import start_cluster, stop_cluster_proc
from tests.e2e.conftest import assert_no_orphans, words


@pytest.fixture(scope="module")
def corrupt_cluster(tiny_model, tmp_path_factory):
    c = start_cluster(tiny_model, tmp_path_factory.mktemp("logs") / "corrupt.log",
                      env={"PDSERVE_DEBUG_CORRUPT_KV": "zero"})
    yield c
    assert stop_cluster_proc(c.proc) == 0
    assert_no_orphans(c.log_path)


def complete(c, prompt):
    r = httpx.post(f"{c.url}/v1/completions", timeout=120, json={
        "model": c.model_name, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kv_transfer"]["status"] == "ok"
    return body["choices"][0]["text"]


@pytest.mark.parametrize("n", [150, 600, 1200])
def test_zeroed_kv_changes_the_output(cluster, corrupt_cluster, n):
    prompt = words(n, seed=4242 + n)
    good = complete(cluster, prompt)
    assert complete(cluster, prompt) == good            # deterministic when intact
    assert complete(corrupt_cluster, prompt) != good    # transferred bytes matter
