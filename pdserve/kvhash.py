"""Our block hash, shared by the worker-side event relay (which turns vLLM's KV events into
these hashes) and the scheduler (which hashes prompts to look them up). vLLM's own block
hashes are seeded per process (NONE_HASH), so no other process can recompute them; ours
depend on the tokens only.

A prefix hash in the style of Zobrist hashing, vectorised with numpy:

    acc(k) = root + sum_{j<k} mix(t_j * K1 + j * K2 + SEED)      (mod 2^64)
    hash(block i) = mix(acc((i+1) * block_size) ^ ((i+1) * block_size * K3))

`mix` is the splitmix64 finaliser. Each block's hash covers the whole prefix up to it, so
a hit on block i means the same tokens in blocks 0..i. A chain extends from a parent's
state (acc, tokens so far), which is how the relay hashes a BlockStored event whose parent
arrived earlier. A collision could only misplace a request, never change its output (the
engine checks its own cache). Only full blocks are hashed: vLLM caches only full blocks.
8,192 tokens in blocks of 16 hash in about 0.1 ms; a per-block blake2b chain took 0.6 ms.
"""

from __future__ import annotations

from array import array

import numpy as np

_U = np.uint64
K1, K2, K3 = _U(0x9E3779B97F4A7C15), _U(0xC2B2AE3D27D4EB4F), _U(0x165667B19E3779F9)
SEED = _U(0x27D4EB2F165667C5)
ROOT = 0


class State(tuple):
    """(acc, tokens hashed so far): where a chain continues."""
    __slots__ = ()

    def __new__(cls, acc: int = ROOT, ntok: int = 0):
        return super().__new__(cls, (acc, ntok))


ROOT_STATE = State()


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U(30))
    x = x * _U(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U(27))
    x = x * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def _tokens(token_ids, m: int) -> np.ndarray:
    # array('I') is 5x faster than np.asarray on a list of Python ints
    if isinstance(token_ids, np.ndarray):
        return token_ids[:m].astype(np.uint64)
    return np.frombuffer(array("I", token_ids[:m]), dtype=np.uint32).astype(np.uint64)


def root_for(lora_id: int | None) -> State:
    """Chains of different LoRA adapters never match each other."""
    if not lora_id:
        return ROOT_STATE
    with np.errstate(over="ignore"):
        return State(int(_mix(np.array([lora_id], dtype=np.uint64) * K3)[0]), 0)


def _prefix(state: State, token_ids, block_size: int, max_blocks: int | None):
    """acc at each full block's end, and the prefix length there (uint64 arrays)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return None, None
    acc0, start = state
    m = n * block_size
    with np.errstate(over="ignore"):
        t = _tokens(token_ids, m)
        pos = np.arange(start, start + m, dtype=np.uint64)
        cs = np.cumsum(_mix(t * K1 + pos * K2 + SEED), dtype=np.uint64) + _U(acc0)
    lens = np.arange(start + block_size, start + m + 1, block_size, dtype=np.uint64)
    return cs[block_size - 1::block_size], lens


def _finish(ends: np.ndarray, lens: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(ends ^ (lens * K3))


def extend(state: State, token_ids, block_size: int,
           max_blocks: int | None = None) -> tuple[list[int], list[State]]:
    """Hashes of the full blocks of `token_ids` continuing `state`, and each block's state."""
    ends, lens = _prefix(state, token_ids, block_size, max_blocks)
    if ends is None:
        return [], []
    return (_finish(ends, lens).tolist(),
            [State(a, k) for a, k in zip(ends.tolist(), lens.tolist())])


def block_hashes(token_ids, block_size: int, state: State = ROOT_STATE,
                 max_blocks: int | None = None) -> list[int]:
    """Hashes of the full blocks of `token_ids` (a partial tail is ignored)."""
    ends, lens = _prefix(state, token_ids, block_size, max_blocks)
    return [] if ends is None else _finish(ends, lens).tolist()


def cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of a prompt that a prefix-cache hit can cover: vLLM always computes at least the
    last prompt token, so a fully cached prompt still recomputes its last block."""
    return max(0, (num_tokens - 1) // block_size)
