"""Push mode's pure parts: which blocks a prefill step writes, and the offer state machine."""

import pytest

from kv_transfer.push import Offer, OfferState, OfferTable, chunk_blocks


def test_chunk_blocks_cover_touched_blocks_minus_the_consumers_cache():
    bs = 16
    assert list(chunk_blocks(0, 40, bs, 0, 3)) == [0, 1, 2]       # 40 tokens: 3 blocks
    # chunked prefill: [40, 64) touches block 2 (again: it was partial) and block 3
    assert list(chunk_blocks(40, 64, bs, 0, 4)) == [2, 3]
    assert list(chunk_blocks(64, 70, bs, 0, 5)) == [4]
    # the consumer has blocks 0..1 cached: never written, even by a chunk that covers them
    assert list(chunk_blocks(0, 40, bs, 2, 3)) == [2]
    assert list(chunk_blocks(0, 32, bs, 2, 3)) == []
    # never past the offered blocks, and nothing for an empty chunk
    assert list(chunk_blocks(0, 100, bs, 0, 3)) == [0, 1, 2]
    assert list(chunk_blocks(10, 10, bs, 0, 3)) == []


def test_chunks_of_a_prompt_write_every_offered_block_exactly_once_or_twice_at_edges():
    bs, n_tok = 16, 100
    n = -(-n_tok // bs)
    written: dict[int, int] = {}
    for start in range(0, n_tok, 24):                     # 24-token chunks
        for b in chunk_blocks(start, min(start + 24, n_tok), bs, 1, n):
            written[b] = written.get(b, 0) + 1
    assert sorted(written) == list(range(1, n))           # all but the cached block 0
    assert max(written.values()) <= 2                      # a block split by a chunk edge


def offer(tid="t", deadline=10.0):
    return Offer(tid, "peer", "eng", [5, 6, 7], 0, deadline)


def test_offer_lifecycle_done():
    t = OfferTable()
    o = offer()
    assert t.add(o) and not t.add(offer())                 # duplicates refused
    assert t.writable("t", 1.0) is o
    t.begin(o)
    t.begin(o)
    t.end(o, True)
    t.end(o, True)
    assert t.finish(o) and o.state == OfferState.DONE
    assert t.writable("t", 1.0) is None                    # never written after DONE
    with pytest.raises(ValueError):
        t.end(o, True)                                     # more ends than begins


def test_a_failed_write_fails_the_offer_and_it_stays_failed():
    t = OfferTable()
    o = offer()
    t.add(o)
    t.begin(o)
    t.begin(o)
    t.end(o, False, "timeout")
    t.end(o, True)
    assert o.state == OfferState.FAILED and o.reason == "timeout"
    assert not t.finish(o) and o.state == OfferState.FAILED
    assert t.writable("t", 1.0) is None


def test_cancel_is_refused_while_writes_are_in_flight():
    t = OfferTable()
    o = offer()
    t.add(o)
    t.begin(o)
    assert t.cancel(["t"], 1.0) == ([], ["t"])             # busy: ask again
    t.end(o, True)
    assert t.cancel(["t"], 1.0) == (["t"], [])
    assert o.state == OfferState.CANCELLED and t.writable("t", 1.0) is None
    with pytest.raises(ValueError):
        t.end(o, True)                                     # nothing in flight any more


def test_a_cancel_before_the_offer_refuses_the_late_offer():
    t = OfferTable()
    assert t.cancel(["late"], 5.0) == (["late"], [])
    assert not t.add(offer("late"))                        # refused: the consumer gave up
    assert t.offers["late"].state == OfferState.CANCELLED


def test_expiry_on_the_owners_clock():
    t = OfferTable()
    o = offer(deadline=10.0)
    t.add(o)
    assert t.writable("t", 9.99) is o
    assert t.writable("t", 10.0) is None                   # no WRITE posted at the deadline
    assert o.state == OfferState.FAILED and o.reason == "offer_expired"
    assert t.expired_total == 1
    # sweep: an open offer past its deadline fails (the consumer is told); finished
    # offers are forgotten keep_s after their deadline
    o2 = offer("u", deadline=20.0)
    t.add(o2)
    assert t.sweep(19.0) == [] and len(t) == 1
    assert t.sweep(20.5) == [o2] and o2.state == OfferState.FAILED and len(t) == 0
    t.sweep(20.0 + 121.0)
    assert "u" not in t.offers and "t" not in t.offers


def test_sweep_never_fails_an_offer_with_writes_in_flight():
    t = OfferTable()
    o = offer(deadline=1.0)
    t.add(o)
    t.begin(o)
    assert t.sweep(5.0) == [] and o.state == OfferState.OPEN
    t.end(o, True)
    assert t.sweep(5.0) == [o]
