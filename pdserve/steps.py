"""The worker's end of the engine core's step datagrams (pdserve/step_hook.py).

An abstract Unix datagram socket, unique to this process: the engine core sends one
datagram per step, the worker keeps the newest ones for its next heartbeat (the
scheduler's latency model is fitted from them) and the slack the last step left its
streams (`step_budget.left_after`) and its budget for its load report. Nothing blocks
either side: a full socket drops steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import deque

from pdserve.rpc import pd_pb2
from pdserve.step_wire import WIRE, decode, unix_address

log = logging.getLogger(__name__)

MAX_PER_HEARTBEAT = 256


class StepReceiver:
    def __init__(self, keep: int = 1024) -> None:
        # "@name" in the environment (it cannot carry the abstract namespace's NUL)
        self.address = f"@pdserve-steps-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(unix_address(self.address))
        self.sock.setblocking(False)
        self.buf: deque[pd_pb2.StepSample] = deque(maxlen=keep)
        self.allow_s, self.budget = float("inf"), 0
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self.drain)
        self.drain()

    def drain(self) -> None:
        while True:
            try:
                b = self.sock.recv(WIRE.size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(b) != WIRE.size:
                continue
            s, allow, tok = decode(b)
            self.allow_s, self.budget = allow, tok
            self.received += 1
            self.buf.append(pd_pb2.StepSample(
                seconds=s.seconds, prefill_tokens=s.prefill_tokens, prefill_attn=s.prefill_attn,
                decode_seqs=s.decode_seqs, decode_ctx=s.decode_ctx, late_only=s.late_only))

    def take(self, n: int = MAX_PER_HEARTBEAT) -> list[pd_pb2.StepSample]:
        """The newest `n` steps not sent yet (older ones are dropped)."""
        self.drain()
        out = list(self.buf)[-n:]
        self.buf.clear()
        return out

    def allowance(self) -> tuple[float, int]:
        """(the slack the last step left its streams, seconds; its prompt tokens) (0, 0)
        when no stream was running."""
        if self.allow_s == float("inf"):
            return 0.0, 0
        return max(1e-6, self.allow_s), self.budget   # > 0: streams are running

    def stop(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except (ValueError, RuntimeError):
                pass
        self.sock.close()
