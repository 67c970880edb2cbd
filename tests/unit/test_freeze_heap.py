"""`pdserve.procs.freeze_heap`: a serving process's start-up heap leaves the collector's
walk (as vLLM's server does after its start), unless PDSERVE_GC_FREEZE=0. Run in forked
children, so this process's heap stays as it is."""

import gc
import os


def _in_child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_the_start_up_heap_is_frozen_and_a_collection_skips_it(monkeypatch):
    from pdserve.procs import freeze_heap

    monkeypatch.delenv("PDSERVE_GC_FREEZE", raising=False)

    def child() -> int:
        gc.unfreeze()
        held = [[i] for i in range(50_000)]          # a start-up heap
        tracked = len(gc.get_objects())
        frozen = freeze_heap()
        if not (frozen == gc.get_freeze_count() and frozen >= len(held)):
            return 2
        # what the collector walks now is what came after: none of the heap above
        return 0 if len(gc.get_objects()) < tracked - len(held) else 3

    assert _in_child(child) == 0


def test_pdserve_gc_freeze_0_leaves_the_heap(monkeypatch):
    from pdserve.procs import freeze_heap

    monkeypatch.setenv("PDSERVE_GC_FREEZE", "0")

    def child() -> int:
        gc.unfreeze()
        return 0 if freeze_heap() == 0 and gc.get_freeze_count() == 0 else 4

    assert _in_child(child) == 0
