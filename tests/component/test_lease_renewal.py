"""The decode worker's lease renewal against a real KV agent (gRPC on loopback) whose
leases live in the producer's LeaseTable: renewed while the request waits, left to expire
once the load is over, and given up (not read) once the producer no longer holds it."""

import asyncio
import threading
import time

from decode_worker.leases import LeaseRenewer
from kv_transfer.agent import AgentState, start_agent_server
from kv_transfer.state import LeaseTable
from pdserve import metrics as M
from pdserve.rpc import pd_pb2


def agent(table: LeaseTable):
    lock = threading.Lock()
    st = AgentState()

    def acquire(ids, extend_s):
        with lock:
            return table.acquire(ids, time.monotonic(), extend_s)

    def release(ids):
        with lock:
            return table.release(ids, time.monotonic())
    st.acquire, st.release = acquire, release
    server, port = start_agent_server(st, "127.0.0.1", 0)
    return server, f"127.0.0.1:{port}"


def renewals(result: str) -> float:
    return M.KV_LEASE_RENEWALS.labels(result)._value.get()


def test_renewed_while_waiting_then_left_to_expire():
    table = LeaseTable()
    server, addr = agent(table)
    try:
        table.add("t1", time.monotonic(), 0.6, 3)
        kv = pd_pb2.KVHandle(transfer_id="t1", agent_address=addr)
        ok0 = renewals("ok")

        async def run():
            r = LeaseRenewer(lease_s=0.6)
            done = asyncio.Event()
            task = asyncio.create_task(r.hold(kv, done))
            await asyncio.sleep(1.5)           # 2.5 lease lengths: only renewal keeps it
            held = table.leases["t1"].deadline > time.monotonic()
            done.set()
            await task
            await r.channels.close()
            return held
        assert asyncio.run(run())
        assert renewals("ok") - ok0 >= 3
        time.sleep(0.7)                        # no renewal after the load: it expires
        released, expired = table.take_finished(time.monotonic())
        assert expired == {"t1"} and not released
    finally:
        server.stop(0)


def test_a_lost_lease_stops_renewal():
    table = LeaseTable()
    server, addr = agent(table)
    try:
        table.add("t2", time.monotonic(), 5.0, 1)
        table.release(["t2"])                  # e.g. the producer freed it (expiry, release)
        kv = pd_pb2.KVHandle(transfer_id="t2", agent_address=addr)
        lost0 = renewals("lost")

        async def run():
            r = LeaseRenewer(lease_s=0.6)
            t0 = time.monotonic()
            await asyncio.wait_for(r.hold(kv, asyncio.Event()), 5)   # returns by itself
            await r.channels.close()
            return time.monotonic() - t0
        assert asyncio.run(run()) < 4
        assert renewals("lost") - lost0 == 1
    finally:
        server.stop(0)


def test_lease_client_acquire_and_release_both_forms():
    """pdserve/lease_client.py, the one client of the protocol: the ids held come back,
    Release frees the lease, and a Release nobody answers is logged, not raised."""
    import grpc

    from kv_transfer.agent import AgentClients
    from pdserve.lease_client import AsyncLeaseClient, LeaseClient, agent_stubs
    from pdserve.rpc import Channels
    table = LeaseTable()
    server, addr = agent(table)
    clients = AgentClients()
    try:
        now = time.monotonic()
        table.add("a", now, 5.0, 1)
        table.add("b", now, 5.0, 1)
        sync = LeaseClient(clients.get, timeout_s=2.0)
        assert sync.acquire(addr, ["a", "gone"], 10.0) == {"a"}
        assert table.leases["a"].deadline > time.monotonic() + 8.0     # extended
        assert sync.release(addr, ["a"])
        assert not sync.release("127.0.0.1:1", ["x"])     # refused: False, no exception

        async def run():
            ch = Channels()
            aio = AsyncLeaseClient(agent_stubs(ch), timeout_s=2.0)
            try:
                held = await aio.acquire(addr, ["b"], 10.0)
                ok = await aio.release(addr, ["b"])
                dead = await aio.release("127.0.0.1:1", ["y"])
                try:
                    await aio.acquire("127.0.0.1:1", ["y"], 1.0)
                    raised = False
                except grpc.RpcError:
                    raised = True                        # Acquire's failure is the caller's
                return held, ok, dead, raised
            finally:
                await ch.close()
        held, ok, dead, raised = asyncio.run(run())
        assert held == {"b"} and ok and not dead and raised
        released, _ = table.take_finished(time.monotonic())
        assert released == {"a", "b"}
    finally:
        clients.close()
        server.stop(0)
