"""An in-process transfer backend with NixlBackend's interface: memcpy between registered
regions of engines in the same process, with fault injection. For fast tests of the
connector's logic (tests/unit/test_connector_lifecycle.py); the KV moves between real
processes over NIXL/UCX everywhere else.

Engines find each other by name in a process-wide registry, as NIXL agents do through
their metadata. A transfer copies at once unless a fault says otherwise:

    Faults.drop      transfers never complete (the waiter times out)
    Faults.delay_s   transfers complete this long after they were posted
    Faults.corrupt   the first byte of every block copied is flipped after the copy
    Faults.dead      the engine is gone: transfers and notifications to it fail

Selected with `backend: loopback` in kv_connector_extra_config; never by pdserve's CLI.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


class LoopbackError(RuntimeError):
    pass


@dataclass
class Faults:
    drop: bool = False
    delay_s: float = 0.0
    corrupt: bool = False
    dead: bool = False


_REGISTRY: dict[str, "LoopbackBackend"] = {}
_LOCK = threading.Lock()


class _Xfer:
    __slots__ = ("ready_at", "dropped", "error")

    def __init__(self, ready_at: float, dropped: bool, error: str = "") -> None:
        self.ready_at, self.dropped, self.error = ready_at, dropped, error


class LoopbackBackend:
    def __init__(self, name: str, mem_type: str = "DRAM", progress_delay_us: int = 0,
                 log_dir: str | None = None, err_mode: str = "auto") -> None:
        self.name = name
        self.mem_type = mem_type
        self.faults = Faults()
        self._spans: list[tuple[int, int]] = []
        self._remotes: dict[str, str] = {}   # engine id -> peer name (as NixlBackend)
        self._local_blocks: np.ndarray | None = None
        self._remote_blocks: dict[str, np.ndarray] = {}
        self._notifs: list[str] = []
        self._nlock = threading.Lock()
        self.transfers = 0                    # posted, for the tests
        with _LOCK:
            _REGISTRY[name] = self

    # -- memory
    def register(self, spans: Sequence[tuple[int, int]], device_id: int = 0) -> None:
        self._spans = [(int(a), int(n)) for a, n in spans]

    def register_extra(self, spans: Sequence[tuple[int, int]], device_id: int = 0):
        extra = [(int(a), int(n)) for a, n in spans]
        self._spans += extra
        return extra

    def deregister_extra(self, handle) -> None:
        for s in handle:
            if s in self._spans:
                self._spans.remove(s)

    @property
    def metadata(self) -> bytes:
        if not self._spans:
            raise LoopbackError("memory not registered yet")
        return self.name.encode()

    def _inside(self, addr: int, length: int) -> bool:
        return any(a <= addr and addr + length <= a + n for a, n in self._spans)

    # -- peers
    def ensure_remote(self, engine_id: str, metadata: bytes) -> str:
        name = metadata.decode()
        with _LOCK:
            peer = _REGISTRY.get(name)
        if peer is None or peer.faults.dead:
            raise LoopbackError(f"remote agent {name} disconnected")
        self._remotes[engine_id] = name
        return name

    def has_remote(self, engine_id: str) -> bool:
        return engine_id in self._remotes

    def forget_remote(self, engine_id: str) -> None:
        self._remotes.pop(engine_id, None)
        self._remote_blocks.pop(engine_id, None)

    def _peer(self, name: str) -> "LoopbackBackend":
        with _LOCK:
            peer = _REGISTRY.get(name)
        if peer is None or peer.faults.dead or self.faults.dead:
            raise LoopbackError(f"remote agent {name} disconnected")
        return peer

    # -- transfers
    def prep_blocks(self, descs, engine_id: str | None = None) -> None:
        arr = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
        if engine_id is None:
            self._local_blocks = arr
        else:
            self._remote_blocks[engine_id] = arr

    def post_blocks(self, op: str, engine_id: str, local_idx, remote_idx):
        if self._local_blocks is None or engine_id not in self._remote_blocks:
            raise LoopbackError(f"no prepared block lists for engine {engine_id}")
        local = self._local_blocks[np.asarray(local_idx, dtype=np.int64)]
        remote = self._remote_blocks[engine_id][np.asarray(remote_idx, dtype=np.int64)]
        return self.post(op, self._remotes[engine_id], local.tolist(), remote.tolist())

    def xfer_blocks(self, op: str, engine_id: str, local_idx, remote_idx,
                    timeout_s: float) -> float:
        h, prep = self.post_blocks(op, engine_id, local_idx, remote_idx)
        self._finish(h, timeout_s, f"{op} with engine {engine_id}")
        return prep

    def read(self, remote_agent: str, local, remote, timeout_s: float) -> float:
        return self.xfer("READ", remote_agent, local, remote, timeout_s)

    def xfer(self, op: str, remote_agent: str, local, remote, timeout_s: float) -> float:
        h, prep = self.post(op, remote_agent, local, remote)
        self._finish(h, timeout_s, f"{op} with {remote_agent}")
        return prep

    def _finish(self, h, timeout_s: float, what: str) -> None:
        try:
            self.wait(h, timeout_s, what)
        finally:
            self.release(h)

    def post(self, op: str, remote_agent: str, local: Sequence[Sequence[int]],
             remote: Sequence[Sequence[int]]):
        """Copy now (or never, or later, per the faults of either side); (handle, 0.0)."""
        peer = self._peer(remote_agent)
        if len(local) != len(remote):
            raise LoopbackError(f"descriptor count mismatch: {len(local)} vs {len(remote)}")
        pairs = []
        for (la, ln, *_), (ra, rn, *_) in zip(local, remote):
            if ln != rn or not self._inside(la, ln) or not peer._inside(ra, rn):
                raise LoopbackError(f"{op}: descriptor outside the registered memory")
            pairs.append((la, ra, ln))
        self.transfers += 1
        faults = (self.faults, peer.faults)
        if any(f.drop for f in faults):
            return _Xfer(float("inf"), True), 0.0
        for la, ra, n in pairs:
            dst, src = (la, ra) if op == "READ" else (ra, la)
            ctypes.memmove(dst, src, n)
            if any(f.corrupt for f in faults):
                b = ctypes.c_ubyte.from_address(dst)
                b.value ^= 0xFF
        return _Xfer(time.monotonic() + max(f.delay_s for f in faults), False), 0.0

    def done(self, h: _Xfer) -> bool:
        if h.error:
            raise LoopbackError(h.error)
        return not h.dropped and time.monotonic() >= h.ready_at

    def wait(self, h: _Xfer, timeout_s: float, what: str = "transfer") -> None:
        deadline = time.monotonic() + timeout_s
        while not self.done(h):
            if time.monotonic() > deadline:
                raise LoopbackError(f"{what} timed out after {timeout_s}s")
            time.sleep(min(0.001, max(0.0, h.ready_at - time.monotonic())) or 0.001)

    def release(self, h) -> None:
        return None

    # -- notifications
    def send_notif(self, remote_agent: str, msg: str) -> None:
        peer = self._peer(remote_agent)
        with peer._nlock:
            peer._notifs.append(msg)

    def notifs(self) -> list[str]:
        with self._nlock:
            out, self._notifs = self._notifs, []
        return out

    def progress(self) -> None:
        return None

    def endpoint_configs(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        with _LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
        self._remotes.clear()
        self._remote_blocks.clear()
