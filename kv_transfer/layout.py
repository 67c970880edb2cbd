"""Where each KV block lives in memory, derived from tensor shapes and strides.

Pure functions: no torch, no NIXL. The connector feeds them `(data_ptr, shape,
strides, element_size)` of every registered KV tensor.

A KV tensor has one dimension of length `num_blocks`. Every index of the dims
*before* it is a separate region (GPU flash-attention layouts put K and V first:
`[2, num_blocks, block, heads, head]` gives two regions per layer); the dims *after*
it must be dense, so one block of one region is one contiguous span. The CPU layout
`[num_blocks, heads, block, 2*head]` gives one region per layer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from itertools import product
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Region:
    """One contiguous-per-block region: block b is at base + b*stride, `block_bytes` long."""
    base_addr: int
    block_stride: int
    block_bytes: int
    num_blocks: int


def regions_from_strides(data_ptr: int, shape: Sequence[int], strides: Sequence[int],
                         element_size: int, num_blocks: int) -> list[Region]:
    try:
        d = list(shape).index(num_blocks)
    except ValueError:
        raise ValueError(
            f"no dimension of length num_blocks={num_blocks} in shape {shape}") from None
    inner_shape = shape[d + 1:]
    inner_strides = strides[d + 1:]
    # the dims after the block dim must be row-major dense
    expect = 1
    for size, stride in zip(reversed(inner_shape), reversed(inner_strides)):
        if size != 1 and stride != expect:
            raise ValueError(f"KV block of shape {tuple(shape)} strides {tuple(strides)} "
                             f"is not contiguous after dim {d}")
        expect *= size
    block_bytes = math.prod(inner_shape) * element_size
    block_stride = strides[d] * element_size
    if block_stride < block_bytes:
        raise ValueError("blocks overlap: stride smaller than block")
    regions = []
    for idx in product(*(range(s) for s in shape[:d])):
        off = sum(i * s for i, s in zip(idx, strides[:d])) * element_size
        regions.append(Region(data_ptr + off, block_stride, block_bytes, num_blocks))
    return regions


def describe_layout(shape: Sequence[int], strides: Sequence[int], dtype: str,
                    num_blocks: int) -> str:
    """A layout string independent of num_blocks and addresses (part of the compat hash)."""
    d = list(shape).index(num_blocks)
    dims = ["B" if i == d else str(s) for i, s in enumerate(shape)]
    inner = list(strides[d + 1:])
    return f"{dtype}[{','.join(dims)}]inner_strides={inner}"


def compat_hash(model: str, dtype: str, layouts: Sequence[str]) -> str:
    """Workers may exchange KV only when this matches: model, dtype, layout. Not the block
    size: it travels in the handle and the handshake (kv_transfer/relayout.py)."""
    blob = json.dumps({"model": model, "dtype": dtype, "layouts": list(layouts)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sort_pairs(local_ids: Sequence[int], remote_ids: Sequence[int]
               ) -> tuple[list[int], list[int]]:
    """The same (local, remote) block pairs, in ascending local order. vLLM frees a
    request's blocks last-first, so once its free queue has wrapped a new request gets
    descending ids on both sides ([40, 39, ...]): in request order no two pairs merge
    (one descriptor per block), sorted they are one run again. A transfer moves pairs, so
    their order is free."""
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"block count mismatch: {len(local_ids)} local vs {len(remote_ids)}")
    pairs = sorted(zip(local_ids, remote_ids))
    return [a for a, _ in pairs], [b for _, b in pairs]


def merge_runs(pieces: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(a, b, n) pieces, in order, with each piece merged into the one before when it
    continues it on *both* sides (a and b each n past the previous start). The one rule
    behind block runs, relaid-out token runs and head-slice spans."""
    runs: list[tuple[int, int, int]] = []
    for a, b, n in pieces:
        if runs:
            ra, rb, rn = runs[-1]
            if a == ra + rn and b == rb + rn:
                runs[-1] = (ra, rb, rn + n)
                continue
        runs.append((a, b, n))
    return runs


