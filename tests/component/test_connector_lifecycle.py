"""The connector's worker half, producer and consumer, in one process: real KV agents
(gRPC on loopback, authenticated) and the in-process loopback backend
(kv_transfer/backends/loopback.py) instead of NIXL, with its fault injection. Every path
ends as vLLM's `assert_scheduler_empty` would want: no lease, offer, pending load, push
wait or push record left on either side, and the blocks really copied."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from kv_transfer.agent import AgentClients
from kv_transfer.connector.metadata import OfferSpec, PDConnectorMetadata, PushChunk
from kv_transfer.connector.worker_side import WorkerHalf
from pdserve.rpc import pd_pb2
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


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    isolate_env(monkeypatch)


@pytest.fixture
def make(tmp_path):
    made = []

    def _make(eid: str, **extra) -> WorkerHalf:
        w = WorkerHalf(fake_vllm_config(tmp_path, eid, extra),
                       SimpleNamespace(kv_cache_groups=[], num_blocks=NB))
        # vLLM's CPU layout: [blocks, K/V, block tokens, heads x head size]
        w.caches = {f"layer{i}": torch.randn(NB, 2, BS, 8) for i in range(LAYERS)}
        w.register_kv_caches(w.caches)
        made.append(w)
        return w

    yield _make
    for w in made:
        w.shutdown()


def same_blocks(dst: WorkerHalf, dst_ids, src: WorkerHalf, src_ids) -> bool:
    return all(torch.equal(dst.caches[n][d], src.caches[n][s])
               for n in dst.caches for d, s in zip(dst_ids, src_ids))


def test_pull_copies_the_blocks_and_ends_with_nothing_held(make):
    p, c = make("p"), make("c")
    p.start_load_kv(PDConnectorMetadata(leases={"t1": 2}))
    assert not same_blocks(c, [5, 6], p, [1, 3])
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r1", "t1", [5, 6], [1, 3])]))
    assert results_until(c, "r1")
    assert same_blocks(c, [5, 6], p, [1, 3])
    assert not same_blocks(c, [4], p, [0])        # nothing else was touched
    assert release(p, "t1") == {"t1"}
    # the record waits for the decode worker, which pops it with the stats
    stats = AgentClients().get(c.my_address).Stats(
        pd_pb2.AgentStatsRequest(pop_transfer_ids=["key-r1"]), timeout=5)
    rec = stats.records["key-r1"]
    assert rec.status == "ok" and rec.bytes == 2 * LAYERS * 2 * BS * 8 * 4
    assert not c.records
    assert_empty(p, c)


def test_a_dead_producer_fails_the_load_and_nothing_is_left(make):
    p, c = make("p"), make("c")
    p.start_load_kv(PDConnectorMetadata(leases={"t1": 1, "t2": 1}))
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r1", "t1", [5], [1])]))
    assert results_until(c, "r1")                 # the handshake is done
    assert release(p, "t1") == {"t1"}
    p.backend.faults.dead = True                  # the data plane dies, the agent answers
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r2", "t2", [6], [2])]))
    assert not results_until(c, "r2")
    assert c.records["key-r2"].reason == "peer_unreachable"
    assert not c.backend.has_remote("p")          # the next transfer shakes hands again
    assert release(p, "t2") == {"t2"}
    p.shutdown()                                  # and now the whole producer is gone
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r3", "t3", [7], [3])]))
    assert not results_until(c, "r3")
    assert c.records["key-r3"].reason == "peer_unreachable"
    assert_empty(c)


def test_a_read_that_never_completes_times_out(make):
    p, c = make("p"), make("c", transfer_timeout_s=0.3)
    p.start_load_kv(PDConnectorMetadata(leases={"t1": 1}))
    p.backend.faults.drop = True
    t0 = time.monotonic()
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r1", "t1", [5], [1])]))
    assert not results_until(c, "r1")
    assert time.monotonic() - t0 < 5
    assert c.records["key-r1"].reason == "timeout"
    assert release(p, "t1") == {"t1"}
    assert_empty(p, c)


def test_an_expired_lease_frees_the_blocks_and_refuses_the_read(make):
    p, c = make("p", lease_s=0.05), make("c")
    p.start_load_kv(PDConnectorMetadata(leases={"t1": 1}))
    deadline = time.monotonic() + 5
    freed: set[str] = set()
    while "t1" not in freed and time.monotonic() < deadline:
        freed |= p.transfer_results().finished_sending
    assert "t1" in freed                          # on the producer's own clock
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r1", "t1", [5], [1])]))
    assert not results_until(c, "r1")
    assert c.records["key-r1"].reason == "lease_expired"
    assert_empty(p, c)


def test_checksums_catch_corrupted_blocks(make):
    p, c = make("p", checksum=True), make("c", checksum=True)
    p.start_load_kv(PDConnectorMetadata(leases={"t1": 1, "t2": 1}))
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r1", "t1", [5], [1])]))
    assert results_until(c, "r1") and c.records["key-r1"].checksummed
    p.backend.faults.corrupt = True
    c.start_load_kv(PDConnectorMetadata(loads=[load_spec(p, "r2", "t2", [6], [2])]))
    assert not results_until(c, "r2")
    assert c.records["key-r2"].reason == "checksum_mismatch"
    assert release(p, "t1") | release(p, "t2") == {"t1", "t2"}
    assert_empty(p, c)


def offer(p: WorkerHalf, req: str, tid: str, blocks) -> OfferSpec:
    return OfferSpec(req_id=req, transfer_key=f"key-{req}", transfer_id=tid,
                     agent_address=p.my_address, block_ids=list(blocks), skip_blocks=0,
                     num_tokens=len(blocks) * BS)


def offered(p: WorkerHalf, c: WorkerHalf) -> None:
    """The consumer offers blocks 7, 8 for transfer t1; wait until the producer has it."""
    c.start_load_kv(PDConnectorMetadata(offers=[offer(p, "cr", "t1", [7, 8])]))
    deadline = time.monotonic() + 5
    while "t1" not in p.offers.offers and time.monotonic() < deadline:
        time.sleep(0.005)
    assert "t1" in p.offers.offers


def prefill_step(p: WorkerHalf, forward: bool = True) -> None:
    """The producer's step computes the whole 2-block prompt of request pr (transfer t1)
    into its blocks 2, 4; `forward`: each layer is saved as the forward pass finishes it,
    then the step waits for its WRITEs."""
    p.start_load_kv(PDConnectorMetadata(leases={"pr": 2}, pushes=[
        PushChunk("pr", "t1", [2, 4], 0, 2 * BS, 2 * BS)]))
    if forward:
        for name in p.caches:
            p.save_kv_layer(name)
    p.wait_for_save()


def test_push_layer_by_layer_then_notify(make):
    p, c = make("p", kv_mode="push"), make("c", kv_mode="push")
    offered(p, c)
    prefill_step(p)          # each layer written as computed, then the consumer notified
    assert p.backend.transfers == LAYERS
    assert results_until(c, "cr")
    assert same_blocks(c, [7, 8], p, [2, 4])
    assert p.transfer_results().finished_sending == {"pr"}   # freed once pushed
    assert p.records["t1"].status == "ok"
    assert_empty(p, c)


def test_a_prompt_finished_before_its_offer_is_pushed_whole(make):
    p, c = make("p", kv_mode="push"), make("c", kv_mode="push")
    prefill_step(p, forward=False)                # no offer yet: kept for a late one
    assert "t1" in p._finished_push
    c.start_load_kv(PDConnectorMetadata(offers=[offer(p, "cr", "t1", [7, 8])]))
    assert results_until(c, "cr")
    assert p.backend.transfers == 1               # every layer in one WRITE
    assert same_blocks(c, [7, 8], p, [2, 4])
    assert p.transfer_results().finished_sending == {"pr"}
    assert_empty(p, c)


def test_an_aborted_push_is_cancelled_at_the_producer(make):
    p, c = make("p", kv_mode="push"), make("c", kv_mode="push")
    offered(p, c)
    c.start_load_kv(PDConnectorMetadata(cancels=["cr"]))     # the request was aborted
    assert not results_until(c, "cr")
    assert p.offers.offers["t1"].state.name == "CANCELLED"
    # the producer's prefill of it finishes later: nothing is written, the lease is freed
    prefill_step(p)
    assert p.backend.transfers == 0
    # nobody will read the blocks: the producer frees them itself, at once
    assert p.transfer_results().finished_sending == {"pr"}
    assert_empty(p, c)
