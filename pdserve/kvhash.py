"""Our block hash: one chained hash of full blocks of token ids, shared by the worker-side
event relay (which turns vLLM's KV events into these hashes) and the scheduler (which
hashes prompts to look them up). vLLM's own block hashes are seeded per process
(NONE_HASH), so they cannot be recomputed elsewhere; ours depend on the tokens only.

h(block i) = blake2b-64(h(block i-1) || token ids of block i as uint32 LE), h(-1) = ROOT.
Only full blocks are hashed: vLLM caches only full blocks.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

ROOT = 0
_MASK = (1 << 64) - 1


def root_for(lora_id: int | None) -> int:
    """Chains of different LoRA adapters never match each other."""
    if not lora_id:
        return ROOT
    return int.from_bytes(blake2b(b"lora:%d" % lora_id, digest_size=8).digest(), "little")


def chain(parent: int, tokens: list[int] | array) -> int:
    buf = tokens if isinstance(tokens, array) else array("I", tokens)
    h = blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(buf.tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids, block_size: int, parent: int = ROOT,
                 max_blocks: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a partial tail is ignored)."""
    toks = array("I", token_ids)
    n = len(toks) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out = []
    for i in range(n):
        parent = chain(parent, toks[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


def cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of a prompt that a prefix-cache hit can cover: vLLM always computes at least the
    last prompt token, so a fully cached prompt still recomputes its last block."""
    return max(0, (num_tokens - 1) // block_size)
