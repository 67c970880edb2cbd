"""Transfer state machine and producer lease table: monotonic, expiring, exactly-once."""

import pytest

from kv_transfer.state import LeaseTable, TransferState as S, TransitionError, advance


def test_states_only_move_forward():
    s = S.PENDING
    for nxt in (S.ACQUIRING, S.TRANSFERRING, S.DONE):
        s = advance(s, nxt)
    assert s == S.DONE
    with pytest.raises(TransitionError):
        advance(S.TRANSFERRING, S.ACQUIRING)


def test_failed_is_reachable_from_any_live_state_and_terminal():
    for s in (S.PENDING, S.ACQUIRING, S.TRANSFERRING):
        assert advance(s, S.FAILED) == S.FAILED
    for t in (S.FAILED, S.DONE):
        with pytest.raises(TransitionError):
            advance(t, S.DONE)


def test_release_frees_exactly_once():
    t = LeaseTable()
    t.add("a", now=0, lease_s=10, num_blocks=3)
    assert t.release(["a"]) == (["a"], [])
    assert t.release(["a"]) == ([], ["a"])        # double release is harmless
    assert t.take_finished(now=1) == ({"a"}, set())
    assert t.take_finished(now=2) == (set(), set())
    assert len(t) == 0 and t.released_total == 1


def test_expiry_on_owner_clock():
    t = LeaseTable()
    t.add("a", now=0, lease_s=5, num_blocks=1)
    t.add("b", now=0, lease_s=50, num_blocks=1)
    assert t.take_finished(now=4.9) == (set(), set())
    assert t.take_finished(now=5.0) == (set(), {"a"})
    assert t.expired_total == 1 and len(t) == 1


def test_acquire_extends_but_never_revives():
    t = LeaseTable()
    t.add("a", now=0, lease_s=5, num_blocks=1)
    assert t.acquire(["a"], now=4, extend_s=30) == (["a"], [])
    assert t.take_finished(now=20) == (set(), set())      # extended to 34
    assert t.take_finished(now=34) == (set(), {"a"})
    assert t.acquire(["a"], now=35, extend_s=30) == ([], ["a"])   # gone: consumer must not read


def test_acquire_after_deadline_is_refused_even_before_sweep():
    t = LeaseTable()
    t.add("a", now=0, lease_s=5, num_blocks=1)
    assert t.acquire(["a"], now=6, extend_s=30) == ([], ["a"])
    assert t.acquire(["zzz"], now=0, extend_s=30) == ([], ["zzz"])


def test_released_lease_cannot_be_acquired():
    t = LeaseTable()
    t.add("a", now=0, lease_s=5, num_blocks=1)
    t.release(["a"])
    assert t.acquire(["a"], now=1, extend_s=30) == ([], ["a"])


def test_a_release_that_beats_its_lease_frees_it_when_added():
    """The engine adds a finished request's lease on its next step; the worker that got the
    output may release first. The blocks must be freed then, not left to expire."""
    t = LeaseTable(early_ttl_s=60)
    assert t.release(["a"], now=0) == ([], ["a"])
    t.add("a", now=0.5, lease_s=30, num_blocks=2)
    assert t.take_finished(now=0.6) == ({"a"}, set())
    assert len(t) == 0 and t.expired_total == 0
    # an early release is forgotten after its TTL (ids are never reused)
    t.release(["b"], now=0)
    t.take_finished(now=61)
    t.add("b", now=61, lease_s=30, num_blocks=1)
    assert t.take_finished(now=62) == (set(), set()) and len(t) == 1
