"""Worker registry and placement. Pure: no I/O, time passed in.

Selection never mutates; `book()` records the routing in one place (the load a
worker will see before its next heartbeat reports it) and `unbook()` rolls it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Load:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_leases_held: int = 0


@dataclass
class Worker:
    worker_id: str
    role: str                 # "prefill" | "decode"
    address: str
    agent_address: str
    model: str
    compat_hash: str
    last_seen: float
    load: Load = field(default_factory=Load)
    inflight: int = 0         # routed since the last heartbeat
    metrics_address: str = ""

    def score(self) -> float:
        """Least-loaded: queued work first, KV pressure as the tie-breaker."""
        return self.load.running + self.load.waiting + self.inflight + self.load.kv_usage


class Registry:
    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.timeout = heartbeat_timeout_s
        self.workers: dict[str, Worker] = {}

    def register(self, w: Worker) -> None:
        self.workers[w.worker_id] = w

    def heartbeat(self, worker_id: str, load: Load, now: float) -> bool:
        w = self.workers.get(worker_id)
        if w is None:
            return False
        w.load, w.last_seen, w.inflight = load, now, 0
        return True

    def remove(self, worker_id: str) -> Worker | None:
        return self.workers.pop(worker_id, None)

    def expire(self, now: float) -> list[Worker]:
        dead = [w for w in self.workers.values() if now - w.last_seen > self.timeout]
        for w in dead:
            del self.workers[w.worker_id]
        return dead

    def live(self, role: str, model: str | None = None) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.role == role and (not model or w.model == model)]


class NoPlacement(Exception):
    pass


def select(reg: Registry, model: str, token_ids: list[int]) -> tuple[Worker, Worker]:
    """Pick (prefill, decode): least loaded, and the decode worker must be KV-compatible."""
    prefills = sorted(reg.live("prefill", model), key=lambda w: (w.score(), w.worker_id))
    if not prefills:
        raise NoPlacement(f"no prefill worker serves model {model!r}")
    decodes = reg.live("decode", model)
    if not decodes:
        raise NoPlacement(f"no decode worker serves model {model!r}")
    for p in prefills:
        compatible = [d for d in decodes if d.compat_hash == p.compat_hash]
        if compatible:
            return p, min(compatible, key=lambda w: (w.score(), w.worker_id))
    raise NoPlacement(f"no decode worker is KV-compatible with a prefill worker for {model!r}")


def book(p: Worker, d: Worker) -> None:
    p.inflight += 1
    d.inflight += 1


def unbook(p: Worker, d: Worker) -> None:
    p.inflight = max(0, p.inflight - 1)
    d.inflight = max(0, d.inflight - 1)
