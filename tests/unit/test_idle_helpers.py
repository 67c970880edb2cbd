"""An engine's idle helper loops (torch's gloo socket loops) run under SCHED_IDLE; every
other thread keeps its policy (pdserve/vllm_plugin.py, `idle_helpers`)."""

from __future__ import annotations

import ctypes
import os
import threading

from pdserve.vllm_plugin import idle_helpers


def test_only_the_named_threads_go_idle():
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    tids: dict[str, int] = {}
    named, done = threading.Barrier(3), threading.Event()

    def thread(name: bytes):
        libc.prctl(15, name, 0, 0, 0)      # PR_SET_NAME, as a native thread names itself
        tids[name.decode()] = threading.get_native_id()
        named.wait()
        done.wait(30)

    ts = [threading.Thread(target=thread, args=(n,), daemon=True)
          for n in (b"gloo_tcp_loop", b"pd-kv-load")]
    for t in ts:
        t.start()
    named.wait(30)
    try:
        assert idle_helpers() == 1
        assert os.sched_getscheduler(tids["gloo_tcp_loop"]) == os.SCHED_IDLE
        assert os.sched_getscheduler(tids["pd-kv-load"]) == os.SCHED_OTHER
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
        assert idle_helpers(("no-such-thread",)) == 0
    finally:
        done.set()
        for t in ts:
            t.join(30)
