"""The KV really moves: destroy the transferred blocks and the output changes.

A second cluster runs with PDSERVE_DEBUG_CORRUPT_KV=zero, which makes the decode
worker zero every block right after it arrives over UCX. If decode recomputed the
prompt instead of using the transferred KV, its output would not change.
"""

import httpx
import pytest

from tests.e2e.conftest import KV, serving, words


@pytest.fixture(scope="module")
def corrupt_cluster(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "corrupt",
                            {"PDSERVE_DEBUG_CORRUPT_KV": "zero"}, KV)


def complete(c, prompt, status="ok", full=False):
    r = httpx.post(f"{c.url}/v1/completions", timeout=120, json={
        "model": c.model_name, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kv_transfer"]["status"] == status, body["kv_transfer"]
    return body if full else body["choices"][0]["text"]


@pytest.mark.parametrize("n", [150, 600, 1200])
def test_zeroed_kv_changes_the_output(cluster, corrupt_cluster, n):
    prompt = words(n, seed=4242 + n)
    good = complete(cluster, prompt)
    assert complete(cluster, prompt) == good            # deterministic when intact
    assert complete(corrupt_cluster, prompt) != good    # transferred bytes matter


@pytest.fixture(scope="module")
def checked_corrupt_cluster(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "checked-corrupt",
                            {"PDSERVE_DEBUG_CORRUPT_KV": "zero"}, ["--kv-checksum", *KV])


def test_checksums_catch_corrupted_kv_and_recompute(cluster, checked_corrupt_cluster):
    """Debug integrity mode: the zeroed blocks no longer match the producer's CRC32, the load
    fails with that reason, the decode engine recomputes the prompt, and the answer is
    right again."""
    from pdserve.rpc import pd_pb2
    from tests.e2e.cluster import metric_value

    c = checked_corrupt_cluster
    for n in (150, 600):
        prompt = words(n, seed=4242 + n)
        body = complete(c, prompt, status="failed", full=True)
        assert body["kv_transfer"]["reason"] == "checksum_mismatch"
        assert body["choices"][0]["text"] == complete(cluster, prompt)
    decode = next(w for w in c.workers() if w.role == pd_pb2.ROLE_DECODE)
    text = c.metrics(decode)
    assert metric_value(text, "pdserve_kv_checksums_total", result="mismatch") == 2
    assert metric_value(text, "pdserve_kv_transfer_failures_total",
                        reason="checksum_mismatch") == 2
    assert metric_value(text, "pdserve_kv_recompute_fallbacks_total") == 2


@pytest.fixture(scope="module")
def tcp_cluster(tiny_model, tmp_path_factory):
    # also the integrity check on a healthy path: every transfer compared, all equal
    yield from serving(tiny_model, tmp_path_factory, "tcp", {"UCX_TLS": "tcp,self"},
                            ["--kv-checksum", *KV])


def test_a_tcp_fallback_is_loud(cluster, tcp_cluster):
    """UCX restricted to TCP on one host: the output is still right, and the decode worker
    says loudly, in its log and in a metric, that KV moves over TCP where shared memory
    was expected."""
    from pdserve.rpc import pd_pb2
    from tests.e2e.cluster import metric_value, wait_until

    prompt = words(300, seed=99)
    body = complete(tcp_cluster, prompt, full=True)
    assert body["kv_transfer"].get("checksummed") is True     # CRC32 equal on both sides
    assert body["choices"][0]["text"] == complete(cluster, prompt)
    decode = next(w for w in tcp_cluster.workers() if w.role == pd_pb2.ROLE_DECODE)
    def fallback_counted():
        text = tcp_cluster.metrics(decode)
        return text if metric_value(text, "pdserve_kv_transport_fallback_peers") == 1 else None
    text = wait_until(fallback_counted, 10, 0.5, "the fallback gauge at 1")   # a heartbeat
    assert metric_value(text, "pdserve_kv_transport_fallback_peers") == 1
    assert metric_value(text, "pdserve_kv_transport_peers", transport="tcp") == 1
    assert "KV TRANSPORT FALLBACK" in tcp_cluster.log_path.read_text()
