"""Which source KV pieces go where when prefill and decode are shaped differently. Pure.

Heterogeneous tensor parallelism (`head_map`)
---------------------------------------------
vLLM shards KV heads over tensor-parallel ranks: with TP size t and H KV heads, rank r holds
global heads [r*H/t, (r+1)*H/t) when H >= t, and the single head r*H//t when H < t (each
head is then replicated on t/H ranks). A decode rank d (of t_d) needs exactly the heads it
holds; for each, any prefill rank (of t_p) holding that head can serve it. We pick, among the
holders, the one whose position within the head's replicas matches d's, so that the reads
of different decode ranks spread over the prefill replicas instead of all hitting the first.
The result is, per decode rank, a list of slices (prefill rank, first head in that rank's
local numbering, first head in the decode rank's local numbering, head count), contiguous
runs merged.

Examples (H = 8): t_p = 2 -> t_d = 4: decode rank 1 reads local heads 2-3 of prefill rank 0
into its heads 0-1. t_p = 4 -> t_d = 1: the decode rank reads 2 heads from each of the 4
prefill ranks. H = 2, t_p = 1 -> t_d = 4: ranks 0-1 read head 0, ranks 2-3 head 1.

Different block sizes (`block_map`)
-----------------------------------
Token t of a sequence lives in block t // B at offset t % B. Moving a token range between
block size B_src and B_dst yields pieces (src block index, src offset, dst block index, dst
offset, tokens) that never cross a block boundary on either side; with token-major block
layouts each piece is one contiguous span per (layer, K/V) region.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.layout import merge_runs


@dataclass(frozen=True)
class HeadSlice:
    src_rank: int
    src_head: int      # first head, in the source rank's local numbering
    dst_head: int      # first head, in the destination rank's local numbering
    count: int


def heads_of_rank(rank: int, tp: int, num_heads: int) -> list[int]:
    """Global KV heads held by `rank` of `tp` (vLLM's sharding, with replication)."""
    if not 0 <= rank < tp or tp < 1 or num_heads < 1:
        raise ValueError(f"bad rank {rank} of tp {tp} with {num_heads} heads")
    if num_heads >= tp:
        if num_heads % tp:
            raise ValueError(f"{num_heads} KV heads do not split over tp {tp}")
        per = num_heads // tp
        return list(range(rank * per, (rank + 1) * per))
    if tp % num_heads:
        raise ValueError(f"tp {tp} is not a multiple of {num_heads} KV heads")
    return [rank * num_heads // tp]


def holders(head: int, tp: int, num_heads: int) -> list[int]:
    return [r for r in range(tp) if head in heads_of_rank(r, tp, num_heads)]


def head_map(num_heads: int, tp_src: int, tp_dst: int) -> list[list[HeadSlice]]:
    """For each destination rank: the slices of source ranks' heads that fill it."""
    out: list[list[HeadSlice]] = []
    for d in range(tp_dst):
        mine = heads_of_rank(d, tp_dst, num_heads)
        # position of d among the destination ranks that hold the same heads
        same = [r for r in range(tp_dst)
                if heads_of_rank(r, tp_dst, num_heads) == mine]
        pos = same.index(d)
        slices: list[HeadSlice] = []
        for local_dst, h in enumerate(mine):
            src_choices = holders(h, tp_src, num_heads)
            src = src_choices[pos % len(src_choices)]
            local_src = heads_of_rank(src, tp_src, num_heads).index(h)
            last = slices[-1] if slices else None
            if (last and last.src_rank == src and last.src_head + last.count == local_src
                    and last.dst_head + last.count == local_dst):
                slices[-1] = HeadSlice(src, last.src_head, last.dst_head, last.count + 1)
            else:
                slices.append(HeadSlice(src, local_src, local_dst, 1))
        out.append(slices)
    return out


def head_axis(inner_shape: list[int], local_heads: int, head_major: bool = False) -> int:
    """Which dimension of one KV block (the dims after the block dim) holds the heads: one
    of size `local_heads` before the innermost (the head's own elements). When several
    fit (heads = block size, or 2 heads beside a K/V dim), the first for a head-major
    layout (vLLM's CPU one, `[heads, block, 2*head]`), else the last (token-major GPU
    layouts: `[block, heads, head]`, `[2, block, heads, head]`)."""
    fits = [k for k in range(len(inner_shape) - 1) if inner_shape[k] == local_heads]
    if not fits:
        raise ValueError(f"no dimension of {local_heads} heads in a KV block of shape "
                         f"{list(inner_shape)}")
    return fits[0] if head_major else fits[-1]


def head_spans(inner_shape: list[int], axis: int, elem: int, first: int, count: int
               ) -> list[tuple[int, int]]:
    """(byte offset, length) within one dense KV block of heads [first, first + count):
    one span per index of the dims before the heads dim (one in a head-major block, one
    per token in a token-major one), in memory order, not merged."""
    if not 0 <= first < first + count <= inner_shape[axis]:
        raise ValueError(f"heads [{first}, {first + count}) of {inner_shape[axis]}")
    below = elem
    for n in inner_shape[axis + 1:]:
        below *= n
    outer = 1
    for n in inner_shape[:axis]:
        outer *= n
    row = inner_shape[axis] * below           # bytes of one index of the outer dims
    return [(i * row + first * below, count * below) for i in range(outer)]


def paired_spans(src: list[tuple[int, int]], dst: list[tuple[int, int]]
                 ) -> list[tuple[int, int, int]]:
    """Source and destination spans of the same heads, one to one -> (src offset, dst
    offset, length), merged where consecutive pairs touch on both sides."""
    if [n for _, n in src] != [n for _, n in dst]:
        raise ValueError("head slices of different lengths")
    return merge_runs((so, do, n) for (so, n), (do, _) in zip(src, dst))


def with_heads(inner_shape: list[int], axis: int, heads: int) -> list[int]:
    """The same block's shape on a rank holding `heads` heads."""
    return [*inner_shape[:axis], heads, *inner_shape[axis + 1:]]


@dataclass(frozen=True)
class BlockPiece:
    src_block: int     # index into the source request's block list
    src_offset: int    # first token within that block
    dst_block: int
    dst_offset: int
    tokens: int


def block_map(num_tokens: int, src_block_size: int, dst_block_size: int,
              first_token: int = 0) -> list[BlockPiece]:
    """Pieces that move tokens [first_token, num_tokens) between block sizes."""
    if src_block_size < 1 or dst_block_size < 1 or not 0 <= first_token <= num_tokens:
        raise ValueError("bad block sizes or token range")
    pieces = []
    t = first_token
    while t < num_tokens:
        so, do = t % src_block_size, t % dst_block_size
        n = min(src_block_size - so, dst_block_size - do, num_tokens - t)
        pieces.append(BlockPiece(t // src_block_size, so, t // dst_block_size, do, n))
        t += n
    return pieces


def merge_block_pieces(pieces: list[BlockPiece], src_ids: list[int], dst_ids: list[int],
                       src_block_size: int, dst_block_size: int
                       ) -> list[tuple[int, int, int]]:
    """Place pieces on physical blocks as token slots (block id x block size + offset) and
    merge pieces adjacent on both sides. -> [(src slot, dst slot, tokens)]. In a token-major
    layout whose blocks are packed back to back, one merged run is one contiguous span per
    (layer, K/V) region on each side."""
    return merge_runs((src_ids[p.src_block] * src_block_size + p.src_offset,
                       dst_ids[p.dst_block] * dst_block_size + p.dst_offset, p.tokens)
                      for p in pieces)
