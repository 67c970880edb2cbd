"""Typed metadata that flows from the connector's scheduler half to its worker half."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    req_id: str                # this (consumer) engine's request id
    transfer_key: str          # the client-facing request id: key of the stats record
    transfer_id: str           # the producer's lease id
    engine_id: str
    agent_address: str
    compat_hash: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    num_tokens: int            # tokens these blocks carry (for stats)
    # the producer's block size, and the token range [first_token, end_token) the blocks
    # hold; when the block sizes differ the READ is laid out (kv_transfer/relayout.py)
    src_block_size: int = 0
    first_token: int = 0
    end_token: int = 0


@dataclass
class OfferSpec:
    """Consumer, push mode: blocks allocated for a prompt, to offer to the producer."""
    req_id: str
    transfer_key: str
    transfer_id: str
    agent_address: str
    block_ids: list[int]       # consumer block of each logical block 0..n-1
    skip_blocks: int           # cached here already: the producer must not write them
    num_tokens: int


@dataclass
class PushChunk:
    """Producer, push mode: the prompt tokens [start, end) this step computes."""
    req_id: str                # this (producer) engine's request id
    transfer_id: str           # the id the consumer offers blocks for
    block_ids: list[int]       # the request's blocks so far
    start: int
    end: int
    num_prompt: int

    @property
    def last(self) -> bool:
        return self.end >= self.num_prompt


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    # producer: transfer id -> number of blocks now held for a consumer
    leases: dict[str, int] = field(default_factory=dict)
    offers: list[OfferSpec] = field(default_factory=list)      # consumer, push
    cancels: list[str] = field(default_factory=list)           # consumer, push: req ids
    pushes: list[PushChunk] = field(default_factory=list)      # producer, push
    # the step computes nothing while a load is in flight (every request waits for KV, or
    # the step hook held the prompts back for a handoff): the worker may wait for the
    # transfer instead of returning at once into another empty step
    idle: bool = False
