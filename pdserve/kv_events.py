"""vLLM KV cache events -> our block hashes, on the worker, for the scheduler's prefix index.

The engine publishes BlockStored / BlockRemoved / AllBlocksCleared (vLLM's
`kv_events_config`, ZMQ PUB on an ipc socket in the worker's private directory, with
a replay ROUTER). `EventMirror` (pure) turns each event into our chained hashes
(pdserve.kvhash) and remembers which of our hashes each vLLM hash stands for, so a
removal can be translated and a (re)connecting scheduler can get a full snapshot.
`EventRelay` (I/O) subscribes, detects sequence gaps and replays them, and hands
batches to the worker's gRPC stream.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pdserve import kvhash

log = logging.getLogger(__name__)


@dataclass
class Delta:
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    cleared: bool = False

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.cleared)


class EventMirror:
    """vLLM block hash -> [our hash, refcount, chain state]. Pure; fed decoded vLLM events."""

    def __init__(self, medium: str | None = "GPU") -> None:
        self._ours: dict[object, list] = {}     # vllm hash -> [our hash, refs, state]
        self.medium = medium
        self.orphans = 0                         # stored blocks whose parent we never saw

    def _wanted(self, ev) -> bool:
        # offloaded copies (CPU/disk tiers) are not where a prefill can be skipped
        m = getattr(ev, "medium", None)
        return m is None or self.medium is None or m == self.medium

    def apply(self, events) -> Delta:
        d = Delta()
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                if self._wanted(ev):
                    self._stored(ev, d)
            elif kind == "BlockRemoved":
                if self._wanted(ev):
                    self._removed(ev.block_hashes, d)
            elif kind == "AllBlocksCleared":
                self._ours.clear()
                d.stored.clear()
                d.removed.clear()
                d.cleared = True
        return d

    def _stored(self, ev, d: Delta) -> None:
        if ev.parent_block_hash is None:
            state = kvhash.root_for(ev.lora_id)
        else:
            rec = self._ours.get(ev.parent_block_hash)
            if rec is None:
                self.orphans += len(ev.block_hashes)
                return
            state = rec[2]
        hashes, states = kvhash.extend(state, ev.token_ids, ev.block_size,
                                       max_blocks=len(ev.block_hashes))
        for vh, h, st in zip(ev.block_hashes, hashes, states):
            rec = self._ours.get(vh)
            if rec is None:
                self._ours[vh] = [h, 1, st]
                d.stored.append(h)
            else:
                rec[1] += 1

    def _removed(self, hashes, d: Delta) -> None:
        for vh in hashes:
            rec = self._ours.get(vh)
            if rec is None:
                continue
            rec[1] -= 1
            if rec[1] <= 0:
                del self._ours[vh]
                d.removed.append(rec[0])

    def snapshot(self) -> list[int]:
        return [rec[0] for rec in self._ours.values()]

    def __len__(self) -> int:
        return len(self._ours)


class EventRelay:
    """Subscribes to the engine's event publisher in a thread; queues Deltas.

    Gaps in the publisher's sequence numbers are filled from its replay socket. If the
    replay buffer no longer has them, the relay asks the consumer for a resync (the
    mirror may then hold entries whose removal was lost; they only cost a wrong guess,
    and vLLM's buffer of 10,000 batches makes this rare).

    The queue is bounded (`max_pending` deltas): while nobody takes them (the scheduler is
    down, the stream is reconnecting) it would otherwise grow with every block the engine
    stores. Past the bound the queue is dropped and a snapshot asked for instead, which
    the consumer sends on reconnect anyway.

    `on_change` (set by the consumer) is called from the relay's thread whenever there is
    something new to take, so that the consumer waits for it instead of polling."""

    MAX_PENDING = 4096

    def __init__(self, endpoint: str, replay_endpoint: str | None, mirror: EventMirror,
                 max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.mirror = mirror
        self.lock = threading.Lock()
        self.pending: deque[Delta] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.resync_needed = False
        self.on_change: Callable[[], None] = lambda: None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def take(self) -> tuple[list[Delta], bool]:
        """Everything queued so far, and whether a full snapshot must be sent."""
        with self.lock:
            out = list(self.pending)
            self.pending.clear()
            resync, self.resync_needed = self.resync_needed, False
        return out, resync

    def snapshot(self) -> list[int]:
        with self.lock:
            self.pending.clear()   # the snapshot already contains them
            return self.mirror.snapshot()

    def _apply(self, payload: bytes, decoder) -> None:
        batch = decoder.decode(payload)
        with self.lock:
            d = self.mirror.apply(batch.events)
            if not d:
                return
            if len(self.pending) >= self.max_pending:
                self.pending.clear()        # a snapshot will replace them
                self.resync_needed = True
            else:
                self.pending.append(d)
        self.on_change()

    def _replay(self, ctx, zmq, start: int, decoder) -> int | None:
        """Fetch batches from `start` on; returns the last seq replayed (None: none)."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        last = None
        try:
            sock.connect(self.replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            while sock.poll(2000):
                frames = sock.recv_multipart()
                _, _topic, seq_b, payload = frames[-4:] if len(frames) >= 4 else (0, 0, b"", b"")
                if not payload:
                    break               # end-of-sequence marker
                seq = int.from_bytes(seq_b, "big")
                if last is None and seq != start:
                    return None          # the buffer no longer reaches back that far
                self._apply(payload, decoder)
                last = seq
        finally:
            sock.close()
        return last

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        expected = None
        try:
            while not self._stop.is_set():
                if not sub.poll(100):
                    continue
                _topic, seq_b, payload = sub.recv_multipart()
                seq = int.from_bytes(seq_b, "big")
                if expected is not None and seq > expected:
                    last = (self._replay(ctx, zmq, expected, decoder)
                            if self.replay_endpoint else None)
                    if last is None or last + 1 < seq:
                        log.warning("KV events %d..%d lost; resyncing the scheduler's index",
                                    expected, seq - 1)
                        with self.lock:
                            self.resync_needed = True
                        self.on_change()
                    if last is not None and last >= seq:
                        expected = last + 1
                        continue
                if expected is None or seq >= expected:
                    self._apply(payload, decoder)
                    expected = seq + 1
        except Exception:  # never take the worker down; the index only gets staler
            log.exception("KV event relay stopped")
        finally:
            sub.close()
