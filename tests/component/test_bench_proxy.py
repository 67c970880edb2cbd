"""The benchmark's least-outstanding proxy (bench/proxy.py, the `vllm-2x` baseline's front)
against two fake OpenAI backends on loopback: answers pass through unchanged, streamed and
not; concurrent requests spread over the backends; every in-flight count returns to zero.
(The P/D mode runs against real vLLM servers in tests/e2e/test_compare.py.)"""

import asyncio
import json
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.proxy import make_app
from tests.component.loopback import serve, stop


def backend(name: str) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("hold"):       # a request that stays in flight until released
            while not app.state.release:
                await asyncio.sleep(0.01)
        if body.get("stream"):
            async def gen():
                for t in ("a", "b"):
                    yield f"data: {json.dumps({'backend': name, 'text': t})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({"backend": name, "echo": body["prompt"]})

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": name}]}
    app.state.release = False
    return app


@pytest.fixture(scope="module")
def backends():
    apps = [backend("A"), backend("B")]
    running = [serve(a) for a in apps]
    yield apps, [f"http://127.0.0.1:{port}" for _, _, port in running]
    for server, t, _ in running:
        stop(server, t)


async def test_least_outstanding_passes_answers_through_and_spreads_load(backends):
    apps, urls = backends
    proxy = make_app("least-outstanding", urls)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy),
                                 base_url="http://p", timeout=30) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 200 and r.json()["echo"] == "hi"
        async with c.stream("POST", "/v1/completions",
                            json={"prompt": "hi", "stream": True}) as s:
            lines = [x async for x in s.aiter_lines() if x.startswith("data: ")]
        assert [json.loads(x[6:])["text"] for x in lines[:-1]] == ["a", "b"]
        assert lines[-1] == "data: [DONE]"
        assert (await c.get("/outstanding")).json() == {urls[0]: 0, urls[1]: 0}
        # one request held in flight: the next goes to the other backend
        held = asyncio.ensure_future(c.post("/v1/completions",
                                            json={"prompt": "x", "hold": True}))
        deadline = time.monotonic() + 10
        while sum((await c.get("/outstanding")).json().values()) < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        busy = [u for u, n in (await c.get("/outstanding")).json().items() if n][0]
        free = (await c.post("/v1/completions", json={"prompt": "y"})).json()["backend"]
        assert free == "AB"[urls.index(busy) ^ 1]
        for a in apps:
            a.state.release = True
        assert (await held).json()["backend"] == "AB"[urls.index(busy)]
        assert (await c.get("/outstanding")).json() == {urls[0]: 0, urls[1]: 0}
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "A"
