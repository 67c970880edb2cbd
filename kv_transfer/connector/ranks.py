"""Tensor parallelism in the connector: every rank of an engine serves its own KV shard.

vLLM runs one worker process per tensor-parallel rank, each holding the KV heads of its
shard (kv_transfer/mapping.py: `heads_of_rank`), and gives every rank the same scheduler
metadata. So each rank's worker half registers its shard with NIXL and runs its own KV
agent; rank 0's agent is the engine's front door:

* its address is the one in handles, the scheduler half and the workers know;
* the lease protocol (Acquire, Release) is its alone: the other ranks hold nothing
  themselves and report each prompt's blocks as sent at once, so vLLM, which frees a
  request's blocks only when every rank has reported it (its KVOutputAggregator), frees
  them when rank 0's lease ends;
* its handshake names every rank's agent (`rank_addresses`), with the engine's TP degree
  and KV heads.

A consumer rank reads, under the lease rank 0 gave it, the heads it holds from the
producer ranks holding them (`head_map`): whole blocks from the rank of its own number
when both engines have the same degree, head slices otherwise (`head_spans`).
Push mode needs TP 1 on both sides (refused when the engine starts)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kv_transfer import layout as L
from kv_transfer import mapping as M


def tp_position(vllm_config) -> tuple[int, int]:
    """(rank, size) of this worker process in its engine's tensor-parallel group."""
    pc = getattr(vllm_config, "parallel_config", None)
    size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    if size == 1:
        return 0, 1
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return int(get_tensor_model_parallel_rank()), size
    except (AssertionError, ImportError):   # no process group (tests of the logic)
        return int(getattr(pc, "rank", 0)) % size, size


def rank_file(agent_file: str, rank: int) -> str:
    """Where rank `rank` publishes its agent's address (rank 0: the engine's own file)."""
    return agent_file if rank == 0 else f"{agent_file}.rank{rank}"


def rank_port(agent_port: int, rank: int) -> int:
    """A fixed agent port is rank 0's; rank r listens r ports above it."""
    return agent_port + rank if agent_port else 0


def read_rank_addresses(agent_file: str, host: str, agent_port: int, size: int
                        ) -> list[str]:
    """Every rank's agent address, in rank order (raises while one is not published)."""
    from kv_transfer.agent import read_agent_address
    if agent_port:
        return [f"{host}:{rank_port(agent_port, r)}" for r in range(size)]
    out = []
    for r in range(size):
        path = rank_file(agent_file, r)
        if not os.path.exists(path):
            raise LookupError(f"tensor-parallel rank {r}'s KV agent has not started yet")
        out.append(read_agent_address(path))
    return out


@dataclass(frozen=True)
class Source:
    """One producer rank a load reads from."""
    rank: int
    key: str                          # the peer's key in our backend and maps
    address: str
    slices: tuple[M.HeadSlice, ...]   # empty: whole blocks


def peer_key(engine_id: str, rank: int) -> str:
    return engine_id if rank == 0 else f"{engine_id}#tp{rank}"


def sources(engine_id: str, front: "FrontInfo", tp_rank: int, tp_size: int,
            total_heads: int) -> list[Source]:
    """The producer ranks this consumer rank reads a prompt from, and what from each."""
    tp_p = front.tp_size
    if tp_p == tp_size:       # same degree: rank d holds exactly what producer rank d does
        return [Source(tp_rank, peer_key(engine_id, tp_rank), front.addresses[tp_rank], ())]
    if front.total_heads != total_heads:
        raise ValueError(f"the producer has {front.total_heads} KV heads, this engine "
                         f"{total_heads}")
    by_rank: dict[int, list[M.HeadSlice]] = {}
    for s in M.head_map(total_heads, tp_p, tp_size)[tp_rank]:
        by_rank.setdefault(s.src_rank, []).append(s)
    return [Source(r, peer_key(engine_id, r), front.addresses[r], tuple(sl))
            for r, sl in sorted(by_rank.items())]


@dataclass(frozen=True)
class FrontInfo:
    """What a producer engine's rank 0 said of its ranks at the handshake."""
    tp_size: int
    addresses: tuple[str, ...]
    total_heads: int


def slice_descriptors(local: list[L.Region], remote: list[L.Region],
                      pairs: list[tuple[int, int]], inner: list[int], axis: int, elem: int,
                      remote_heads: int, slices, device_id: int = 0, remote_device_id: int = 0
                      ) -> tuple[list[L.Desc], list[L.Desc]]:
    """Descriptor lists that READ `slices` of a producer rank's heads (blocks of `remote`,
    `remote_heads` heads each) into our blocks (`local`, of shape `inner`), for every
    (local block, remote block) pair of every region."""
    src_inner = M.with_heads(inner, axis, remote_heads)
    spans = [M.paired_spans(M.head_spans(src_inner, axis, elem, s.src_head, s.count),
                            M.head_spans(inner, axis, elem, s.dst_head, s.count))
             for s in slices]
    ld: list[L.Desc] = []
    rd: list[L.Desc] = []
    for lr, rr in zip(local, remote, strict=True):
        for lb, rb in pairs:
            if not (0 <= lb < lr.num_blocks and 0 <= rb < rr.num_blocks):
                raise ValueError("block id out of range")
            la, ra = lr.base_addr + lb * lr.block_stride, rr.base_addr + rb * rr.block_stride
            for per_slice in spans:
                for so, do, n in per_slice:
                    ld.append((la + do, n, device_id))
                    rd.append((ra + so, n, remote_device_id))
    return ld, rd
