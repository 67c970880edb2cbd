"""Engine death: SIGKILL only the vLLM engine-core process under a decode worker, then under
a prefill worker. The worker notices (vLLM's engine monitor), says NOT_SERVING,
deregisters and exits non-zero; the launcher starts it again; no request hangs meanwhile,
and service resumes with the same greedy output, without anyone acting."""

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.conftest import KV, serving, words
from tests.e2e.cluster import assert_idle, by_role, engine_core, pid_of, wait_until

PROMPT = words(120, seed=31)


@pytest.fixture(scope="module")
def dc(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "engine-death", extra=KV)


async def complete(client, c, prompt=PROMPT):
    r = await client.post(f"{c.url}/v1/completions", json={
        "model": c.model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    return r.status_code, r.json()


def back(c, name: str, old_address: str, timeout: float = 240.0) -> pd_pb2.WorkerInfo:
    """Until `name` is registered again by a new process (a new address)."""
    def new():
        w = {w.worker_id: w for w in c.workers()}.get(name)
        return w if w is not None and w.address != old_address else None
    return wait_until(new, timeout, 0.5, f"{name} back")


@pytest.mark.parametrize("role", [pd_pb2.ROLE_DECODE, pd_pb2.ROLE_PREFILL],
                         ids=["decode", "prefill"])
async def test_a_dead_engine_is_noticed_and_its_worker_restarted(dc, role):
    async with httpx.AsyncClient(timeout=120) as client:
        status, ref = await complete(client, dc)
        assert status == 200, ref
        (w,) = by_role(dc, role)
        pid = pid_of(dc, w.worker_id)
        engine_core(pid).send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        # requests meanwhile end, cleanly: completed elsewhere or an OpenAI error, no hang
        results = await asyncio.wait_for(asyncio.gather(
            *[complete(client, dc, words(60, seed=700 + i)) for i in range(3)]), 120)
        for status, body in results:
            assert status == 200 or (status in (502, 503) and body["error"]["message"]), body
        # the worker exits non-zero once it saw its engine die, and is started again
        try:
            psutil.Process(pid).wait(timeout=60)
        except psutil.NoSuchProcess:
            pass                                   # gone (and reaped) already
        new = await asyncio.to_thread(back, dc, w.worker_id, w.address)
        assert time.monotonic() - t0 < 300
        status, again = await complete(client, dc)
        assert status == 200 and again["choices"][0]["text"] == ref["choices"][0]["text"]
    log = dc.log_path.read_text()
    assert f"{w.worker_id} exited with code 3; restarting it" in log
    assert pid_of(dc, w.worker_id) != pid and not os.path.exists(f"/proc/{pid}")
    assert_idle(dc, [new])
