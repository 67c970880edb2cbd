"""A pdserve process, and an engine core forked from it, that dies in native code leaves
its Python stacks in its stderr (the launcher's log): pdserve.procs.crash_tracebacks."""

import os
import subprocess
import sys

CRASH = """
import ctypes, os, sys
from pdserve.procs import crash_tracebacks
crash_tracebacks()
assert os.environ["PYTHONFAULTHANDLER"] == "1"      # and spawned children get it too
if {fork}:
    pid = os.fork()
    if pid:
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
def deep_in_native_code():
    ctypes.string_at(0)                             # SIGSEGV
deep_in_native_code()
"""


def _run(fork: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    return subprocess.run([sys.executable, "-c", CRASH.format(fork=fork)], capture_output=True,
                          text=True, timeout=60, env=env)


def test_a_crash_in_native_code_leaves_the_python_stack():
    r = _run(fork=False)
    assert r.returncode != 0
    assert "Fatal Python error: Segmentation fault" in r.stderr, r.stderr
    assert "deep_in_native_code" in r.stderr


def test_a_forked_child_keeps_it():
    r = _run(fork=True)
    assert r.returncode != 0          # the child's signal, as its exit code
    assert "Fatal Python error: Segmentation fault" in r.stderr, r.stderr
    assert "deep_in_native_code" in r.stderr
