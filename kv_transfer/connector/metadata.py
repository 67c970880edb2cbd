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


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    # producer: transfer id -> number of blocks now held for a consumer
    leases: dict[str, int] = field(default_factory=dict)


# keys of vLLM's kv_transfer_params that our components exchange
P_REMOTE_DECODE = "pd_remote_decode"     # set on a prefill request: hold blocks for decode
P_REMOTE_PREFILL = "pd_remote_prefill"   # set on a decode request: load blocks first
P_DONE = "_pd_processed"
