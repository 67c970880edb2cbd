"""What internal authentication costs: the same calls with it on and off, in one run.

  routing   Route on a real scheduler gRPC server on loopback (+ a Report that ends the
            booking), as the frontend calls it
  transfer  the control calls of one KV transfer on a real KV agent server: Acquire (the
            consumer pins the blocks) and Release, as the decode worker's connector calls them;
            plus signing a handle on the producer and checking it on the consumer
            (a 1,024-token prompt, 64 blocks)

On and off alternate in rounds, so drift on a shared machine hits both alike.

Reproduce:
  .venv/bin/python -m bench.bench_auth [--calls 1000 --rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from bench.stats import percentile
from pdserve import auth
from pdserve.rpc import pd_pb2, pd_pb2_grpc

SECRET = auth.new_secret()


def creds(role, on):
    if not on:
        return None
    ring = auth.Keyring(SECRET)
    return auth.Credentials(ring.token(role), ring)


def set_auth(on: bool) -> None:
    os.environ.pop(auth.ENV_SECRET, None)
    if on:
        os.environ[auth.ENV_SECRET] = SECRET


async def routing(on: bool, calls: int) -> list[float]:
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    set_auth(on)
    server, port, _svc = await create_server(SchedulerConfig(host="127.0.0.1", port=0,
                                                             heartbeat_timeout_s=600))
    await server.start()
    addr = f"127.0.0.1:{port}"
    w = auth.aio_channel(addr, creds(auth.WORKER, on))
    fe = auth.aio_channel(addr, creds(auth.FRONTEND, on))
    for wid, role in (("p", pd_pb2.ROLE_PREFILL), ("d", pd_pb2.ROLE_DECODE)):
        await pd_pb2_grpc.SchedulerStub(w).Register(pd_pb2.RegisterRequest(
            worker_id=wid, role=role, address=f"127.0.0.1:{1000 + role}",
            agent_address="127.0.0.1:1", layout=pd_pb2.KVLayout(model="m", compat_hash="h")))
    stub = pd_pb2_grpc.SchedulerStub(fe)
    ids = list(range(1, 1025))
    out = []
    for i in range(calls):
        t = time.perf_counter()
        r = await stub.Route(pd_pb2.RouteRequest(request_id=f"r{i}", model="m", token_ids=ids,
                                                 max_tokens=16))
        out.append(time.perf_counter() - t)
        await stub.Report(pd_pb2.ReportRequest(booking_id=r.booking_id,
                                               phase=pd_pb2.PHASE_DONE))
    await w.close()
    await fe.close()
    await server.stop(0)
    return out


def transfer(on: bool, calls: int) -> list[float]:
    from kv_transfer.agent import AgentState, start_agent_server

    set_auth(on)
    st = AgentState()
    st.acquire = lambda ids, ext: (ids, [])
    st.release = lambda ids: (ids, [])
    server, port = start_agent_server(st, "127.0.0.1", 0)
    out = []
    with auth.channel(f"127.0.0.1:{port}", creds(auth.WORKER, on)) as ch:
        stub = pd_pb2_grpc.KVAgentStub(ch)
        for i in range(calls):
            t = time.perf_counter()
            stub.Acquire(pd_pb2.LeaseRequest(transfer_ids=[f"t{i}"], extend_s=30), timeout=5)
            stub.Release(pd_pb2.LeaseRequest(transfer_ids=[f"t{i}"]), timeout=5)
            out.append(time.perf_counter() - t)
    server.stop(0)
    return out


def handles(calls: int) -> list[float]:
    c = creds(auth.WORKER, True)
    prompt = list(range(1024))
    once = auth.OnceOnly()
    out = []
    for i in range(calls):
        h = pd_pb2.KVHandle(transfer_id=f"t{i}", engine_id="e", agent_address="10.0.0.1:5",
                            block_ids=list(range(64)), num_tokens=1024, compat_hash="h",
                            lease_expires_unix=2e9, block_size=16)
        t = time.perf_counter()
        auth.sign_handle(c, h, prompt)
        assert auth.check_handle(c, h, prompt, once, 0.0) == ""
        out.append(time.perf_counter() - t)
    return out


def summary(xs) -> dict:
    ms = [x * 1e3 for x in xs]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "n": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="")
    ns = ap.parse_args(argv)
    got = {(k, on): [] for k in ("routing", "transfer") for on in (False, True)}
    for _ in range(ns.rounds):
        for on in (False, True):
            got["routing", on] += asyncio.run(routing(on, ns.calls))
            got["transfer", on] += transfer(on, ns.calls)
    set_auth(False)
    res = {f"{k} auth {'on' if on else 'off'}": summary(v) for (k, on), v in got.items()}
    res["handle sign + check"] = summary(handles(ns.calls))
    print(f"{'calls':<28}{'p50 ms':>10}{'p99 ms':>10}")
    for k, v in res.items():
        print(f"{k:<28}{v['p50_ms']:>10.3f}{v['p99_ms']:>10.3f}")
    for k in ("routing", "transfer"):
        off, on = res[f"{k} auth off"], res[f"{k} auth on"]
        print(f"{k}: auth adds {on['p50_ms'] - off['p50_ms']:+.3f} ms at p50 "
              f"({on['p50_ms'] / off['p50_ms']:.2f}x), {on['p99_ms'] - off['p99_ms']:+.3f} ms "
              f"at p99")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
