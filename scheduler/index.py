"""Prefix index: which worker holds which cached KV block. Pure: no I/O, no clock.

Keys are our chained block hashes (pdserve.kvhash), so a hit on block i implies the
worker holds blocks 0..i (prefix property) unless one was evicted out of order; the
lookup therefore walks from block 0 and stops each worker at its first miss.

Each worker owns a bit; a block maps to the bit-set of the workers holding it. A lookup
is one dict probe and two big-int ANDs per prompt block, whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IndexStats:
    blocks: int = 0               # distinct block hashes indexed
    entries: int = 0              # (block, worker) pairs
    events: int = 0               # block events applied (stored + removed)
    lookups: int = 0
    lookup_blocks: int = 0        # prompt blocks looked up
    hit_blocks: int = 0           # of those, found on the chosen/best worker


class PrefixIndex:
    def __init__(self) -> None:
        self._mask: dict[int, int] = {}          # block hash -> bit-set of worker slots
        self._held: dict[str, set[int]] = {}     # worker -> hashes it holds
        self._slot: dict[str, int] = {}
        self._free_slots: list[int] = []
        self._by_slot: dict[int, str] = {}
        self.events = 0
        self.lookups = 0
        self.lookup_blocks = 0
        self.hit_blocks = 0

    # ------------------------------------------------------------ workers
    def _bit(self, worker: str) -> int:
        slot = self._slot.get(worker)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slot)
            self._slot[worker] = slot
            self._by_slot[slot] = worker
            self._held[worker] = set()
        return 1 << slot

    def remove_worker(self, worker: str) -> int:
        """Forget everything a worker holds (it died, left, or is about to resync)."""
        held = self._held.pop(worker, None)
        if held is None:
            return 0
        slot = self._slot.pop(worker)
        del self._by_slot[slot]
        self._free_slots.append(slot)
        keep = ~(1 << slot)
        m = self._mask
        for h in held:
            v = m[h] & keep
            if v:
                m[h] = v
            else:
                del m[h]
        return len(held)

    def clear_worker(self, worker: str) -> None:
        """AllBlocksCleared: the worker keeps its slot, loses its blocks."""
        if worker in self._held:
            self.remove_worker(worker)
            self._bit(worker)

    # ------------------------------------------------------------ events
    def stored(self, worker: str, hashes) -> None:
        bit = self._bit(worker)
        held = self._held[worker]
        m = self._mask
        for h in hashes:
            if h not in held:
                held.add(h)
                m[h] = m.get(h, 0) | bit
        self.events += len(hashes)

    def removed(self, worker: str, hashes) -> None:
        held = self._held.get(worker)
        self.events += len(hashes)
        if held is None:
            return
        keep = ~self._bit(worker)
        m = self._mask
        for h in hashes:
            if h in held:
                held.discard(h)
                v = m[h] & keep
                if v:
                    m[h] = v
                else:
                    del m[h]

    def replace(self, worker: str, hashes) -> None:
        """A worker's full snapshot (on connect/resync): exactly these blocks."""
        self.clear_worker(worker)
        self.stored(worker, hashes)

    # ------------------------------------------------------------ lookup
    def match(self, hashes: list[int], workers) -> dict[str, int]:
        """Per candidate worker: how many leading blocks of `hashes` it holds."""
        out = dict.fromkeys(workers, 0)
        active = 0
        for w in out:
            slot = self._slot.get(w)
            if slot is not None:
                active |= 1 << slot
        m = self._mask
        depth = 0
        for h in hashes:
            if not active:
                break
            hit = m.get(h, 0) & active
            dropped = active ^ hit
            if dropped:
                self._assign(out, dropped, depth)
            active = hit
            depth += 1
        if active:
            self._assign(out, active, depth)
        self.lookups += 1
        self.lookup_blocks += len(hashes)
        return out

    def _assign(self, out: dict[str, int], bits: int, depth: int) -> None:
        while bits:
            low = bits & -bits
            out[self._by_slot[low.bit_length() - 1]] = depth
            bits ^= low

    def held_by(self, worker: str) -> int:
        return len(self._held.get(worker, ()))

    def workers(self) -> list[str]:
        return list(self._held)

    def stats(self) -> IndexStats:
        return IndexStats(blocks=len(self._mask),
                          entries=sum(len(s) for s in self._held.values()),
                          events=self.events, lookups=self.lookups,
                          lookup_blocks=self.lookup_blocks, hit_blocks=self.hit_blocks)
