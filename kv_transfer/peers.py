"""Which peer engines to forget. Pure: no I/O, time passed in.

A KV agent learns a peer engine (its NIXL metadata, registered regions and prepared
descriptor lists) on the first transfer with it and keeps it for the next. Peers come and
go: a restarted engine comes back under a new engine id, an autoscaled pool grows and
shrinks. Without a bound the maps would grow with every engine the cluster ever had.

`PeerLRU` keeps the most recently used peers up to `max_peers`. When a new peer would
exceed it, the least recently used are forgotten, but only those idle for `idle_s` (no
transfer can still be using them: longer than a transfer's timeout and a lease); a map
full of busy peers grows past the bound rather than break a transfer in flight.
"""

from __future__ import annotations

from collections import OrderedDict


class PeerLRU:
    def __init__(self, max_peers: int = 64, idle_s: float = 600.0) -> None:
        self.max_peers = max_peers
        self.idle_s = idle_s
        self._used: OrderedDict[str, float] = OrderedDict()   # least recently used first

    def __len__(self) -> int:
        return len(self._used)

    def __contains__(self, eid: str) -> bool:
        return eid in self._used

    def touch(self, eid: str, now: float) -> list[str]:
        """`eid` is used now. Returns the peers to forget to keep within the bound."""
        self._used.pop(eid, None)
        self._used[eid] = now
        evict = []
        for old, t in self._used.items():
            if len(self._used) - len(evict) <= self.max_peers:
                break
            if old != eid and now - t >= self.idle_s:
                evict.append(old)
        for old in evict:
            del self._used[old]
        return evict

    def forget(self, eid: str) -> None:
        self._used.pop(eid, None)
