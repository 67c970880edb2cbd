"""The KV handle: what a producer hands over so that a consumer can load a prompt's blocks.

One type, from end to end, with every conversion here and the keys nowhere else:
* the connector's producer half makes it when a prefill finishes
  (`to_params`: vLLM's kv_transfer_params out of the finished request);
* the prefill worker reads it back (`from_params`), signs it and sends it as the wire's
  `KVHandle` (`to_proto`); a release by the prefill worker goes to its `source`;
* the decode worker turns the wire's handle (`from_proto`) into its engine request's
  kv_transfer_params (`load_params`), and the connector's consumer half reads those
  (`from_params`, `source` for releases).

A push request carries no handle: the decode engine offers blocks, and its
kv_transfer_params name only the producer's agent and the transfer (`push_params`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pdserve.rpc import pd_pb2

# keys of vLLM's kv_transfer_params that our components exchange
P_REMOTE_DECODE = "pd_remote_decode"     # set on a prefill request: hold blocks for decode
P_REMOTE_PREFILL = "pd_remote_prefill"   # set on a decode request: load blocks first
P_DONE = "_pd_processed"                 # the consumer half has taken the request in
P_PUSH = "pd_push"                       # push mode (both sides)
P_KEY = "transfer_key"                   # the client-facing id: key of the stats record
P_FIRST_AT = "pd_first_token_at"         # a decode request: when its first token went out
                                         # (unix s), so its engine counts that gap in TPOT


@dataclass(frozen=True)
class KVHandle:
    transfer_id: str            # the producer's lease id (its engine's request id)
    engine_id: str              # the producer engine
    agent_address: str          # its KV agent: leases, handshake, READs
    block_ids: tuple[int, ...]  # the producer's blocks holding the prompt, in order
    num_tokens: int             # prompt tokens those blocks hold
    compat_hash: str = ""       # the producer's KV layout; a consumer refuses another
    block_size: int = 0         # the producer's tokens per block (0: the consumer's)
    lease_expires_unix: float = 0.0

    @classmethod
    def made(cls, transfer_id: str, engine_id: str, agent_address: str, block_ids,
             num_tokens: int, compat_hash: str, block_size: int, lease_s: float) -> "KVHandle":
        """The producer's new handle, its lease running from now."""
        return cls(transfer_id, engine_id, agent_address, tuple(int(b) for b in block_ids),
                   int(num_tokens), compat_hash, block_size, time.time() + lease_s)

    # -- vLLM's kv_transfer_params
    def to_params(self) -> dict[str, Any]:
        return {"transfer_id": self.transfer_id, "engine_id": self.engine_id,
                "agent_address": self.agent_address, "block_ids": list(self.block_ids),
                "num_tokens": self.num_tokens, "compat_hash": self.compat_hash,
                "block_size": self.block_size, "lease_expires_unix": self.lease_expires_unix}

    def load_params(self, transfer_key: str, first_token_at: float = 0.0) -> dict[str, Any]:
        """A decode request's kv_transfer_params: load these blocks before computing.
        `first_token_at`: when the client got the first token (the prefill worker's)."""
        p = {P_REMOTE_PREFILL: True, P_KEY: transfer_key, **self.to_params()}
        if first_token_at > 0:
            p[P_FIRST_AT] = first_token_at
        return p

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "KVHandle":
        return cls(transfer_id=str(p["transfer_id"]), engine_id=str(p["engine_id"]),
                   agent_address=str(p["agent_address"]),
                   block_ids=tuple(int(b) for b in p["block_ids"]),
                   num_tokens=int(p["num_tokens"]), compat_hash=str(p.get("compat_hash", "")),
                   block_size=int(p.get("block_size") or 0),
                   lease_expires_unix=float(p.get("lease_expires_unix") or 0.0))

    # -- the wire
    def to_proto(self) -> pd_pb2.KVHandle:
        return pd_pb2.KVHandle(
            transfer_id=self.transfer_id, engine_id=self.engine_id,
            agent_address=self.agent_address, block_ids=list(self.block_ids),
            num_tokens=self.num_tokens, compat_hash=self.compat_hash,
            lease_expires_unix=self.lease_expires_unix, block_size=self.block_size)

    @classmethod
    def from_proto(cls, kv: pd_pb2.KVHandle) -> "KVHandle":
        return cls(transfer_id=kv.transfer_id, engine_id=kv.engine_id,
                   agent_address=kv.agent_address, block_ids=tuple(kv.block_ids),
                   num_tokens=kv.num_tokens, compat_hash=kv.compat_hash,
                   block_size=kv.block_size, lease_expires_unix=kv.lease_expires_unix)


def source(p: dict[str, Any]) -> tuple[str, str]:
    """(producer agent address, transfer id) of a consumer request, pulled or pushed: where
    its lease is released."""
    return str(p["agent_address"]), str(p["transfer_id"])


def prefill_params(push_transfer_id: str = "") -> dict[str, Any]:
    """A prefill request's kv_transfer_params: hold the blocks for a decode engine; in push
    mode, WRITE them into the blocks the decode engine offers for `push_transfer_id`."""
    p: dict[str, Any] = {P_REMOTE_DECODE: True}
    if push_transfer_id:
        p.update({P_PUSH: True, "transfer_id": push_transfer_id})
    return p


def push_params(transfer_key: str, transfer_id: str, agent_address: str) -> dict[str, Any]:
    """A decode request's kv_transfer_params in push mode: offer blocks to this producer."""
    return {P_REMOTE_PREFILL: True, P_PUSH: True, P_KEY: transfer_key,
            "transfer_id": transfer_id, "agent_address": agent_address}
