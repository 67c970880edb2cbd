"""`pdserve.procs.freeze_heap`: a serving process's start-up heap leaves the collector's
walk (as vLLM's server does after its start), unless PDSERVE_GC_FREEZE=0. Each case runs in
a new interpreter: forking this one, with the threads earlier tests leave, and then
collecting in the child crashed it (SIGSEGV) in a full suite."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import gc, sys
    from pdserve.procs import freeze_heap

    held = [[i] for i in range(50_000)]            # a start-up heap
    tracked = len(gc.get_objects())
    frozen = freeze_heap()
    if sys.argv[1] == "off":
        sys.exit(0 if frozen == 0 and gc.get_freeze_count() == 0 else 4)
    if not (frozen == gc.get_freeze_count() and frozen >= len(held)):
        sys.exit(2)
    # what the collector walks now is what came after: none of the heap above
    sys.exit(0 if len(gc.get_objects()) < tracked - len(held) else 3)
""")


def run(mode: str, freeze: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_GC_FREEZE"}
    if freeze is not None:
        env["PDSERVE_GC_FREEZE"] = freeze
    return subprocess.run([sys.executable, "-c", CHILD, mode], timeout=120, cwd=ROOT,
                          env=env).returncode


def test_the_start_up_heap_is_frozen_and_a_collection_skips_it():
    assert run("on", None) == 0


def test_pdserve_gc_freeze_0_leaves_the_heap():
    assert run("off", "0") == 0
