"""Minimal OpenAI-compatible proxies for the baselines of `bench.compare`.

    python -m bench.proxy --mode least-outstanding --backend URL --backend URL --port P
    python -m bench.proxy --mode pd --prefill URL --decode URL --port P

* `least-outstanding`: every request goes to the backend with the fewest requests in flight
  (ties: round robin), streamed through unchanged. Setup 2: colocated replicas.
* `pd`: vLLM's NixlConnector protocol (the flow of vLLM's own toy P/D proxy): the prompt is
  first sent to the prefill server with `max_tokens=1`, not streamed, with
  `kv_transfer_params={"do_remote_decode": true}`; the `kv_transfer_params` it answers with
  go with the original request to the decode server, which pulls the KV and streams the
  answer. Setup 3: vLLM's own 1P1D.

Nothing else: no retries, no health checks. Binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


class LeastOutstanding:
    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.outstanding = {b: 0 for b in backends}
        self._rr = itertools.count()

    def pick(self) -> str:
        low = min(self.outstanding.values())
        tied = [b for b in self.backends if self.outstanding[b] == low]
        return tied[next(self._rr) % len(tied)]


def make_app(mode: str, backends: list[str], prefill: str = "", decode: str = "") -> FastAPI:
    app = FastAPI()
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                               limits=httpx.Limits(max_connections=512))
    lo = LeastOutstanding(backends)
    first = (backends or [decode])[0]

    async def forward(url: str, path: str, body: dict, done=None) -> Response:
        req = client.build_request("POST", f"{url}{path}", json=body)
        r = await client.send(req, stream=True)

        async def chunks():
            try:
                async for c in r.aiter_raw():
                    yield c
            finally:
                await r.aclose()
                if done:
                    done()
        if body.get("stream"):
            return StreamingResponse(chunks(), status_code=r.status_code,
                                     media_type=r.headers.get("content-type"))
        data = b"".join([c async for c in chunks()])
        return Response(data, status_code=r.status_code,
                        media_type=r.headers.get("content-type"))

    async def handle(path: str, request: Request) -> Response:
        body = await request.json()
        if mode == "least-outstanding":
            url = lo.pick()
            lo.outstanding[url] += 1
            try:
                return await forward(url, path, body,
                                     done=lambda: lo.outstanding.__setitem__(
                                         url, lo.outstanding[url] - 1))
            except BaseException:
                lo.outstanding[url] -= 1
                raise
        # pd: prefill with one token, hand its KV params to the decode server
        pre = {k: v for k, v in body.items()
               if k not in ("stream", "stream_options", "max_completion_tokens")}
        pre.update(max_tokens=1, stream=False, kv_transfer_params={
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None})
        r = await client.post(f"{prefill}{path}", json=pre)
        if r.status_code != 200:
            return Response(r.content, status_code=r.status_code,
                            media_type=r.headers.get("content-type"))
        params = r.json().get("kv_transfer_params")
        return await forward(decode, path, {**body, "kv_transfer_params": params})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models():
        r = await client.get(f"{first}/v1/models")
        return JSONResponse(r.json(), status_code=r.status_code)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/outstanding")
    async def outstanding():
        return Response(json.dumps(lo.outstanding), media_type="application/json")

    return app


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["least-outstanding", "pd"], required=True)
    ap.add_argument("--backend", action="append", default=[])
    ap.add_argument("--prefill", default="")
    ap.add_argument("--decode", default="")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ns = ap.parse_args(argv)
    if ns.mode == "least-outstanding" and not ns.backend:
        ap.error("least-outstanding needs --backend")
    if ns.mode == "pd" and not (ns.prefill and ns.decode):
        ap.error("pd needs --prefill and --decode")
    app = make_app(ns.mode, ns.backend, ns.prefill, ns.decode)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
