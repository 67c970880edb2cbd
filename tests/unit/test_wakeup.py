"""The engine-core wakeup (kv_transfer/wakeup.py), the plugin's hold wait around vLLM's
input-queue loop and its quiet wait in vLLM's shm queue (pdserve/vllm_plugin.py), on
stand-ins: real sockets, real threads, vLLM's own EngineCoreProc and SpinCondition methods
patched and restored."""

import os
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from kv_transfer.connector.connector import engine_quiescent
from kv_transfer.wakeup import HOLD_WAIT_S, TRANSFERS, WakeListener, Waker


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
    monkeypatch.setattr(plugin._register_hold_wait, "applied", False)
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


class CountingQueue(queue.Queue):
    """Counts the gets that could block (the hold wait's)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking_gets = 0

    def get(self, block=True, timeout=None):
        self.blocking_gets += bool(block)
        return super().get(block, timeout)


def test_hold_wait_steps_at_once_when_not_quiescent(hold_wait):
    # (not timed: a wall-clock bound failed on a loaded host)
    e = FakeEngineCore(lambda s: False)
    e.input_queue = CountingQueue()
    try:
        for _ in range(20):
            hold_wait(e)
        assert e.input_queue.blocking_gets == 0, "waited although work was pending"
    finally:
        e._pd_wake.stop()
    # the same loop on a quiescent engine waits (the count can fail)
    q = FakeEngineCore(lambda s: True)
    q.input_queue = CountingQueue()
    try:
        hold_wait(q)
        assert q.input_queue.blocking_gets == 1
    finally:
        q._pd_wake.stop()


class FakePoller:
    def __init__(self) -> None:
        self.timeouts: list[int] = []

    def poll(self, timeout=None):
        self.timeouts.append(timeout)
        return []


@pytest.fixture
def quiet_wait(monkeypatch):
    """vLLM's SpinCondition with pdserve's quiet wait, restored afterwards; sched_yield
    counted."""
    from vllm.distributed.device_communicators import shm_broadcast as sb

    import pdserve.vllm_plugin as plugin

    orig = sb.SpinCondition.wait
    yields = []
    monkeypatch.setattr(sb, "sched_yield", lambda: yields.append(1))
    monkeypatch.setenv("PDSERVE_QUIET_WAIT", "1")
    for k, v in {"PDSERVE_WAIT_SPIN_US": "200000", "PDSERVE_WAIT_POLL_MS": "1",
                 "PDSERVE_WAIT_IDLE_POLL_MS": "10", "PDSERVE_WAIT_IDLE_AFTER_MS": "400"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(plugin._register_quiet_wait, "applied", False)
    plugin._register_quiet_wait()
    cond = sb.SpinCondition.__new__(sb.SpinCondition)   # no sockets: the poller is faked
    cond.poller = FakePoller()
    cond.local_notify_socket = object()
    yield cond, yields
    sb.SpinCondition.wait = orig


def test_quiet_wait_spins_then_polls_then_idles(quiet_wait):
    cond, yields = quiet_wait
    now = time.monotonic()
    cond.last_read = now                    # just read: spin (yield)
    cond.wait(timeout_ms=5000)
    assert yields == [1] and cond.poller.timeouts == []
    cond.last_read = now - 0.3              # past the spin, within idle-after: short poll
    cond.wait(timeout_ms=5000)
    assert cond.poller.timeouts == [1]
    cond.last_read = now - 1.0              # idle: the long poll
    cond.wait(timeout_ms=5000)
    assert cond.poller.timeouts == [1, 10]
    cond.wait(timeout_ms=3)                 # vLLM's own deadline is shorter: it wins
    assert cond.poller.timeouts[-1] == 3


def test_quiet_wait_keeps_off_the_core_while_a_read_is_in_flight(quiet_wait):
    """A READ in flight in this process: no spinning and no short polls (the reading
    thread shares the core), whatever the time since the last read."""
    cond, yields = quiet_wait
    cond.last_read = time.monotonic()
    with TRANSFERS:
        assert TRANSFERS
        cond.wait(timeout_ms=5000)
        cond.last_read = time.monotonic() - 0.3
        cond.wait(timeout_ms=5000)
    assert not TRANSFERS
    assert yields == [] and cond.poller.timeouts == [10, 10]
    cond.last_read = time.monotonic()       # over: spinning again after a read
    cond.wait(timeout_ms=5000)
    assert yields == [1]
