"""Heterogeneous TP head mapping and block-size mapping (pure math)."""

import itertools

import pytest
from hypothesis import given, strategies as st

from kv_transfer.mapping import (BlockPiece, HeadSlice, block_map, head_map, heads_of_rank,
                                 merge_block_pieces)


def test_sharding_with_and_without_replication():
    assert [heads_of_rank(r, 4, 8) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [heads_of_rank(r, 4, 2) for r in range(4)] == [[0], [0], [1], [1]]
    with pytest.raises(ValueError):
        heads_of_rank(0, 3, 8)


def test_decode_tp_larger_than_prefill_reads_a_slice():
    m = head_map(8, tp_src=2, tp_dst=4)
    assert m[1] == [HeadSlice(src_rank=0, src_head=2, dst_head=0, count=2)]
    assert m[3] == [HeadSlice(src_rank=1, src_head=2, dst_head=0, count=2)]


def test_decode_tp_smaller_than_prefill_gathers():
    (only,) = head_map(8, tp_src=4, tp_dst=1)
    assert only == [HeadSlice(r, 0, 2 * r, 2) for r in range(4)]


def test_replicated_heads_spread_over_replicas():
    m = head_map(2, tp_src=4, tp_dst=4)          # each head on 2 ranks, both sides
    assert [s[0].src_rank for s in m] == [0, 1, 2, 3]   # rank d reads from rank d, not 0
    m = head_map(2, tp_src=1, tp_dst=4)
    assert [(s[0].src_rank, s[0].src_head) for s in m] == [(0, 0), (0, 0), (0, 1), (0, 1)]


@pytest.mark.parametrize("heads,tp_src,tp_dst", [
    (h, a, b) for h in (1, 2, 4, 8, 32) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8)
    if (h % a == 0 or a % h == 0) and (h % b == 0 or b % h == 0)])
def test_every_destination_head_is_filled_exactly_once_from_a_holder(heads, tp_src, tp_dst):
    for d, slices in enumerate(head_map(heads, tp_src, tp_dst)):
        want = heads_of_rank(d, tp_dst, heads)
        got = [None] * len(want)
        for s in slices:
            src_heads = heads_of_rank(s.src_rank, tp_src, heads)
            for i in range(s.count):
                assert got[s.dst_head + i] is None
                got[s.dst_head + i] = src_heads[s.src_head + i]
        assert got == want


def test_block_map_between_sizes():
    # 300 tokens from 128-token blocks into 64-token blocks
    ps = block_map(300, 128, 64)
    assert ps[:3] == [BlockPiece(0, 0, 0, 0, 64), BlockPiece(0, 64, 1, 0, 64),
                      BlockPiece(1, 0, 2, 0, 64)]
    assert sum(p.tokens for p in ps) == 300 and ps[-1] == BlockPiece(2, 0, 4, 0, 44)
    # the other way, starting past a local prefix hit of 64 tokens
    ps = block_map(300, 64, 128, first_token=64)
    assert ps[0] == BlockPiece(1, 0, 0, 64, 64) and sum(p.tokens for p in ps) == 236


@given(n=st.integers(0, 2000), a=st.sampled_from([16, 32, 64, 96, 128, 256]),
       b=st.sampled_from([16, 32, 64, 96, 128, 256]), first=st.integers(0, 2000))
def test_block_map_covers_every_token_once_within_blocks(n, a, b, first):
    first = min(first, n)
    ps = block_map(n, a, b, first)
    tokens = list(itertools.chain.from_iterable(
        range(p.src_block * a + p.src_offset, p.src_block * a + p.src_offset + p.tokens)
        for p in ps))
    assert tokens == list(range(first, n))
    for p in ps:
        assert p.src_offset + p.tokens <= a and p.dst_offset + p.tokens <= b
        assert p.dst_block * b + p.dst_offset == p.src_block * a + p.src_offset


def test_merge_adjacent_pieces_on_both_sides():
    ps = block_map(256, 128, 64)
    # source blocks 7, 8 (consecutive); destination blocks 3, 4, 5, 9
    runs = merge_block_pieces(ps, [7, 8], [3, 4, 5, 9], 128, 64)
    assert runs == [(7 * 128, 3 * 64, 192), (8 * 128 + 64, 9 * 64, 64)]



def _shard(block, axis: int, heads: list[int]):
    import numpy as np
    return np.ascontiguousarray(np.take(block, heads, axis=axis))


@pytest.mark.parametrize("layout", ["cpu", "token", "kv-first"])
@pytest.mark.parametrize("heads,tp_src,tp_dst", [(2, 2, 1), (2, 1, 2), (8, 4, 2), (8, 2, 4),
                                                 (2, 4, 1), (1, 1, 2), (4, 1, 4)])
def test_head_spans_move_each_destination_rank_its_heads(layout, heads, tp_src, tp_dst):
    """Bytes copied by head_map + head_spans from the source ranks' blocks are exactly the
    destination rank's shard of the same global block, in every layout."""
    import numpy as np

    from kv_transfer.mapping import head_axis, head_spans, paired_spans, with_heads
    bs, hd = 4, 3
    shape = {"cpu": [heads, bs, 2 * hd], "token": [bs, heads, hd],
             "kv-first": [2, bs, heads, hd]}[layout]
    block = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    for d, slices in enumerate(head_map(heads, tp_src, tp_dst)):
        local_heads = len(heads_of_rank(d, tp_dst, heads))
        shard_shape = {"cpu": [local_heads, bs, 2 * hd], "token": [bs, local_heads, hd],
                       "kv-first": [2, bs, local_heads, hd]}[layout]
        ax = head_axis(shard_shape, local_heads, head_major=layout == "cpu")
        src = [_shard(block, ax, heads_of_rank(r, tp_src, heads)) for r in range(tp_src)]
        want = _shard(block, ax, heads_of_rank(d, tp_dst, heads))
        got = np.full(want.size, np.nan, dtype=np.float32).view(np.uint8)
        for s in slices:
            sshape = with_heads(shard_shape, ax, len(heads_of_rank(s.src_rank, tp_src, heads)))
            assert list(src[s.src_rank].shape) == sshape
            sb = src[s.src_rank].reshape(-1).view(np.uint8)
            for so, do, n in paired_spans(head_spans(sshape, ax, 4, s.src_head, s.count),
                                          head_spans(shard_shape, ax, 4, s.dst_head, s.count)):
                got[do:do + n] = sb[so:so + n]
        assert np.array_equal(got.view(np.float32).reshape(want.shape), want)


def test_head_axis_resolves_ties_by_layout_and_refuses_a_missing_dim():
    from kv_transfer.mapping import head_axis, head_spans, paired_spans
    assert head_axis([2, 16, 2, 64], 2) == 2                  # [K/V, block, heads, head]
    assert head_axis([32, 32, 128], 32, head_major=True) == 0   # CPU, heads = block size
    assert head_axis([32, 32, 128], 32) == 1                  # token-major, heads = block
    with pytest.raises(ValueError):
        head_axis([16, 4, 64], 8)
    assert head_spans([8, 32, 128], 0, 2, 2, 3) == [(2 * 32 * 128 * 2, 3 * 32 * 128 * 2)]
    assert len(head_spans([16, 8, 64], 1, 2, 0, 4)) == 16          # one span per token
    whole = head_spans([16, 8, 64], 1, 2, 0, 8)
    assert paired_spans(whole, whole) == [(0, 0, 16 * 8 * 64 * 2)]   # all heads: one span
    with pytest.raises(ValueError):
        head_spans([8, 32, 128], 0, 2, 6, 3)
