"""Scratch directories of workers that died without cleaning up are swept at start; a
live owner's (its flock held, here by another process), a fresh one and anything not
ours stay."""

import os
import time

from pdserve.worker import SCRATCH_LOCK, SCRATCH_PREFIX, hold_scratch_dir, sweep_scratch_dirs

OLD = time.time() - 3600


def _dir(root, name, lock=True, old=True):
    d = root / name
    d.mkdir()
    (d / "ucx.log").write_text("x")
    if lock:
        (d / SCRATCH_LOCK).touch()
    if old:
        os.utime(d, (OLD, OLD))
    return d


def test_sweep_removes_only_dead_owners_dirs(tmp_path):
    live = _dir(tmp_path, f"{SCRATCH_PREFIX}1-live")
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()
    holder = os.fork()     # another process holds the owner lock, as a worker does
    if holder == 0:
        try:
            os.close(go_w)
            os.close(held_r)
            hold_scratch_dir(str(live))
            os.write(held_w, b"1")
            os.read(go_r, 1)        # until the test lets go (or dies: EOF)
        finally:
            os._exit(0)
    os.close(held_w)
    os.close(go_r)
    try:
        assert os.read(held_r, 1) == b"1"
        os.utime(live, (OLD, OLD))
        dead = _dir(tmp_path, f"{SCRATCH_PREFIX}2-dead")            # lock file, nobody holds it
        legacy = _dir(tmp_path, f"{SCRATCH_PREFIX}abc", lock=False)  # an older pdserve's
        fresh = _dir(tmp_path, f"{SCRATCH_PREFIX}3-new", lock=False, old=False)
        other = _dir(tmp_path, "not-ours", lock=False)
        gone = sweep_scratch_dirs(str(tmp_path))
        assert sorted(gone) == sorted([str(dead), str(legacy)])
        assert live.exists() and fresh.exists() and other.exists()
        assert sweep_scratch_dirs(str(tmp_path)) == []
    finally:
        os.close(go_w)
        os.close(held_r)
        os.waitpid(holder, 0)
    # the holder is gone: its lock went with it
    assert sweep_scratch_dirs(str(tmp_path)) == [str(live)]


def test_own_lock_is_exclusive(tmp_path):
    fd = hold_scratch_dir(str(tmp_path))
    try:
        os.utime(tmp_path, (OLD, OLD))
        import fcntl
        other = os.open(tmp_path / SCRATCH_LOCK, os.O_RDWR)
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("a second lock was granted")
            except BlockingIOError:
                pass
        finally:
            os.close(other)
    finally:
        os.close(fd)


def test_sweep_of_a_missing_directory_is_empty(tmp_path):
    assert sweep_scratch_dirs(str(tmp_path / "absent")) == []
