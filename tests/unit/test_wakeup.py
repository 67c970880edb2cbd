"""The engine-core wakeup (kv_transfer/wakeup.py) and the plugin's hold wait around vLLM's
input-queue loop (pdserve/vllm_plugin.py), on a stand-in engine core: real sockets, real
threads, vLLM's own EngineCoreProc method patched and restored."""

import os
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from kv_transfer.connector.connector import engine_quiescent
from kv_transfer.wakeup import HOLD_WAIT_S, WakeListener, Waker


def test_waker_reaches_listener_of_that_pid():
    got = threading.Event()
    pid = 10_000_000 + os.getpid()     # a name no real engine core has
    ln = WakeListener(got.set, pid=pid)
    try:
        assert Waker(pid=pid).wake()
        assert got.wait(2)
    finally:
        ln.stop()


def test_waker_without_listener_is_a_no_op():
    w = Waker(pid=20_000_000 + os.getpid())
    assert w.wake() is False and w.sent == 0
    w.close()


WAITING_FOR_KV, WAITING, RUNNING = "WAITING_FOR_REMOTE_KVS", "WAITING", "RUNNING"


def sched(running=(), waiting=(), finished=(), requests=None, holding=(), loaded=()):
    reqs = [SimpleNamespace(status=s) for s in waiting]
    return SimpleNamespace(running=list(running), waiting=reqs,
                           kv_holding_waiting=[SimpleNamespace(status=s) for s in holding],
                           finished_req_ids=set(finished),
                           finished_recving_kv_req_ids=set(loaded),
                           requests=requests if requests is not None else {"r": 1})


@pytest.mark.parametrize("s,own_work,want", [
    (sched(waiting=[WAITING_FOR_KV]), False, True),                 # consumer: load pending
    (sched(holding=[WAITING_FOR_KV]), False, True),                 # (vLLM keeps it here)
    # the load finished: the status stays until the next step admits the request
    (sched(holding=[WAITING_FOR_KV], loaded=["r"]), False, False),
    (sched(waiting=[WAITING_FOR_KV, WAITING_FOR_KV]), False, True),
    (sched(), False, True),                                         # producer: leases held
    (sched(waiting=[WAITING_FOR_KV]), True, False),                 # metadata to deliver
    (sched(waiting=[WAITING_FOR_KV, WAITING]), False, False),       # a request to schedule
    (sched(running=["r"]), False, False),
    (sched(finished=["r"]), False, False),                          # a step clears them
    (sched(requests={}), False, False),                             # vLLM blocks by itself
    (sched(holding=[WAITING]), False, False),
    (SimpleNamespace(), False, False),                              # unknown scheduler
])
def test_engine_quiescent(s, own_work, want):
    assert engine_quiescent(s, own_work, WAITING_FOR_KV) is want


class FakeEngineCore:
    """What vLLM's EngineCoreProc._process_input_queue touches."""

    def __init__(self, quiescent):
        self.input_queue = queue.Queue()
        self.handled = []
        self.engines_running = False
        self.batch_queue = None
        self.scheduler = SimpleNamespace(connector=SimpleNamespace(pd_quiescent=quiescent))

    def has_work(self):
        return True

    def is_running(self):
        return True

    def _handle_client_request(self, kind, req):
        self.handled.append(kind)


@pytest.fixture
def hold_wait(monkeypatch):
    from vllm.v1.engine.core import EngineCoreProc

    import pdserve.vllm_plugin as plugin

    orig = EngineCoreProc._process_input_queue
    monkeypatch.setenv("PDSERVE_HOLD_WAIT", "1")
    monkeypatch.setattr(plugin, "_HOLD_PATCHED", False)
    plugin._register_hold_wait()
    yield EngineCoreProc._process_input_queue
    EngineCoreProc._process_input_queue = orig


def test_hold_wait_sleeps_until_woken(hold_wait):
    from vllm.v1.engine import EngineCoreRequestType

    e = FakeEngineCore(lambda s: True)
    try:
        t = time.monotonic()
        hold_wait(e)                                  # nobody wakes it: the bound
        slept = time.monotonic() - t
        assert HOLD_WAIT_S * 0.8 <= slept < HOLD_WAIT_S + 0.5, slept
        # a worker (here: this process, as the engine core's child would) wakes it
        threading.Timer(0.01, lambda: Waker(pid=os.getpid()).wake()).start()
        t = time.monotonic()
        hold_wait(e)
        assert e.handled == [EngineCoreRequestType.WAKEUP]
        # a new request ends the wait too, and is handled
        threading.Timer(0.01, lambda: e.input_queue.put((EngineCoreRequestType.ADD, 1))).start()
        hold_wait(e)
        assert e.handled[-1] == EngineCoreRequestType.ADD
    finally:
        e._pd_wake.stop()


def test_hold_wait_steps_at_once_when_not_quiescent(hold_wait):
    e = FakeEngineCore(lambda s: False)
    try:
        t = time.monotonic()
        for _ in range(20):
            hold_wait(e)
        assert time.monotonic() - t < HOLD_WAIT_S, "waited although work was pending"
    finally:
        e._pd_wake.stop()
