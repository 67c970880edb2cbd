"""KV between engines whose block sizes differ, when a block is not token-major.

vLLM's CPU attention stores a layer as `[num_blocks, kv_heads, block_size, 2*head_size]`,
and within one (block, head) the "vec" ISA keeps K transposed (`[head_size][block_size]`)
followed by V (`[block_size][head_size]`). A block of B tokens is therefore not the
concatenation of smaller blocks: no descriptor list can move tokens between block sizes
(it would take one descriptor per head per head dimension per piece). So the consumer
READs the producer's blocks as they are into a staging buffer, then re-lays them out:
`unpack_tokens` turns source blocks into token-major K and V (checked against vLLM's own
cache-writing kernel in tests/unit/test_relayout.py), and vLLM's kernel
(`cpu_attn_reshape_and_cache`) writes them into the consumer's blocks, in whatever
packing its ISA uses.

Token-major layouts (the GPU flash-attention family: `[2, num_blocks, block_size, heads,
head_size]`) need no staging: `kv_transfer.mapping.block_map` gives the pieces and
`token_descriptors` turns them into spans (one per piece per region).
"""

from __future__ import annotations

from typing import Sequence

from kv_transfer import layout as L
from kv_transfer.mapping import block_map, merge_block_pieces

# CPU attention ISAs whose block packing unpack_tokens knows (checked by a unit test
# against the kernel); others (amx packs blocks in tiles) refuse, and the load fails over
# to recompute by policy
KNOWN_ISAS = ("vec", "vec16")


class RelayoutError(RuntimeError):
    pass


def unpack_tokens(blocks, block_size: int, isa: str = "vec"):
    """Source blocks of one layer `[n, heads, 2*block_size*head_size]` (raw, in logical
    order) -> token-major `(key, value)`, each `[n*block_size, heads, head_size]`."""
    if isa not in KNOWN_ISAS:
        raise RelayoutError(f"block packing of CPU attention ISA {isa!r} is not known")
    n, heads, width = blocks.shape
    head = width // (2 * block_size)
    kb = block_size * head
    key = blocks[:, :, :kb].reshape(n, heads, head, block_size).permute(0, 3, 1, 2)
    value = blocks[:, :, kb:].reshape(n, heads, block_size, head).permute(0, 2, 1, 3)
    return (key.reshape(n * block_size, heads, head), value.reshape(n * block_size, heads, head))


def slot_mapping(dst_ids: Sequence[int], dst_block_size: int, first: int, end: int) -> list[int]:
    """vLLM slot (block id x block size + offset) of tokens [first, end) of a sequence
    whose logical block i is physical block dst_ids[i]."""
    return [dst_ids[t // dst_block_size] * dst_block_size + t % dst_block_size
            for t in range(first, end)]


def write_tokens(cache, key, value, slots, isa: str = "vec") -> None:
    """Write token-major K/V `[T, heads, head_size]` into a CPU KV cache tensor
    `[num_blocks, heads, block_size, 2*head_size]` at `slots`, with vLLM's own kernel."""
    import torch
    from vllm import _custom_ops as ops

    nb, heads, bs, two_head = cache.shape
    kv = cache.view(nb, heads, 2 * bs, two_head // 2)
    kc, vc = kv.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), kc, vc,
                                   torch.tensor(slots, dtype=torch.int64), isa)


def relayout_layer(staged, cache, src_block_size: int, src_first_block: int,
                   dst_ids: Sequence[int], dst_block_size: int, first: int, end: int,
                   src_isa: str = "vec", dst_isa: str = "vec") -> None:
    """Tokens [first, end) of one layer: from `staged` (the source blocks
    src_first_block.. as READ, `[n, heads, 2*src_block_size*head_size]`) into `cache`."""
    key, value = unpack_tokens(staged, src_block_size, src_isa)
    off = src_first_block * src_block_size
    write_tokens(cache, key[first - off:end - off], value[first - off:end - off],
                 slot_mapping(dst_ids, dst_block_size, first, end), dst_isa)


def token_descriptors(local: Sequence[L.Region], remote: Sequence[L.Region],
                      local_ids: Sequence[int], remote_ids: Sequence[int],
                      local_block_size: int, remote_block_size: int, first: int, end: int,
                      device_id: int = 0, remote_device_id: int = 0
                      ) -> tuple[list[L.Desc], list[L.Desc]]:
    """Token-major layouts (each block of a region is `block_size` equal token rows, blocks
    packed back to back): spans moving tokens [first, end) between block sizes. `local_ids`
    and `remote_ids` are the sequences' whole logical-to-physical block lists."""
    if len(local) != len(remote):
        raise ValueError(f"region count mismatch: {len(local)} local vs {len(remote)} remote")
    pieces = block_map(end, remote_block_size, local_block_size, first)
    runs = merge_block_pieces(pieces, list(remote_ids), list(local_ids), remote_block_size,
                              local_block_size)
    ldescs: list[L.Desc] = []
    rdescs: list[L.Desc] = []
    for lr, rr in zip(local, remote):
        if lr.block_stride != lr.block_bytes or rr.block_stride != rr.block_bytes:
            raise ValueError("token descriptors need blocks packed back to back")
        tok = lr.block_bytes // local_block_size
        if tok * local_block_size != lr.block_bytes or \
                tok * remote_block_size != rr.block_bytes:
            raise ValueError(f"token size differs: {lr.block_bytes}/{local_block_size} vs "
                             f"{rr.block_bytes}/{remote_block_size}")
        for src_slot, dst_slot, n in runs:
            ldescs.append((lr.base_addr + dst_slot * tok, n * tok, device_id))
            rdescs.append((rr.base_addr + src_slot * tok, n * tok, remote_device_id))
    return ldescs, rdescs
