"""The frontend's bounds, in-process (ASGI) with a fake cluster behind it: the body limit
(413 before parsing), the in-flight limit (429), admission refusals from the scheduler (429
with Retry-After, streamed or not), and 500 bodies that say nothing but the request id."""

import asyncio

import httpx
import pytest

from bench.bench_frontend import FixedTokenizer as Tok
from frontend.app import create_app
from frontend.client import Chunk
from pdserve.config import FrontendConfig
from pdserve.errors import Overloaded
from scheduler.admission import retry_after_s


class Cluster:
    def __init__(self, fail=None):
        self.fail, self.gate = fail, asyncio.Event()
        self.gate.set()

    async def generate(self, rid, model, ids, sp, timeout_s):
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        yield Chunk([7], "x", finish_reason="length")

    async def close(self):
        pass


def app(cluster, **kw):
    return create_app(FrontendConfig(model="unused", served_model_name="m", **kw),
                      client=cluster, tokenizer=Tok())


def client(a):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=a, raise_app_exceptions=False),
                             base_url="http://t")


BODY = {"model": "m", "prompt": "hi", "max_tokens": 1}


async def test_bodies_over_the_limit_get_413_before_parsing():
    async with client(app(Cluster(), max_body_bytes=1000)) as c:
        r = await c.post("/v1/completions", json={**BODY, "prompt": "w " * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        async def chunked():               # no Content-Length: counted as it streams in
            for _ in range(20):
                yield b"x" * 100
        r = await c.post("/v1/completions", content=chunked(),
                         headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await c.post("/v1/completions", json=BODY)
        assert r.status_code == 200, r.text


async def test_past_the_inflight_limit_requests_get_429_and_the_held_ones_finish():
    cl = Cluster()
    cl.gate.clear()
    async with client(app(cl, max_inflight=2)) as c:
        held = [asyncio.create_task(c.post("/v1/completions", json=BODY)) for _ in range(2)]
        await asyncio.sleep(0.2)
        r = await c.post("/v1/completions", json=BODY)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        assert (await c.get("/v1/models")).status_code == 200    # only generation counts
        cl.gate.set()
        assert [h.status_code for h in await asyncio.gather(*held)] == [200, 200]
        assert (await c.post("/v1/completions", json=BODY)).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_an_admission_refusal_is_a_429_with_retry_after(stream):
    async with client(app(Cluster(Overloaded("overloaded: forecast", retry_after_s=7.4)))) as c:
        r = await c.post("/v1/completions", json={**BODY, "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "overloaded"


async def test_a_500_says_only_the_request_id():
    async with client(app(Cluster(RuntimeError("secret /internal/path detail")))) as c:
        r = await c.post("/v1/completions", json=BODY, headers={"x-request-id": "abc"})
        assert r.status_code == 500
        msg = r.json()["error"]["message"]
        assert "abc" in msg and "secret" not in msg and "RuntimeError" not in msg


def test_admission_refuses_only_forecasts_over_the_factor():
    assert retry_after_s(0.0, 2.0, 4.0) == 0.0         # a cold model forecasts nothing
    assert retry_after_s(7.9, 2.0, 4.0) == 0.0
    assert retry_after_s(8.5, 2.0, 4.0) == 1.0         # at least a second
    assert retry_after_s(20.0, 2.0, 4.0) == 12.0
    assert retry_after_s(1e9, 2.0, 0.0) == 0.0         # off
    # a prompt that alone takes 11 s (over 4 x 2 s) is admitted on an idle cluster, and
    # refused only for a backlog in front of it
    assert retry_after_s(11.2, 2.0, 4.0, own_s=11.0) == 0.0
    assert retry_after_s(30.0, 2.0, 4.0, own_s=11.0) == 13.0
    assert retry_after_s(8.5, 2.0, 4.0, own_s=1.5) == 1.0     # a short one: as before


async def test_starlettes_own_refusals_are_openai_errors_too():
    async with client(app(Cluster())) as c:
        for r in (await c.post("/v1/completions", content=b'{"model": "m", "prompt": "\xff"}',
                               headers={"content-type": "application/json"}),
                  await c.get("/v1/nothing-here"), await c.get("/v1/completions")):
            assert r.status_code in (400, 404, 405), r.text
            assert r.json()["error"]["message"] and r.headers["x-request-id"]


class Three(Cluster):
    async def generate(self, rid, model, ids, sp, timeout_s):
        yield Chunk([7], "a")
        yield Chunk([8, 9], "bc")
        yield Chunk([10], "d", finish_reason="length")


async def _usages(c, path: str, body: dict) -> list:
    import json
    out = []
    async with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]).get("usage"))
    return out


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {**BODY, "max_tokens": 4}),
    ("/v1/chat/completions", {"model": "m", "max_tokens": 4,
                              "messages": [{"role": "user", "content": "hi"}]})])
async def test_stream_usage_as_vllm_counts_it(path, body):
    """vLLM's rules: usage at the end with include_usage; in every chunk too with
    continuous_usage_stats (the choice's tokens so far); --enable-force-include-usage
    both, for every stream."""
    s = {**body, "stream": True}
    async with client(app(Three())) as c:
        assert set(await _usages(c, path, s)) == {None}
        u = await _usages(c, path, {**s, "stream_options": {"include_usage": True}})
        assert u[:-1] == [None] * (len(u) - 1) and u[-1]["completion_tokens"] == 4
        u = await _usages(c, path, {**s, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}})
        counts = [x["completion_tokens"] for x in u]
        assert counts[-4:] == [1, 3, 4, 4] and all(x["prompt_tokens"] == 3 for x in u)
    async with client(app(Three(), enable_force_include_usage=True)) as c:
        u = await _usages(c, path, s)
        assert [x["completion_tokens"] for x in u][-4:] == [1, 3, 4, 4]


async def test_every_response_carries_the_request_id_streamed_or_not():
    """The client's x-request-id comes back on streamed and plain responses and on a
    refusal; without one each response gets its own; a stream's error names it."""
    async with client(app(Three())) as c:
        async with c.stream("POST", "/v1/completions", json={**BODY, "stream": True},
                            headers={"x-request-id": "rid-1"}) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == "rid-1"
            assert [ln async for ln in r.aiter_lines() if ln.startswith("data: ")][-1] == \
                "data: [DONE]"
        r = await c.post("/v1/completions", json={**BODY, "max_tokens": -1},
                         headers={"x-request-id": "rid-2"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "rid-2"
        ids = {(await c.post("/v1/completions", json=BODY)).headers["x-request-id"]
               for _ in range(3)}
        assert len(ids) == 3 and all(len(i) == 32 for i in ids)
        for path in ("/v1/models", "/health"):       # endpoints that set none themselves
            r = await c.get(path, headers={"x-request-id": "rid-4"})
            assert r.status_code in (200, 503) and r.headers["x-request-id"] == "rid-4"
    async with client(app(Cluster(RuntimeError("boom")))) as c:
        r = await c.post("/v1/completions", json={**BODY, "stream": True},
                         headers={"x-request-id": "rid-3"})
        assert r.headers["x-request-id"] == "rid-3" and "rid-3" in r.text
        assert "boom" not in r.text
