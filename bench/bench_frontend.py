"""What the HTTP layer itself costs: CPU time per streamed completion through the frontend's
app, in-process (httpx's ASGI transport), with a cluster that answers at once, so nothing
but the app (middleware, request model, sampling checks, SSE encoding) and the client
are measured.

    .venv/bin/python -m bench.bench_frontend --requests 200 --chunks 16

Prints the CPU milliseconds per request, the least and the median of `--reps` rounds
(after a warm-up). The client's share is in both, so compare runs, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx


class FixedTokenizer:
    """Every text is the same three token ids (the component tests use it too)."""
    vocab_size, max_token_chars = 1000, 4

    async def encode_async(self, text, max_tokens=0, *args, **kw):
        return [1, 2, 3]

    def truncate(self, ids, trunc):
        return ids

    async def chat_async(self, messages, max_tokens=0, **kw):
        return [1, 2, 3]


class _Cluster:
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def generate(self, rid, model, ids, sp, timeout_s):
        from frontend.client import Chunk
        for i in range(self.chunks):
            yield Chunk([7], "x", finish_reason="length" if i == self.chunks - 1 else None)

    async def close(self):
        pass


async def measure(requests: int, chunks: int, reps: int) -> list[float]:
    """CPU ms per streamed request, one figure per round."""
    from frontend.app import create_app
    from pdserve.config import FrontendConfig

    app = create_app(FrontendConfig(model="unused", served_model_name="m"),
                     client=_Cluster(chunks), tokenizer=FixedTokenizer())
    body = {"model": "m", "prompt": "hi", "max_tokens": chunks, "stream": True}
    out = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://bench") as c:
        for rnd in range(reps + 1):                  # the first round warms up
            t0 = time.process_time()
            for _ in range(requests):
                r = await c.post("/v1/completions", json=body)
                if r.status_code != 200 or r.text.count("data: ") != chunks + 1:
                    raise RuntimeError(f"unexpected answer {r.status_code}: {r.text[:200]}")
            if rnd:
                out.append((time.process_time() - t0) / requests * 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=16, help="streamed chunks per request")
    ap.add_argument("--reps", type=int, default=5)
    ns = ap.parse_args(argv)
    ms = sorted(asyncio.run(measure(ns.requests, ns.chunks, ns.reps)))
    print(f"CPU per streamed request ({ns.chunks} chunks): least {ms[0]:.3f} ms, median "
          f"{ms[len(ms) // 2]:.3f} ms ({ns.reps} rounds of {ns.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
