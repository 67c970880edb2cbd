"""ConnectorConfig: the connector's configuration, parsed once from vLLM's config (the
fields pdserve/engine.py writes into kv_connector_extra_config), defaults in one place."""

from types import SimpleNamespace

import pytest

from kv_transfer.connector.config import ConnectorConfig


def vllm_config(extra: dict, producer=True, consumer=True, engine_id="eng-x",
                block_size=128):
    kvt = SimpleNamespace(kv_connector_extra_config=extra, is_kv_producer=producer,
                          is_kv_consumer=consumer, engine_id=engine_id)
    return SimpleNamespace(kv_transfer_config=kvt,
                           cache_config=SimpleNamespace(block_size=block_size),
                           model_config=SimpleNamespace(model="/models/tiny", dtype="float32"))


KV_CACHE = SimpleNamespace(kv_cache_groups=[])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("PDSERVE_DEBUG_KV_LOAD_DELAY_S", "PDSERVE_DEBUG_CORRUPT_KV", "PDSERVE_HOLD_WAIT",
              "PDSERVE_KV_HUGE_PAGES"):
        monkeypatch.delenv(k, raising=False)


def test_defaults_without_extra_config():
    c = ConnectorConfig.from_vllm(vllm_config({}), KV_CACHE)
    assert (c.engine_id, c.block_size, c.agent_host, c.agent_port) == (
        "eng-x", 128, "127.0.0.1", 0)
    assert (c.lease_s, c.acquire_extend_s, c.transfer_timeout_s, c.push_ttl_s) == (
        30.0, 30.0, 20.0, 60.0)
    assert (c.kv_mode, c.checksum, c.max_peers, c.agent_file) == ("pull", False, 64, None)
    # a producer runs a NIXL progress thread (woken by UCX, 100 ms at most); a consumer none
    assert c.progress_delay_us == 100000
    assert ConnectorConfig.from_vllm(vllm_config({}, producer=False), KV_CACHE
                                     ).progress_delay_us == 0
    # no test switch is on unless the environment says so
    assert (c.debug_load_delay_s, c.debug_corrupt, c.hold_wait, c.huge_pages) == (
        0.0, "", False, True)
    assert c.compat_hash   # from the model and KV specs, the same on both halves


def test_extra_config_overrides_and_types():
    c = ConnectorConfig.from_vllm(vllm_config({
        "engine_id": "prefill-3", "agent_host": "10.0.0.5", "agent_port": "7001",
        "agent_address_file": "/run/x/agent", "lease_s": "12", "acquire_extend_s": 9,
        "transfer_timeout_s": 4.5, "kv_mode": "push", "push_ttl_s": 5, "checksum": True,
        "max_peers": 8, "progress_delay_us": 250, "expect_transport": "rc",
        "ucx_err_mode": "peer"}), KV_CACHE)
    assert c.engine_id == "prefill-3" and c.agent_port == 7001
    assert (c.agent_host, c.agent_file) == ("10.0.0.5", "/run/x/agent")
    assert (c.lease_s, c.acquire_extend_s, c.transfer_timeout_s) == (12.0, 9.0, 4.5)
    assert (c.kv_mode, c.push_ttl_s, c.checksum, c.max_peers) == ("push", 5.0, True, 8)
    assert (c.progress_delay_us, c.expect_transport, c.ucx_err_mode) == (250, "rc", "peer")


def test_test_switches_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_DEBUG_KV_LOAD_DELAY_S", "1.5")
    monkeypatch.setenv("PDSERVE_DEBUG_CORRUPT_KV", "zero")
    monkeypatch.setenv("PDSERVE_HOLD_WAIT", "1")
    monkeypatch.setenv("PDSERVE_KV_HUGE_PAGES", "0")
    c = ConnectorConfig.from_vllm(vllm_config({}), KV_CACHE)
    assert (c.debug_load_delay_s, c.debug_corrupt, c.hold_wait, c.huge_pages) == (
        1.5, "zero", True, False)


def test_compat_hash_ignores_the_block_size_but_not_the_model():
    a = ConnectorConfig.from_vllm(vllm_config({}, block_size=16), KV_CACHE)
    b = ConnectorConfig.from_vllm(vllm_config({}, block_size=128), KV_CACHE)
    other = vllm_config({})
    other.model_config.model = "/models/other"
    assert a.compat_hash == b.compat_hash   # consumers read across block sizes (relayout)
    assert ConnectorConfig.from_vllm(other, KV_CACHE).compat_hash != a.compat_hash
