"""The connector lifecycle tests' harness: worker halves on the in-process loopback
backend (kv_transfer/backends/loopback.py) with real KV agents, and the checks that every
path ends with nothing held. Used by test_connector_lifecycle.py and test_connector_tp.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

from kv_transfer.agent import AgentClients
from kv_transfer.connector.metadata import LoadSpec
from kv_transfer.connector.worker_side import WorkerHalf
from pdserve import auth
from pdserve.rpc import pd_pb2

NB, BS, LAYERS = 12, 16, 3      # blocks, tokens per block, layers


def isolate_env(monkeypatch) -> None:
    """A fresh cluster secret, and none of the debug switches a shell may have set."""
    monkeypatch.setenv(auth.ENV_SECRET, auth.new_secret())
    for k in ("PDSERVE_DEBUG_KV_LOAD_DELAY_S", "PDSERVE_DEBUG_CORRUPT_KV", "PDSERVE_HOLD_WAIT"):
        monkeypatch.delenv(k, raising=False)


def fake_vllm_config(tmp_path, eid: str, extra: dict | None = None, **more) -> SimpleNamespace:
    """What the connector reads of vLLM's config, for engine `eid` on the loopback backend;
    `more`: further sections (parallel_config) or replacements (model_config)."""
    kvt = SimpleNamespace(kv_connector_extra_config={
        "engine_id": eid, "backend": "loopback", "transfer_timeout_s": 2.0,
        "agent_address_file": str(tmp_path / f"{eid}.addr"), **(extra or {})},
        is_kv_producer=True, is_kv_consumer=True, engine_id=eid)
    return SimpleNamespace(**{
        "kv_transfer_config": kvt, "cache_config": SimpleNamespace(block_size=BS),
        "model_config": SimpleNamespace(model="/m/tiny", dtype="float32"), **more})


def results_until(w: WorkerHalf, req_id: str, timeout: float = 10.0):
    """Step the worker half (as vLLM does, once per step) until `req_id` finished."""
    deadline = time.monotonic() + timeout
    failed = set()
    while time.monotonic() < deadline:
        r = w.transfer_results()
        failed |= r.failed_recving
        if req_id in r.finished_recving:
            return req_id not in failed
        time.sleep(0.005)
    raise AssertionError(f"{req_id} never finished")


def release(p: WorkerHalf, tid: str) -> set[str]:
    """The consumer's scheduler half Releases the lease; the producer frees the blocks."""
    AgentClients().get(p.my_address).Release(pd_pb2.LeaseRequest(transfer_ids=[tid]),
                                             timeout=5)
    return p.transfer_results().finished_sending


def assert_empty(*ws: WorkerHalf) -> None:
    for w in ws:
        assert len(w.leases) == 0, w.cfg.engine_id
        assert w._pending == 0 and not w._done, w.cfg.engine_id
        assert not (w._awaiting or w._cancelling), w.cfg.engine_id
        # finished offers stay as tombstones (a late duplicate is refused) until swept
        assert len(w.offers) == 0, w.offers       # none OPEN
        assert not (w._push_recs or w._push_t0 or w._finished_push or w._req_of), \
            w.cfg.engine_id


def load_spec(p: WorkerHalf, req: str, tid: str, local, remote) -> LoadSpec:
    return LoadSpec(req_id=req, transfer_key=f"key-{req}", transfer_id=tid,
                    engine_id=p.cfg.engine_id, agent_address=p.my_address,
                    compat_hash=p.cfg.compat_hash, local_block_ids=list(local),
                    remote_block_ids=list(remote), num_tokens=len(local) * BS,
                    src_block_size=BS, first_token=0, end_token=len(local) * BS)
