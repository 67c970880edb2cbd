"""Scratch directories of workers that died without cleaning up are swept at start."""

import os
import subprocess
import sys

from pdserve.worker import SCRATCH_PREFIX, sweep_scratch_dirs


def test_sweep_removes_only_dead_owners_dirs(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-abc123"
    stale = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}-x_y9"
    other = tmp_path / "pdserve-agent-notapid"
    for d in (mine, stale, other):
        d.mkdir()
        (d / "ucx.log").write_text("x")
    gone = sweep_scratch_dirs(str(tmp_path))
    assert gone == [str(stale)]
    assert not stale.exists()
    assert mine.exists() and other.exists()
    assert sweep_scratch_dirs(str(tmp_path)) == []


def test_sweep_of_a_missing_directory_is_empty(tmp_path):
    assert sweep_scratch_dirs(str(tmp_path / "absent")) == []
