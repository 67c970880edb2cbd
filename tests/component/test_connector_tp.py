"""Loads between engines of different tensor-parallel degrees (kv_transfer/connector/
ranks.py), on the worker halves of every rank in one process: real KV agents on loopback
and the loopback backend. Each consumer rank must end up with exactly its heads of the
producer's blocks, the producer's lease is rank 0's alone, and every rank reports each
prompt once, as vLLM's aggregator of the ranks' outputs needs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kv_transfer.connector.metadata import PDConnectorMetadata
from kv_transfer.connector.worker_side import WorkerHalf
from kv_transfer.mapping import heads_of_rank
from tests.component.connector_harness import (
    BS,
    LAYERS,
    NB,
    assert_empty,
    fake_vllm_config,
    isolate_env,
    load_spec,
    release,
    results_until,
)

HEADS, HEAD = 4, 8


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    isolate_env(monkeypatch)


@pytest.fixture
def engine(tmp_path):
    made = []

    def _engine(eid: str, tp: int, full: torch.Tensor | None = None) -> list[WorkerHalf]:
        """Every rank of one engine; `full`: its whole KV, [layers, blocks, heads, ...]."""
        full = torch.randn(LAYERS, NB, HEADS, BS, 2 * HEAD) if full is None else full
        ranks = []
        for r in range(tp):
            heads = heads_of_rank(r, tp, HEADS)
            vc = fake_vllm_config(
                tmp_path, eid, parallel_config=SimpleNamespace(tensor_parallel_size=tp, rank=r),
                model_config=SimpleNamespace(model="/m/tiny", dtype="float32",
                                             get_total_num_kv_heads=lambda: HEADS))
            spec = SimpleNamespace(num_kv_heads=len(heads), head_size=HEAD, dtype="float32")
            w = WorkerHalf(vc, SimpleNamespace(kv_cache_groups=[SimpleNamespace(
                kv_cache_spec=spec, layer_names=[])], num_blocks=NB))
            # vLLM's CPU layout, this rank's shard: [blocks, heads, block tokens, 2 x head]
            w.caches = {f"layer{i}": full[i][:, heads].contiguous() for i in range(LAYERS)}
            w.heads = heads
            ranks.append(w)
        for w in ranks:
            w.register_kv_caches(w.caches)
        made.extend(ranks)
        return ranks

    yield _engine
    for w in made:
        w.shutdown()


def holds(c: WorkerHalf, c_ids, full: torch.Tensor, p_ids) -> bool:
    """Consumer rank `c`'s blocks `c_ids` hold its heads of the producer's blocks `p_ids`."""
    return all(torch.equal(c.caches[f"layer{i}"][d], full[i][s][c.heads])
               for i in range(LAYERS) for d, s in zip(c_ids, p_ids))


@pytest.mark.parametrize("tp_p,tp_c", [(2, 1), (1, 2), (2, 2), (4, 2), (1, 4)])
def test_each_consumer_rank_gets_its_heads_and_the_lease_is_rank_0s(engine, tp_p, tp_c):
    full = torch.randn(LAYERS, NB, HEADS, BS, 2 * HEAD)
    ps, cs = engine("p", tp_p, full), engine("c", tp_c)
    for p in ps:                        # every rank gets the scheduler's metadata
        p.start_load_kv(PDConnectorMetadata(leases={"t1": 2}))
    assert not holds(cs[0], [5, 6], full, [1, 3])
    # rank 0 holds the lease; the others reported the prompt as sent, once
    assert len(ps[0].leases) == 1
    for p in ps[1:]:
        assert p.transfer_results().finished_sending == {"t1"}
        assert not p.transfer_results().finished_sending
    for c in cs:                        # the handle names rank 0 only
        c.start_load_kv(PDConnectorMetadata(
            loads=[load_spec(ps[0], "r1", "t1", [5, 6], [1, 3])]))
    for c in cs:
        assert results_until(c, "r1"), c.records
        assert holds(c, [5, 6], full, [1, 3])
        assert not holds(c, [4], full, [0])
        rec = c.records.pop("key-r1")
        assert rec.status == "ok" and rec.bytes == 2 * LAYERS * len(c.heads) * BS * 2 * HEAD * 4
    assert release(ps[0], "t1") == {"t1"}
    assert_empty(*ps, *cs)


def test_a_rank_that_has_not_started_makes_the_load_fail_not_hang(engine, tmp_path):
    ps, (c,) = engine("p", 2), engine("c", 1)
    ps[0].start_load_kv(PDConnectorMetadata(leases={"t1": 1}))
    (tmp_path / "p.addr.rank1").unlink()          # rank 1's agent "not published yet"
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(ps[0], "r1", "t1", [5], [1])]))
    assert not results_until(c, "r1")
    assert c.records["key-r1"].status == "failed"
    assert release(ps[0], "t1") == {"t1"}
    assert_empty(*ps, c)
