"""Registry, least-loaded selection, booking: pure, no network."""

import pytest

from scheduler.state import Load, NoPlacement, Registry, Worker, book, select, unbook


def W(wid, role, model="m", compat="h", now=0.0, **load):
    return Worker(wid, role, f"addr-{wid}", f"agent-{wid}", model, compat, now, Load(**load))


def reg(*workers, timeout=5.0):
    r = Registry(timeout)
    for w in workers:
        r.register(w)
    return r


def test_least_loaded_pair():
    r = reg(W("p1", "prefill", running=3), W("p2", "prefill", running=1),
            W("d1", "decode", running=0), W("d2", "decode", running=4))
    p, d = select(r, "m", [1, 2, 3])
    assert (p.worker_id, d.worker_id) == ("p2", "d1")


def test_select_does_not_mutate_and_booking_spreads_load():
    r = reg(W("p1", "prefill"), W("p2", "prefill"), W("d1", "decode"), W("d2", "decode"))
    first = select(r, "m", [])
    assert select(r, "m", []) == first          # selection alone changes nothing
    book(*first)
    second = select(r, "m", [])
    assert {first[0].worker_id, second[0].worker_id} == {"p1", "p2"}
    assert {first[1].worker_id, second[1].worker_id} == {"d1", "d2"}
    unbook(*first)
    assert select(r, "m", []) == first          # rollback restores the choice


def test_heartbeat_resets_booking_and_unknown_worker_is_reported():
    r = reg(W("p1", "prefill"), W("d1", "decode"))
    book(*select(r, "m", []))
    assert r.workers["p1"].inflight == 1
    assert r.heartbeat("p1", Load(running=1), now=1.0)
    assert r.workers["p1"].inflight == 0 and r.workers["p1"].load.running == 1
    assert not r.heartbeat("ghost", Load(), now=1.0)


def test_expiry_drops_silent_workers_only():
    r = reg(W("p1", "prefill", now=0.0), W("d1", "decode", now=0.0), timeout=5.0)
    r.heartbeat("d1", Load(), now=4.0)
    dead = r.expire(now=6.0)
    assert [w.worker_id for w in dead] == ["p1"]
    with pytest.raises(NoPlacement, match="no prefill"):
        select(r, "m", [])


def test_model_and_kv_compatibility_filter():
    r = reg(W("p1", "prefill", compat="A"), W("d1", "decode", compat="B"))
    with pytest.raises(NoPlacement, match="KV-compatible"):
        select(r, "m", [])
    r.register(W("d2", "decode", compat="A"))
    assert select(r, "m", [])[1].worker_id == "d2"
    with pytest.raises(NoPlacement, match="no prefill"):
        select(r, "other-model", [])
