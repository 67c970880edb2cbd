"""The options of a request as the chooser ranks them: the SLOs, an option's predicted
TTFT and TPOT, and which option goes first. Pure: no I/O, no clock. How each option is
predicted is scheduler/adaptive.py's.

Score = min(1 - TTFT / TTFT SLO, 1 - TPOT / TPOT SLO): positive when both SLOs are
predicted met, larger with more headroom on the tighter one. `ranked` takes the lowest
predicted TTFT, as the client sees it, among the options that meet both with a margin
(near-ties go to remote), else the best score, except that a request late whatever it
does goes to a prefill worker where it can; the next one is reported as the runner-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.step_budget import SAFETY

MARGIN = 0.05             # headroom (share of each SLO) an option must keep to count as met
TIE = 0.05                # TTFTs this close (share of the TTFT SLO) are equally fast,
TIE_REL = 0.25            # ...and this close (share of the lower one): what a client sees

@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    safety: float = SAFETY   # engines hold stream steps to safety * TPOT SLO on average
    least: int = 1           # the engines' floor, at least (step_budget.floor_tokens)
    # a remote option's first token: with_stream (always kept for the stream), adaptive
    # (kept where the SLOs favour it) or early (sent when computed)
    first_token: str = "with_stream"
    # streams whose first token missed the TTFT SLO keep no slack on their engine
    # (pdserve/step_budget.py, `Stream.late`; PDSERVE_LATE_STREAMS=keep: they do)
    late: bool = True
    # a request whose first token comes after its TTFT SLO whatever the option has its
    # prompt computed remotely where it can be (`ranked`; PDSERVE_LATE_PREFILL=local: the
    # sooner computed, as before)
    late_remote: bool = True
    # a local prompt computed alone goes in whole steps where its `alone` chunks would
    # miss the TTFT SLO and whole steps would not (step_budget.whole_alone;
    # PDSERVE_WHOLE_ALONE=1)
    whole_alone: bool = False



@dataclass(frozen=True)
class Option:
    kind: str                    # "remote" | "local" | "overflow" (local on a prefill worker)
    prefill: str                 # the worker that computes the prompt
    decode: str
    ttft_s: float
    tpot_s: float
    prefill_s: float             # the prefill's own compute time (booked as backlog)
    chunk: int                   # prompt tokens per step beside streams (0: unchunked)
    score: float = field(default=-math.inf)
    cached: int = 0
    hold: bool = False           # the first token waits for the stream (`remote`)
    ready_s: float = -1.0        # when the first token is computed, if not ttft_s
    first_over_s: float = 0.0    # of ttft_s, the prefilling node's learned fixed part

    @property
    def first_s(self) -> float:
        """When the first token is computed (a kept one then waits for its stream): what
        makes a request late, and what orders options none of which meets the SLOs."""
        return self.ready_s if self.ready_s >= 0 else self.ttft_s

    def describe(self) -> str:
        p = f" prefill={self.prefill}" if self.kind == "remote" else ""
        h = " first=with_stream" if self.hold else ""
        return (f"{self.kind}{p} decode={self.decode} ttft_ms={self.ttft_s * 1e3:.0f} "
                f"tpot_ms={self.tpot_s * 1e3:.1f}{h}")


def score(ttft_s: float, tpot_s: float, slo: SLO) -> float:
    return min(1.0 - ttft_s / slo.ttft_s, 1.0 - tpot_s / slo.tpot_s)



def met(o: Option, slo: SLO, held_s: float = 0.0) -> bool:
    """`o` is predicted to meet both SLOs with MARGIN to spare, for a request that has
    waited `held_s` already (late binding): its TTFT counts from its arrival, where
    scores count from now (`ranked` orders the options that meet)."""
    return o.score >= MARGIN and 1.0 - (held_s + o.ttft_s) / slo.ttft_s >= MARGIN



def computed_late(o: Option, slo: SLO, held_s: float = 0.0) -> bool:
    """`o` computes the first token of a request held `held_s` after its TTFT SLO (a kept
    one counts from when it is computed: its deadline sends it within the SLO)."""
    return held_s + o.first_s > slo.ttft_s



def ranked(opts: list[Option], slo: SLO, held_s: float = 0.0) -> list[Option]:
    """Best first. Options predicted to meet both SLOs with MARGIN to spare come first,
    the lowest predicted TTFT first: goodput counts requests within the SLOs, and among
    those the work finishes soonest where it waits least (what a least-outstanding proxy
    does for replicas, here with predicted seconds instead of counts), so a queue on the
    prefill workers overflows onto decode engines whose streams can afford it. TTFTs
    within TIE of the SLO of the lowest, and within TIE_REL of the lowest itself, are a
    tie: remote first (disaggregation keeps decode engines for decoding), then the lower
    TTFT. (The SLO alone made a loose one a licence to double a short prompt's TTFT: 72
    against 131 ms under a 5 s SLO.) The TTFT compared is the one the
    client sees (`ttft_s`): a remote option whose first token waits for its stream
    (`hold`) is that much later, so a free decode engine takes a short prompt itself
    instead of answering a handoff later. When no option is predicted to make it, the
    best score first (the least-missed SLO; within MARGIN of it, the sooner computed).
    `held_s`: how long the request has waited already; it counts in what makes the SLOs
    (`met`), not in the order of the options that miss them, unless every one computes
    its first token after the SLO (`slo.late_remote`: remote first, docs/design.md)."""
    ok = [o for o in opts if met(o, slo, held_s)]
    if not ok and slo.late_remote and all(computed_late(o, slo, held_s) for o in opts):
        # late whatever it does: its TTFT counts for nothing, and a decode engine computing
        # its prompt slows every stream that lands there meanwhile; for a prefill worker
        # it is held behind the requests that can still make their SLOs
        # (scheduler/holding.py) and delays only those that arrive after its dispatch
        return sorted(opts, key=lambda o: (o.kind == "local", o.first_s))
    if not ok:      # the least-missed; as good as it within MARGIN: the sooner computed
        best = max(o.score for o in opts)
        near = sorted((o for o in opts if o.score >= best - MARGIN),
                      key=lambda o: (round(o.first_s, 4), -o.score))
        return near + sorted((o for o in opts if o.score < best - MARGIN),
                             key=lambda o: (-o.score, o.tpot_s))
    # the TTFT the client sees: a kept first token's includes its handoff
    fastest = min(o.ttft_s for o in ok)
    tie = fastest + min(TIE * slo.ttft_s, TIE_REL * fastest)
    tied = sorted((o for o in ok if o.ttft_s <= tie),
                  key=lambda o: (o.kind != "remote", round(o.ttft_s, 4), -o.score))
    rest = sorted((o for o in ok if o.ttft_s > tie), key=lambda o: (o.ttft_s, -o.score))
    miss = sorted((o for o in opts if not met(o, slo, held_s)),
                  key=lambda o: (-o.score, o.tpot_s))
    return tied + rest + miss


def reason(best: Option, slo: SLO | None = None, held_s: float = 0.0) -> str:
    """"slo" where `best` is predicted within both SLOs (its TTFT from the arrival of a
    request held `held_s`), else "best_effort"."""
    late = slo is not None and held_s > 0 and held_s + best.ttft_s > slo.ttft_s
    return "slo" if best.score >= 0 and not late else "best_effort"
