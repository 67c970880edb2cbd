"""Push mode, the pure parts: which blocks a prefill step writes, and the producer's table of
offers (consumer blocks waiting for KV) with its state machine. No I/O, time is an input.

Push: the decode engine allocates the prompt's blocks first and offers them to the prefill
engine (KVAgent.Offer). The prefill engine WRITEs each layer's blocks into them as soon as
the layer is computed (`save_kv_layer`), so the transfer overlaps the remaining layers'
compute; at the end of the step (`wait_for_save`) it waits for that step's WRITEs. When
every block of every layer has landed, it notifies the consumer (a NIXL notification).

An offer's states, monotonic:

    OPEN -> DONE                 every WRITE landed, the consumer was notified
    OPEN -> FAILED               a WRITE failed or the offer expired before it was written
    OPEN -> CANCELLED            the consumer gave up (never written to afterwards)

A consumer frees its blocks only after DONE, FAILED (notified) or CANCELLED; a Cancel that
finds WRITEs in flight answers "busy" and the consumer asks again. No WRITE is posted
after the offer's deadline (the producer's own clock).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OfferState(enum.IntEnum):
    OPEN = 0
    DONE = 1
    FAILED = 2
    CANCELLED = 3


@dataclass
class Offer:
    transfer_id: str
    peer: str                      # consumer's NIXL agent name
    engine_id: str                 # consumer's engine id (its regions are keyed by it)
    blocks: list[int]              # consumer block of each logical block 0..n-1
    skip: int                      # logical blocks cached at the consumer: never written
    deadline: float
    state: OfferState = OfferState.OPEN
    in_flight: int = 0             # WRITEs posted and not finished
    written_upto: int = 0          # prompt tokens whose KV landed in every layer
    reason: str = ""


def chunk_blocks(start: int, end: int, block_size: int, skip: int, n: int) -> range:
    """Logical blocks that tokens [start, end) touch, minus the consumer's cached ones,
    within the n offered. A partial last block is written again by the next chunk."""
    if end <= start:
        return range(0)
    first = max(skip, start // block_size)
    last = min(n, -(-end // block_size))
    return range(first, max(first, last))


@dataclass
class OfferTable:
    offers: dict[str, Offer] = field(default_factory=dict)
    expired_total: int = 0

    def add(self, offer: Offer) -> bool:
        """False if an offer for this transfer exists already (a duplicate is refused)."""
        if offer.transfer_id in self.offers:
            return False
        self.offers[offer.transfer_id] = offer
        return True

    def writable(self, tid: str, now: float) -> Offer | None:
        """The offer if a WRITE may be posted now (OPEN, before its deadline); an OPEN
        offer past its deadline turns FAILED here."""
        o = self.offers.get(tid)
        if o is None or o.state != OfferState.OPEN:
            return None
        if now >= o.deadline:
            o.state, o.reason = OfferState.FAILED, "offer_expired"
            self.expired_total += 1
            return None
        return o

    def begin(self, o: Offer) -> None:
        o.in_flight += 1

    def end(self, o: Offer, ok: bool, reason: str = "") -> None:
        if o.in_flight <= 0:
            raise ValueError(f"{o.transfer_id}: WRITE ended that never began")
        o.in_flight -= 1
        if not ok and o.state == OfferState.OPEN:
            o.state, o.reason = OfferState.FAILED, reason or "write_failed"

    def finish(self, o: Offer) -> bool:
        """Every block landed: DONE (True) unless it failed or was cancelled meanwhile."""
        if o.in_flight:
            raise ValueError(f"{o.transfer_id}: finished with {o.in_flight} WRITEs in flight")
        if o.state != OfferState.OPEN:
            return False
        o.state = OfferState.DONE
        return True

    def cancel(self, ids: list[str], now: float) -> tuple[list[str], list[str]]:
        """-> (cancelled: never written again, busy: WRITEs in flight, ask again). An
        unknown id is cancelled too: a late offer for it will be refused."""
        cancelled, busy = [], []
        for tid in ids:
            o = self.offers.get(tid)
            if o is None:
                self.offers[tid] = Offer(tid, "", "", [], 0, now, OfferState.CANCELLED,
                                         reason="cancelled")
                cancelled.append(tid)
            elif o.in_flight:
                busy.append(tid)
            else:
                if o.state == OfferState.OPEN:
                    o.state, o.reason = OfferState.CANCELLED, "cancelled"
                cancelled.append(tid)
        return cancelled, busy

    def drop(self, tid: str) -> None:
        o = self.offers.get(tid)
        if o is not None and o.in_flight == 0 and o.state != OfferState.OPEN:
            del self.offers[tid]

    def sweep(self, now: float, keep_s: float = 120.0) -> list[Offer]:
        """OPEN offers past their deadline turn FAILED (returned, so the consumer can be
        told); finished ones older than keep_s past their deadline are forgotten."""
        failed = []
        for tid, o in list(self.offers.items()):
            if o.state == OfferState.OPEN and now >= o.deadline and not o.in_flight:
                o.state, o.reason = OfferState.FAILED, "offer_expired"
                self.expired_total += 1
                failed.append(o)
            elif o.state != OfferState.OPEN and not o.in_flight and now > o.deadline + keep_s:
                del self.offers[tid]
        return failed

    def __len__(self) -> int:
        return sum(1 for o in self.offers.values() if o.state == OfferState.OPEN)
