"""Translations between the scheduler's state (scheduler/state.py) and its protobuf
messages. Pure: no I/O, no clock."""

from __future__ import annotations

from pdserve.latency import StepSample
from pdserve.rpc import pd_pb2
from scheduler.state import Load

ROLE = {pd_pb2.ROLE_PREFILL: "prefill", pd_pb2.ROLE_DECODE: "decode",
        pd_pb2.ROLE_MIXED: "mixed"}
ROLE_PB = {v: k for k, v in ROLE.items()}
MODE_PB = {"disagg": pd_pb2.ROUTE_MODE_DISAGG, "local": pd_pb2.ROUTE_MODE_LOCAL}


def load(pb: pd_pb2.WorkerLoad) -> Load:
    return Load(pb.running, pb.waiting, pb.kv_usage, pb.kv_leases_held, pb.prefill_tokens,
                pb.ttft_ms, pb.tpot_ms, pb.num_blocks, pb.max_num_seqs, pb.step_allow_ms,
                pb.step_budget_tokens, pb.max_num_batched_tokens)


def load_pb(ld: Load) -> pd_pb2.WorkerLoad:
    return pd_pb2.WorkerLoad(running=ld.running, waiting=ld.waiting, kv_usage=ld.kv_usage,
                             kv_leases_held=ld.kv_leases_held, prefill_tokens=ld.prefill_tokens,
                             ttft_ms=ld.ttft_ms, tpot_ms=ld.tpot_ms, num_blocks=ld.num_blocks,
                             max_num_seqs=ld.max_num_seqs, step_allow_ms=ld.step_allow_ms,
                             step_budget_tokens=ld.step_budget_tokens,
                             max_num_batched_tokens=ld.max_num_batched_tokens)


def samples(pbs) -> list[StepSample]:
    return [StepSample(s.seconds, s.prefill_tokens, s.prefill_attn, s.decode_seqs,
                       s.decode_ctx, s.late_only) for s in pbs if s.seconds > 0]


def worker_ref(w) -> pd_pb2.WorkerRef:
    return pd_pb2.WorkerRef(worker_id=w.worker_id, address=w.address,
                            agent_address=w.agent_address)
