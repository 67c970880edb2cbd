"""Transfer states and producer-side leases. Pure: time is passed in."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TransferState(enum.IntEnum):
    """Ordered: a transfer only ever moves up, except to FAILED, which is terminal."""
    FAILED = 0
    PENDING = 1        # known, not started
    ACQUIRING = 2      # pinning the remote lease / handshake
    TRANSFERRING = 3   # UCX READ posted
    DONE = 4

    @property
    def terminal(self) -> bool:
        return self in (TransferState.FAILED, TransferState.DONE)


class TransitionError(ValueError):
    pass


def advance(cur: TransferState, new: TransferState) -> TransferState:
    """Monotonic update: never backwards, never out of a terminal state."""
    if cur.terminal:
        raise TransitionError(f"{cur.name} is terminal; cannot move to {new.name}")
    if new != TransferState.FAILED and new < cur:
        raise TransitionError(f"{cur.name} -> {new.name} goes backwards")
    return new


@dataclass
class Lease:
    transfer_id: str
    deadline: float
    num_blocks: int


@dataclass
class LeaseTable:
    """Blocks a producer holds for consumers, each until released or expired.

    `take_finished(now)` returns the ids whose blocks may be freed now (released
    or expired), exactly once each.

    A Release may arrive before its lease exists: the engine adds a finished request's
    lease on its next step, while the worker that got the output can release at once
    (a request that ended on its first token). Such a release is remembered for
    `early_ttl_s`, and the lease is freed as soon as it is added, never left to expire.
    """
    leases: dict[str, Lease] = field(default_factory=dict)
    _released: set[str] = field(default_factory=set)
    _early: dict[str, float] = field(default_factory=dict)   # released before added
    early_ttl_s: float = 120.0
    expired_total: int = 0
    released_total: int = 0

    def add(self, transfer_id: str, now: float, lease_s: float, num_blocks: int) -> None:
        self.leases[transfer_id] = Lease(transfer_id, now + lease_s, num_blocks)
        if self._early.pop(transfer_id, None) is not None:
            self._released.add(transfer_id)

    def acquire(self, ids: list[str], now: float, extend_s: float) -> tuple[list[str], list[str]]:
        held, missing = [], []
        for tid in ids:
            lease = self.leases.get(tid)
            if lease is None or tid in self._released or lease.deadline <= now:
                missing.append(tid)
            else:
                lease.deadline = max(lease.deadline, now + extend_s)
                held.append(tid)
        return held, missing

    def release(self, ids: list[str], now: float = 0.0) -> tuple[list[str], list[str]]:
        """-> (ids that will be freed, ids not held now). An id not known yet is
        remembered: if its lease is added later, it is freed at once."""
        held, missing = [], []
        for tid in ids:
            if tid in self.leases and tid not in self._released:
                self._released.add(tid)
                held.append(tid)
            else:
                if tid not in self.leases:
                    self._early[tid] = now
                missing.append(tid)
        return held, missing

    def take_finished(self, now: float) -> tuple[set[str], set[str]]:
        """-> (released ids, expired ids); both are removed from the table."""
        released = {t for t in self._released if t in self.leases}
        expired = {t for t, lease in self.leases.items()
                   if t not in released and lease.deadline <= now}
        for t in released | expired:
            del self.leases[t]
        self._released.clear()
        for t in [t for t, at in self._early.items() if now - at > self.early_ttl_s]:
            del self._early[t]
        self.released_total += len(released)
        self.expired_total += len(expired)
        return released, expired

    def __len__(self) -> int:
        return len(self.leases)
