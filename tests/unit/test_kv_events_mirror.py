"""vLLM KV events -> our hashes (EventMirror), with vLLM's own event classes."""

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

from pdserve import kvhash
from pdserve.kv_events import EventMirror


def stored(hashes, parent, tokens, bs=4, medium="GPU", lora=None):
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=bs, lora_id=lora, medium=medium, lora_name=None)


def test_chain_across_events_equals_hashing_the_prompt():
    toks = list(range(100, 112))
    m = EventMirror()
    d1 = m.apply([stored([b"x0"], None, toks[:4])])
    d2 = m.apply([stored([b"x1", b"x2"], b"x0", toks[4:12])])
    assert d1.stored + d2.stored == kvhash.block_hashes(toks, 4)
    assert sorted(m.snapshot()) == sorted(kvhash.block_hashes(toks, 4))


def test_removal_refcounts_media_orphans_and_clear():
    toks = list(range(8))
    m = EventMirror()
    ours = kvhash.block_hashes(toks, 4)
    m.apply([stored([1, 2], None, toks)])
    assert m.apply([stored([1], None, toks[:4])]).stored == []   # duplicate physical block
    assert m.apply([BlockRemoved(block_hashes=[1], medium="GPU")]).removed == []
    assert m.apply([BlockRemoved(block_hashes=[1, 2], medium="GPU")]).removed == ours
    assert m.apply([stored([5], None, toks[:4], medium="CPU")]).stored == []  # offload tier
    assert m.apply([stored([7], 12345, toks[:4])]).stored == [] and m.orphans == 1
    m.apply([stored([1], None, toks[:4])])
    d = m.apply([AllBlocksCleared()])
    assert d.cleared and len(m) == 0


def test_lora_chains_are_separate():
    toks = list(range(4))
    a = EventMirror().apply([stored([1], None, toks)]).stored
    b = EventMirror().apply([stored([1], None, toks, lora=2)]).stored
    assert a != b and a == kvhash.block_hashes(toks, 4)


def test_relay_queue_is_bounded_while_nobody_takes_it():
    """The scheduler is down: deltas pile up to the bound, then give way to one snapshot."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    from pdserve.kv_events import EventRelay

    relay = EventRelay("ipc:///nonexistent", None, EventMirror(), max_pending=8)
    news = []
    relay.on_change = lambda: news.append(len(relay.pending))   # the worker's wake-up
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(type=KVEventBatch)
    for i in range(20):
        batch = KVEventBatch(ts=0.0, events=[stored([i], None, [i, i, i, i])])
        relay._apply(enc.encode(batch), dec)
        assert len(relay.pending) <= 8
    # every change is announced, after it is there to take (the drop included)
    assert len(news) == 20 and news[0] == 1 and 0 in news
    relay._apply(enc.encode(KVEventBatch(ts=0.0, events=[stored([0], None, [0] * 4)])), dec)
    assert len(news) == 20                 # nothing new (a block already stored): no news
    deltas, resync = relay.take()
    assert resync and len(deltas) < 8      # what came after the drop is still there
    assert sorted(relay.snapshot()) == sorted(EventMirror().apply(
        [stored([i], None, [i] * 4) for i in range(20)]).stored)
    assert relay.take() == ([], False)
