"""KV between different block sizes (kv_transfer/relayout.py): the CPU layout's unpacking
checked against vLLM's own cache-writing kernel, and token descriptors for token-major
(GPU flash-attention) layouts checked by doing the copies they describe."""

import ctypes

import numpy as np
import pytest
import torch

from kv_transfer import layout as L
from kv_transfer import relayout as R

HEADS, HEAD = 3, 64


def packed_cache(num_blocks, block_size, key, value, ids, isa="vec"):
    """A CPU KV cache tensor with tokens 0..T-1 written by vLLM's kernel into blocks ids."""
    cache = torch.zeros(num_blocks, HEADS, block_size, 2 * HEAD, dtype=torch.bfloat16)
    R.write_tokens(cache, key, value, R.slot_mapping(ids, block_size, 0, len(key)), isa)
    return cache


def tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HEADS, HEAD, generator=g).to(torch.bfloat16),
            torch.randn(n, HEADS, HEAD, generator=g).to(torch.bfloat16))


@pytest.mark.parametrize("isa,bs", [("vec", 64), ("vec16", 16)])
def test_unpack_inverts_vllms_kernel(isa, bs):
    """Every ISA in KNOWN_ISAS: unpacking what vLLM's kernel packed gives the tokens back."""
    n = 3 * bs + bs // 2
    key, value = tokens(n)
    ids = [4, 1, 5, 0]
    cache = packed_cache(6, bs, key, value, ids, isa)
    k, v = R.unpack_tokens(cache.view(6, HEADS, -1)[ids], bs, isa)
    assert torch.equal(k[:n], key) and torch.equal(v[:n], value)
    assert set(R.KNOWN_ISAS) == {"vec", "vec16"}


@pytest.mark.parametrize("src_bs,dst_bs,first", [(64, 128, 0), (128, 64, 0), (64, 128, 128),
                                                  (32, 96, 96), (128, 32, 64)])
def test_relayout_moves_exactly_the_token_range(src_bs, dst_bs, first):
    """Tokens [first, 300) go from the producer's blocks into the consumer's; the consumer's
    own prefix (a local prefix-cache hit) and every other block stay as they were."""
    n = 300
    key, value = tokens(n, seed=src_bs + dst_bs)
    src_ids = list(range(L.blocks_for_tokens(n, src_bs)))[::-1]
    src = packed_cache(12, src_bs, key, value, src_ids)
    dst_ids = [9, 2, 7, 4, 0, 11, 5, 3, 6, 10][:L.blocks_for_tokens(n, dst_bs)]
    mine_k, mine_v = tokens(first, seed=99)          # what the consumer had cached
    dst = torch.zeros(12, HEADS, dst_bs, 2 * HEAD, dtype=torch.bfloat16)
    if first:
        R.write_tokens(dst, mine_k, mine_v, R.slot_mapping(dst_ids, dst_bs, 0, first))
    untouched = [b for b in range(12) if b not in dst_ids]
    before = dst[untouched].clone()
    # what the connector READs: the source blocks holding [first, n), in logical order
    s0 = first // src_bs
    staged = src.view(12, HEADS, -1)[src_ids[s0:]].contiguous()
    R.relayout_layer(staged, dst, src_bs, s0, dst_ids, dst_bs, first, n)
    k, v = R.unpack_tokens(dst.view(12, HEADS, -1)[dst_ids], dst_bs)
    assert torch.equal(k[first:n], key[first:]) and torch.equal(v[first:n], value[first:])
    assert torch.equal(k[:first], mine_k) and torch.equal(v[:first], mine_v)
    assert torch.equal(dst[untouched], before)


def test_unknown_block_packing_is_refused():
    with pytest.raises(R.RelayoutError, match="amx"):
        R.unpack_tokens(torch.zeros(1, HEADS, 2 * 32 * HEAD), 32, "amx")


def test_slot_mapping():
    assert R.slot_mapping([5, 2], 4, 2, 7) == [22, 23, 8, 9, 10]


@pytest.mark.parametrize("src_bs,dst_bs,first,n", [(16, 32, 0, 100), (32, 16, 32, 77),
                                                    (16, 48, 48, 130)])
def test_token_descriptors_move_a_token_major_layout(src_bs, dst_bs, first, n):
    """GPU flash layout per layer: [2 (K/V), num_blocks, block_size, heads, head] — each
    K/V region token-major. Copy what the descriptors say; every token lands right."""
    heads, head, nb = 2, 8, 16
    tok = heads * head * 2                                   # bytes per token (fp16)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 2**16, size=(2, nb, src_bs, heads, head), dtype=np.uint16)
    dst = np.zeros((2, nb, dst_bs, heads, head), dtype=np.uint16)
    s_ids = list(rng.permutation(nb)[:L.blocks_for_tokens(n, src_bs)])
    d_ids = list(rng.permutation(nb)[:L.blocks_for_tokens(n, dst_bs)])

    def regions(a, bs):
        return [L.Region(a.ctypes.data + kv * a.strides[0], bs * tok, bs * tok, nb)
                for kv in range(2)]
    ld, rd = R.token_descriptors(regions(dst, dst_bs), regions(src, src_bs), d_ids, s_ids,
                                 dst_bs, src_bs, first, n)
    for (la, ln, _), (ra, rn, _) in zip(ld, rd):
        assert ln == rn
        ctypes.memmove(int(la), int(ra), int(ln))
    src_t = src[:, s_ids].reshape(2, -1, heads, head)[:, :n]
    dst_t = dst[:, d_ids].reshape(2, -1, heads, head)[:, :n]
    assert np.array_equal(dst_t[:, first:], src_t[:, first:])
    assert not dst_t[:, :first].any()                     # the consumer's prefix: untouched
    # pieces merge where both sides are contiguous: never more than one per piece
    assert len(ld) <= 2 * len(R.block_map(n, src_bs, dst_bs, first))
