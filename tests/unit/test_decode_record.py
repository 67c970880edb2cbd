"""The decode worker asks the KV agent for a transfer's record when the load is over, not
after the last token: on a saturated host that call to the engine-core process held the
last token back (decode_worker/server.py). A local prefill has no transfer to ask about.

The engine and the agent are fakes that log what happens in order; no network."""

from __future__ import annotations

import asyncio
import types

import pytest

from decode_worker import server as S
from pdserve.rpc import pd_pb2


class FakeEngine:
    def __init__(self, log: list[str], n: int = 3) -> None:
        self.log, self.n = log, n

    async def generate(self, prompt, params, rid, **_):
        for i in range(self.n):
            for _ in range(5):          # an engine step: other tasks run meanwhile
                await asyncio.sleep(0)
            last = i == self.n - 1
            self.log.append("final" if last else f"token{i}")
            c = types.SimpleNamespace(text=f"t{i}", token_ids=[7 + i], logprobs=None,
                                      finish_reason="length" if last else None,
                                      stop_reason=None)
            yield types.SimpleNamespace(outputs=[c], finished=last, num_cached_tokens=0,
                                        prompt_logprobs=None)


def runtime(log: list[str]) -> types.SimpleNamespace:
    async def agent_stats(pop=None, timeout=5.0):
        log.append("stats")
        st = pd_pb2.AgentStats()
        for rid in pop or []:
            st.records[rid].CopyFrom(pd_pb2.KVTransferStats(status="ok", mode="push",
                                                            tokens=4))
        return st

    cfg = types.SimpleNamespace(engine=types.SimpleNamespace(max_model_len=64),
                                kv=types.SimpleNamespace(lease_s=5.0,
                                                         load_failure_policy="fail"))
    return types.SimpleNamespace(cfg=cfg, creds=None, handles_used=set(), inflight=0,
                                 engine=FakeEngine(log), agent_stats=agent_stats)


async def collect(servicer, request) -> list:
    return [m async for m in servicer.Generate(request, context=None)]


def request(**kw) -> pd_pb2.GenerateRequest:
    return pd_pb2.GenerateRequest(request_id="r1", prompt_token_ids=[1, 2, 3, 4],
                                  sampling=pd_pb2.SamplingParams(max_tokens=3), **kw)


def test_the_record_is_asked_for_before_the_last_token(monkeypatch):
    monkeypatch.setattr(S.auth, "check_push", lambda creds, push: "")
    log: list[str] = []
    msgs = asyncio.run(collect(S.DecodeServicer(runtime(log)), request(
        push=pd_pb2.KVPush(transfer_id="p1", agent_address="127.0.0.1:1"))))
    assert log.count("stats") == 1
    assert log.index("stats") < log.index("final"), log
    assert [m.finish_reason for m in msgs] == ["", "", "length"]
    assert msgs[-1].kv_transfer.mode == "push" and msgs[-1].num_external_tokens == 4


def test_a_local_prefill_asks_for_no_record():
    log: list[str] = []
    msgs = asyncio.run(collect(S.DecodeServicer(runtime(log)), request(local_prefill=True)))
    assert "stats" not in log
    assert msgs[-1].finish_reason == "length" and not msgs[-1].HasField("kv_transfer")


@pytest.mark.parametrize("n", [1, 2])
def test_a_short_stream_still_carries_its_record(monkeypatch, n):
    monkeypatch.setattr(S.auth, "check_push", lambda creds, push: "")
    log: list[str] = []
    rt = runtime(log)
    rt.engine = FakeEngine(log, n)
    msgs = asyncio.run(collect(S.DecodeServicer(rt), request(
        push=pd_pb2.KVPush(transfer_id="p1", agent_address="127.0.0.1:1"))))
    assert log.count("stats") == 1 and msgs[-1].kv_transfer.tokens == 4
