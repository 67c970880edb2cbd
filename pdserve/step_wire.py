"""The step hook's datagram: one engine step, from vLLM's engine core (pdserve/step_hook.py)
to its worker process (pdserve/steps.py). Pure."""

from __future__ import annotations

import struct

from pdserve.latency import StepSample

# seconds, prefill tokens, prefill attention, decode seqs, decode ctx, allow_s, budget tokens,
# late streams only
WIRE = struct.Struct("<dIdIIdIB")


def unix_address(name: str) -> str:
    """`@name`: the abstract Unix socket `name` (as `ss` writes it)."""
    return "\0" + name[1:] if name.startswith("@") else name


def encode(s: StepSample, allow_s: float, tokens: int) -> bytes:
    """`allow_s`: inf with no stream; negative when the streams are behind (a double
    carries both as they are: the first version sent inf as -1 and read every negative
    allowance back as no stream at all)."""
    return WIRE.pack(s.seconds, s.prefill_tokens, s.prefill_attn, s.decode_seqs, s.decode_ctx,
                     allow_s, tokens, int(s.late_only))


def decode(b: bytes) -> tuple[StepSample, float, int]:
    sec, p, a, d, c, allow, tok, late = WIRE.unpack(b)
    return StepSample(sec, p, a, d, c, bool(late)), allow, tok
