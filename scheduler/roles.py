"""Worker roles and when they change. Pure: no I/O, time passed in.

Every pdserve engine can produce and consume KV (vLLM `kv_both`), and every worker serves
both gRPC services, so a role is what the scheduler sends a worker, not what it can do:

    prefill   remote prefills (the KV then moves to a decode-capable worker)
    decode    decodes of remote prefills, and whole requests prefilled locally (chunked
              beside its streams by the engine's step budget)
    mixed     all three

A role change never restarts an engine. Gaining work flips at once. Losing work first
drains: the worker gets only the work both roles allow until nothing booked on it is of
a kind the new role drops, then flips (`Registry.settle_roles`); the worker hears its new
role in the next heartbeat answer and registers again under it.

`RolePlanner` changes roles when the mix shifts for longer than a window: a prefill worker
becomes mixed while the decode side is under pressure and the prefill side is not, and a
mixed worker goes back to prefill while the prefill side is under pressure and the other
decode-capable workers could carry its streams without being pressed in turn (with the
old test, the decode side's pressure now, a mixed worker whose streams filled their
budget never went back). Both directions are priced by what one decode-capable worker
more or fewer does to the decode step, from the fitted step model: a worker becomes mixed
only if one more decoder would take a real share off the decode step (on an engine whose
step is mostly its fixed part, spreading streams saves next to nothing, and a decode
pressure near the threshold at batch 1 made a prefill worker mixed for no gain), and a
mixed worker goes back when one decoder fewer would cost the streams next to nothing
(else, once the decode load had passed, it stayed mixed until prefill pressure built up
on it). A condition must hold at every
tick for `window_s` (one noisy tick resets it), a flip waits `dwell_s` after the last one,
and the thresholds to enter and leave differ, so a noisy trace does not flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROLES = ("prefill", "decode", "mixed")
KINDS = {"prefill": frozenset({"prefill"}),
         "decode": frozenset({"decode", "local"}),
         "mixed": frozenset({"prefill", "decode", "local"})}
# reason codes (bounded: a Prometheus label)
REASONS = ("decode_pressure", "prefill_pressure", "decode_slack", "admin")


def kinds(role: str, pending: str = "") -> frozenset[str]:
    """The work a worker may be given now: during a change, what both roles allow."""
    k = KINDS[role]
    return k & KINDS[pending] if pending else k


@dataclass(frozen=True)
class RolePlannerConfig:
    window_s: float = 30.0           # a condition must hold this long
    dwell_s: float = 60.0            # no flip sooner than this after the last one
    decode_enter: float = 0.8        # decode pressure: plain decode step / (safety * TPOT SLO)
    prefill_enter: float = 0.5       # prefill pressure: backlog or prefill p90 / TTFT SLO
    prefill_leave: float = 0.2
    gain_enter: float = 0.1          # mixed only if one more decoder takes this much pressure off
    loss_leave: float = 0.05         # back to prefill when one fewer adds less than this


@dataclass(frozen=True)
class Signals:
    """One tick's view: pressure ratios (see RolePlannerConfig) and the workers' roles."""
    decode_pressure: float
    prefill_pressure: float
    roles: dict[str, str] = field(default_factory=dict)   # routable workers -> role
    # decode pressure with one decode-capable worker fewer, its streams spread over the
    # rest: what a flip back to prefill would leave (inf: no decoder would be left)
    decode_after: float = math.inf
    # the decode pressure one more decode-capable worker would take off, and the pressure
    # one fewer would add (inf: not known, the old rules alone)
    decode_gain: float = math.inf
    decode_loss: float = math.inf


@dataclass(frozen=True)
class Flip:
    worker_id: str
    role: str
    reason: str
    detail: str


class RolePlanner:
    def __init__(self, cfg: RolePlannerConfig = RolePlannerConfig()) -> None:
        self.cfg = cfg
        self.since: dict[str, float | None] = {"to_mixed": None, "to_prefill": None}
        self.last_flip = -1e18

    def tick(self, now: float, s: Signals) -> list[Flip]:
        c = self.cfg
        want_mixed = (s.decode_pressure >= c.decode_enter and s.prefill_pressure < c.prefill_leave
                      and s.decode_gain >= c.gain_enter)
        # back to prefill only if the decode side alone stays under the pressure that
        # makes a worker mixed (else the next window flips it again), or if its decoding
        # buys next to nothing
        pressed = s.prefill_pressure >= c.prefill_enter and s.decode_after < c.decode_enter
        slack = s.decode_loss < c.loss_leave
        want_prefill = pressed or slack
        for key, on in (("to_mixed", want_mixed), ("to_prefill", want_prefill)):
            if not on:
                self.since[key] = None
            elif self.since[key] is None:
                self.since[key] = now
        if now - self.last_flip < c.dwell_s:
            return []
        for key, role_from, role_to, why in (
                ("to_mixed", "prefill", "mixed", "decode_pressure"),
                ("to_prefill", "mixed", "prefill",
                 "prefill_pressure" if pressed else "decode_slack")):
            t0 = self.since[key]
            if t0 is None or now - t0 < c.window_s:
                continue
            cands = sorted(w for w, r in s.roles.items() if r == role_from)
            if not cands:
                continue
            self.last_flip = now
            self.since[key] = None
            return [Flip(cands[0], role_to, why,
                         f"decode pressure {s.decode_pressure:.2f} (one decoder more "
                         f"-{s.decode_gain:.2f}, one fewer +{s.decode_loss:.2f}), prefill "
                         f"pressure {s.prefill_pressure:.2f} for {now - t0:.0f}s")]
        return []
