"""Cores lent between engines (pdserve/core_share.py): which cores a host shares, and the
locks two engines take on real lock files, without engines."""

import os
import threading

import pytest

from pdserve.core_share import (CoreShare, handing_over, parse_cores, shared_cores,
                                worth_borrowing)
from tests.locks import held


def test_parse_cores():
    assert parse_cores("0") == {0}
    assert parse_cores("0,2-3") == {0, 2, 3}
    assert parse_cores("") is None
    assert parse_cores("0|1") is None          # per-rank binding: the ranks keep theirs
    assert parse_cores("auto") is None


def test_shared_cores_only_when_asked_and_disjoint(monkeypatch):
    monkeypatch.delenv("PDSERVE_CORE_SHARE", raising=False)
    assert shared_cores(["0", "1"], gpus=False, autoscale=False) == ""
    monkeypatch.setenv("PDSERVE_CORE_SHARE", "1")
    assert shared_cores(["0", "1"], gpus=False, autoscale=False) == "0,1"
    assert shared_cores(["2-3", "0,1"], gpus=False, autoscale=False) == "0,1,2,3"
    assert shared_cores(["0", "0"], gpus=False, autoscale=False) == ""    # one core, two
    assert shared_cores(["0"], gpus=False, autoscale=False) == ""
    assert shared_cores(["0|1", "2"], gpus=False, autoscale=False) == ""
    assert shared_cores(["0", "1"], gpus=True, autoscale=False) == ""
    assert shared_cores(["0", "1"], gpus=False, autoscale=True) == ""


def test_worth_borrowing():
    assert worth_borrowing(256, 256) and not worth_borrowing(255, 256)
    assert not worth_borrowing(4096, 0)


class Engine:
    """One engine's side with its thread count and affinity recorded."""

    def __init__(self, folder, home, cores=(0, 1), min_tokens=256):
        self.calls = []
        self.share = CoreShare(str(folder), cores, frozenset(home),
                               lambda n: self.calls.append(("threads", n)),
                               lambda cpus: self.calls.append(("cpus", set(cpus))),
                               min_tokens)


def locked(folder, core) -> bool:
    """Whether some open file holds core's lock (a probe of our own)."""
    return held(os.path.join(folder, f"core-{core}.lock"))


def test_a_busy_engines_core_is_not_borrowed(tmp_path):
    p, d = Engine(tmp_path, {0}), Engine(tmp_path, {1})
    p.share.hold_home()
    d.share.hold_home()
    assert p.share.borrow(1024) == 1
    assert p.calls == [] and not p.share.borrowed
    d.share.release_home()                  # the decode engine has nothing left to do
    assert p.share.borrow(1024) == 2
    assert p.calls == [("cpus", {0, 1}), ("threads", 2)]
    assert p.share.borrow(1024) == 2        # a second call in the step takes nothing more
    p.share.give_back()
    assert p.calls[-2:] == [("threads", 1), ("cpus", {0})]
    assert locked(tmp_path, 0) and not locked(tmp_path, 1)


def test_small_steps_do_not_borrow(tmp_path):
    p, _ = Engine(tmp_path, {0}, min_tokens=256), Engine(tmp_path, {1})
    p.share.hold_home()
    assert p.share.borrow(255) == 1 and p.calls == []
    assert not locked(tmp_path, 1)


def test_an_engine_waits_for_the_step_that_borrowed_its_core(tmp_path):
    p, d = Engine(tmp_path, {0}), Engine(tmp_path, {1})
    p.share.hold_home()
    assert p.share.borrow(512) == 2
    got = threading.Event()

    def start_a_step():
        d.share.hold_home()
        got.set()

    t = threading.Thread(target=start_a_step, daemon=True)
    t.start()
    assert locked(tmp_path, 1)              # held by the borrowing step, not yet ours
    p.share.give_back()
    assert got.wait(10), "the decode engine never got its core back"
    t.join(10)
    assert d.share.holding
    # and now the prefill engine's next step computes alone
    assert p.share.borrow(512) == 1 and p.calls[-1] == ("cpus", {0})


def test_every_lock_is_free_once_both_engines_are_idle(tmp_path):
    p, d = Engine(tmp_path, {0}), Engine(tmp_path, {1})
    for e in (p, d):
        e.share.hold_home()
        assert e.share.borrow(300) == 2
        e.share.give_back()
        e.share.release_home()
        assert not locked(tmp_path, 0) and not locked(tmp_path, 1)
    d.share.release_home()                  # twice: nothing
    assert not locked(tmp_path, 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_engine_opens_its_own_locks(tmp_path):
    """Locks belong to open files, which a fork shares: the child must not inherit a
    parent's hold (the parent's open file would keep it after the child died)."""
    e = Engine(tmp_path, {0})
    e.share.hold_home()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                            # the child: an engine core forked later
        try:
            fd_before = dict(e.share._fds)
            e.share._fd(0)
            os.write(w, b"1" if e.share._fds != fd_before and not e.share.holding else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_a_prefill_engine_handing_kv_over_does_not_borrow():
    assert handing_over(3, 1, 1)          # one finished, its KV kept for the decode engine
    assert not handing_over(2, 1, 1)
    assert not handing_over(0, 0, 0)


def test_cores_taken_before_a_step_that_turns_out_small_go_back_untouched(tmp_path):
    """With a cap on lent steps the cores are taken before scheduling; a step of fewer
    tokens than it takes to gain gives them back without moving a thread."""
    p, _ = Engine(tmp_path, {0}), Engine(tmp_path, {1})
    p.share.hold_home()
    assert p.share.take() and locked(tmp_path, 1)
    assert p.share.borrow(100) == 1
    assert p.calls == [] and not locked(tmp_path, 1)
    assert p.share.take() and p.share.borrow(600) == 2
    assert p.calls == [("cpus", {0, 1}), ("threads", 2)]
    p.share.give_back()
    assert not locked(tmp_path, 1) and p.calls[-1] == ("cpus", {0})
