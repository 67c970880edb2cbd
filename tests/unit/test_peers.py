"""The bound on the peer engines a KV agent remembers (kv_transfer/peers.py)."""

from kv_transfer.peers import PeerLRU


def test_least_recently_used_idle_peers_are_forgotten_past_the_bound():
    lru = PeerLRU(max_peers=3, idle_s=10)
    assert [lru.touch(e, t) for e, t in (("a", 0), ("b", 1), ("c", 2))] == [[], [], []]
    assert lru.touch("a", 20) == []              # a is used again: b is now the oldest
    assert lru.touch("d", 21) == ["b"]
    assert len(lru) == 3 and "b" not in lru and "a" in lru


def test_busy_peers_are_kept_even_past_the_bound():
    lru = PeerLRU(max_peers=2, idle_s=10)
    lru.touch("a", 0)
    lru.touch("b", 5)
    assert lru.touch("c", 6) == []               # a and b may have transfers in flight
    assert len(lru) == 3
    assert lru.touch("d", 14) == ["a"]           # a is idle now; b is not yet
    assert lru.touch("e", 30) == ["b", "c"]
    assert list(lru._used) == ["d", "e"]


def test_a_thousand_restarted_peers_leave_the_map_bounded():
    lru = PeerLRU(max_peers=8, idle_s=1)
    gone = []
    for i in range(1000):
        gone += lru.touch(f"engine-{i}", float(i))
        assert len(lru) <= 8
    assert len(gone) == 992 and gone[0] == "engine-0"


def test_forget_drops_a_peer():
    lru = PeerLRU(max_peers=2, idle_s=0)
    lru.touch("a", 0)
    lru.forget("a")
    lru.forget("a")
    assert len(lru) == 0