def block_runs(local_ids: Sequence[int], remote_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Pair blocks and merge stretches consecutive on *both* sides.

    Returns (local_start, remote_start, count) triples.
    """
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"block count mismatch: {len(local_ids)} local vs {len(remote_ids)}")
    return merge_runs((lb, rb, 1) for lb, rb in zip(local_ids, remote_ids))


Desc = tuple[int, int, int]  # (addr, length, device id)


def transfer_descriptors(local: Sequence[Region], remote: Sequence[Region],
                         runs: Sequence[tuple[int, int, int]], device_id: int = 0,
                         remote_device_id: int = 0) -> tuple[list[Desc], list[Desc]]:
    """Descriptor lists (one per region per run) for moving `runs` between two layouts."""
    if len(local) != len(remote):
        raise ValueError(f"region count mismatch: {len(local)} local vs {len(remote)} remote")
    ldescs: list[Desc] = []
    rdescs: list[Desc] = []
    for lr, rr in zip(local, remote):
        if lr.block_bytes != rr.block_bytes:
            raise ValueError(f"block size mismatch: {lr.block_bytes} vs {rr.block_bytes} bytes")
        for ls, rs, n in runs:
            if ls + n > lr.num_blocks or rs + n > rr.num_blocks:
                raise ValueError("block id out of range")
            # a run of n blocks is one span only when blocks are packed back to back
            if lr.block_stride == lr.block_bytes and rr.block_stride == rr.block_bytes:
                ldescs.append((lr.base_addr + ls * lr.block_stride, n * lr.block_bytes, device_id))
                rdescs.append((rr.base_addr + rs * rr.block_stride, n * rr.block_bytes,
                               remote_device_id))
            else:
                for i in range(n):
                    ldescs.append((lr.base_addr + (ls + i) * lr.block_stride, lr.block_bytes,
                                   device_id))
                    rdescs.append((rr.base_addr + (rs + i) * rr.block_stride, rr.block_bytes,
                                   remote_device_id))
    return ldescs, rdescs


def registration_spans(regions: Sequence[Region]) -> list[tuple[int, int]]:
    """Merge all regions into the fewest (addr, length) spans to register with UCX."""
    spans = sorted((r.base_addr, r.base_addr + (r.num_blocks - 1) * r.block_stride + r.block_bytes)
                   for r in regions)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_descs(regions: Sequence[Region], device_id: int = 0):
    """Every block of every region as one descriptor, region-major: descriptor
    `region_index * num_blocks + block` (see `block_indices`). An N x 3 int64 array of
    (addr, length, device), prepared once with NIXL (prep_xfer_dlist) and picked from by
    index per transfer."""
    import numpy as np
    out = []
    for r in regions:
        a = np.empty((r.num_blocks, 3), dtype=np.int64)
        a[:, 0] = r.base_addr + np.arange(r.num_blocks, dtype=np.int64) * r.block_stride
        a[:, 1] = r.block_bytes
        a[:, 2] = device_id
        out.append(a)
    return np.concatenate(out) if out else np.empty((0, 3), dtype=np.int64)


def block_indices(regions: Sequence[int], num_blocks: int, ids: Sequence[int]):
    """Indices into `block_descs` of blocks `ids` of the given region indices, region-major
    (the order both sides of a transfer list them in). int32, as NIXL takes them."""
    import numpy as np
    ids_a = np.asarray(ids, dtype=np.int64)
    if len(ids_a) and (ids_a.min() < 0 or ids_a.max() >= num_blocks):
        raise ValueError("block id out of range")
    regs = np.asarray(regions, dtype=np.int64)
    return (regs[:, None] * num_blocks + ids_a[None, :]).reshape(-1).astype(np.int32)


def merged_count(runs: Sequence[tuple[int, int, int]], regions: Sequence[Region],
                 remote: Sequence[Region]) -> int:
    """Spans a transfer of `runs` moves once NIXL merged descriptors adjacent on both sides
    (one per run per region when blocks are packed back to back, else one per block)."""
    packed = all(r.block_stride == r.block_bytes for r in (*regions, *remote))
    return len(regions) * (len(runs) if packed else sum(n for _, _, n in runs))
