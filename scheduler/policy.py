"""Placement policy: cost functions and the disaggregation decision. Pure functions.

Prefill cost (policy "kv"), in tokens of prefill work, i.e. proportional to the TTFT the
request would see on that worker:

    cost(w) = overlap_weight * uncached_tokens(w) + queued_prefill_tokens(w)
              + running_weight * running_requests(w)

`uncached_tokens` is the prompt minus the prefix the worker already holds (from the
prefix index). `overlap_weight` > 1 favours cache hits over balance, < 1 the reverse.
With `temperature` T > 0 the choice is sampled with P(w) ~ exp(-(cost(w) - min) / (T * prompt
tokens)) instead of taking the minimum, which spreads identical prompts over workers.

Decode cost, unitless:

    cost(w) = kv_weight * kv_usage(w) + running_weight_decode * running(w) / max_num_seqs(w)
              + tpot_weight * (tpot_ms(w) / best tpot_ms in the pool - 1)

Conditional disaggregation: the decode worker prefills locally when the part of the prompt
it does not hold is at most `local_prefill_max_tokens`, or when every prefill worker has at
least `prefill_saturation_tokens` queued and the decode worker has room (KV usage below
`decode_room_kv` and running below `decode_room_running` of its max_num_seqs), or when no
prefill worker can serve the request at all. 0 disables a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("adaptive", "kv", "least_loaded", "round_robin")
HOLD_ORDERS = ("deadline", "fifo")
FIRST_TOKENS = ("with_stream", "adaptive", "early")
OVERFLOWS = ("fallback", "on", "balance", "off")


@dataclass(frozen=True)
class PlacementConfig:
    # adaptive: per-request choice between remote and local prefill from the latency
    # model (scheduler/adaptive.py), prefill workers ranked by the kv cost below until
    # the model is warm; kv, least_loaded, round_robin: the cost functions alone
    policy: str = "adaptive"
    overlap_weight: float = 1.0
    running_weight: float = 8.0
    temperature: float = 0.0
    kv_weight: float = 1.0
    running_weight_decode: float = 1.0
    tpot_weight: float = 0.5
    local_prefill_max_tokens: int = 0
    prefill_saturation_tokens: int = 0
    decode_room_kv: float = 0.7
    decode_room_running: float = 0.8
    local_fallback: bool = True      # no prefill worker at all: prefill on the decode worker
    # admission (scheduler/admission.py): refuse when the best option's forecast TTFT is
    # over this many TTFT SLOs (0: admit everything)
    admit_ttft_factor: float = 4.0
    # late binding (scheduler/holding.py): a request waits in the scheduler while the worker
    # its best option names is busy, for at most this long (0: route on arrival)
    hold_max_s: float = 60.0
    # ...in arrival order ("fifo"), or with requests predicted to miss their TTFT SLO
    # stepping aside for those that can still meet it ("deadline")
    hold_order: str = "deadline"
    # a remote prefill's first token: kept by the frontend until the decode worker's first
    # token, always ("with_stream": the handoff then falls in TTFT, not in TPOT) or where
    # that scores better against the SLOs ("adaptive"), or sent when computed ("early")
    first_token: str = "with_stream"
    # a whole request on a prefill worker (computed and decoded there): "fallback" when no
    # decode-capable worker is left (dead, draining, excluded), "on" also when no other
    # option is predicted to serve it within its SLOs (scheduler/adaptive.py), "balance"
    # (the default) also when it scores well over the best option that is, "off" never
    overflow: str = "balance"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"placement policy must be one of {POLICIES}, not {self.policy!r}")
        if self.hold_max_s < 0:
            raise ValueError("hold_max_s must be >= 0")
        if self.hold_order not in HOLD_ORDERS:
            raise ValueError(f"hold_order must be one of {HOLD_ORDERS}, not {self.hold_order!r}")
        if self.first_token not in FIRST_TOKENS:
            raise ValueError(f"first_token must be one of {FIRST_TOKENS}, not "
                             f"{self.first_token!r}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {OVERFLOWS}, not {self.overflow!r}")
        if self.temperature < 0 or self.overlap_weight < 0:
            raise ValueError("temperature and overlap_weight must be >= 0")


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    cached_tokens: int
    queued_prefill_tokens: int
    running: int


@dataclass(frozen=True)
class DecodeCandidate:
    worker_id: str
    kv_usage: float
    running: int
    max_num_seqs: int
    tpot_ms: float
    cached_tokens: int = 0


@dataclass(frozen=True)
class Decision:
    prefill: str | None           # None: local prefill on the decode worker
    decode: str
    mode: str                     # "disagg" | "local"
    reason: str
    prefill_tokens: int           # tokens the prefilling worker must compute
    cached_tokens: int            # prompt tokens it already holds
    blocks: int                   # KV blocks the request will take on the decode worker
    prompt_tokens: int = 0
    # the adaptive policy's predictions (scheduler/adaptive.py); 0 / "" without a model
    prefill_s: float = 0.0        # compute of the prefill, booked as the worker's backlog
    pred_ttft_s: float = 0.0
    pred_tpot_s: float = 0.0
    runner_up: str = ""
    chunk_tokens: int = 0
    out_tokens: int = 0           # the request's max_tokens (0: not said)
    hold_first: bool = False      # the frontend keeps the first token for the stream
    pred_handoff_s: float = 0.0   # of pred_ttft_s, the kept first token's handoff
    decode_streams: int = -1      # streams on the decode worker when chosen (-1: not known)
    pred_first_over_s: float = 0.0   # of pred_ttft_s, the learned fixed part (first_over_s)
    joined: bool = False          # late binding sent it to share the queued prompts' step


def prefill_cost(cfg: PlacementConfig, c: Candidate, num_tokens: int) -> float:
    if cfg.policy == "least_loaded":
        return c.queued_prefill_tokens + c.running
    uncached = max(0, num_tokens - c.cached_tokens)
    return cfg.overlap_weight * uncached + c.queued_prefill_tokens + cfg.running_weight * c.running


def _round_robin(by_id: dict, seq: int):
    return by_id[sorted(by_id)[seq % len(by_id)]]


def _pick(costs: list[tuple[float, str]], temperature: float, scale: float, rng):
    if temperature <= 0 or rng is None or len(costs) == 1:
        return min(costs)[1]
    lo = min(c for c, _ in costs)
    weights = [math.exp(-(c - lo) / (temperature * max(scale, 1.0))) for c, _ in costs]
    return rng.choices([w for _, w in costs], weights=weights)[0]


def choose_prefill(cfg: PlacementConfig, cands: list[Candidate], num_tokens: int,
                   rng=None, seq: int = 0) -> Candidate | None:
    if not cands:
        return None
    by_id = {c.worker_id: c for c in cands}
    if cfg.policy == "round_robin":
        return _round_robin(by_id, seq)
    costs = [(prefill_cost(cfg, c, num_tokens), c.worker_id) for c in cands]
    return by_id[_pick(costs, cfg.temperature, num_tokens, rng)]


def decode_cost(cfg: PlacementConfig, c: DecodeCandidate, best_tpot: float) -> float:
    run = c.running / c.max_num_seqs if c.max_num_seqs else float(c.running)
    tpot = (c.tpot_ms / best_tpot - 1.0) if best_tpot > 0 and c.tpot_ms > 0 else 0.0
    return cfg.kv_weight * c.kv_usage + cfg.running_weight_decode * run + cfg.tpot_weight * tpot


def choose_decode(cfg: PlacementConfig, cands: list[DecodeCandidate], rng=None,
                  seq: int = 0) -> DecodeCandidate:
    by_id = {c.worker_id: c for c in cands}
    if cfg.policy == "round_robin":
        return _round_robin(by_id, seq)
    tpots = [c.tpot_ms for c in cands if c.tpot_ms > 0]
    best = min(tpots) if tpots else 0.0
    return by_id[min((decode_cost(cfg, c, best), c.worker_id) for c in cands)[1]]


def has_room(cfg: PlacementConfig, d: DecodeCandidate) -> bool:
    run_ok = d.max_num_seqs <= 0 or d.running < cfg.decode_room_running * d.max_num_seqs
    return d.kv_usage < cfg.decode_room_kv and run_ok


def kv_blocks(num_tokens: int, block_size: int) -> int:
    """KV blocks a request takes on the worker that decodes it: its prompt's, and one more
    for the tokens it generates first."""
    return -(-num_tokens // (block_size or 1)) + 1


def choose_mode(cfg: PlacementConfig, num_tokens: int, prefill: Candidate | None,
                pool: list[Candidate], decode: DecodeCandidate, block_size: int) -> Decision:
    blocks = kv_blocks(num_tokens, block_size)
    local_uncached = max(0, num_tokens - decode.cached_tokens)

    def local(reason: str) -> Decision:
        return Decision(None, decode.worker_id, "local", reason, local_uncached,
                        decode.cached_tokens, blocks, num_tokens)

    if prefill is None:
        if cfg.local_fallback:
            return local("no_prefill_worker")
        raise LookupError("no KV-compatible prefill worker")
    if cfg.local_prefill_max_tokens and local_uncached <= cfg.local_prefill_max_tokens:
        return local("short_prompt")
    if (cfg.prefill_saturation_tokens and pool
            and min(c.queued_prefill_tokens for c in pool) >= cfg.prefill_saturation_tokens
            and has_room(cfg, decode)):
        return local("prefill_saturated")
    # adaptive without a warm latency model places by the kv cost: say so
    why = "kv" if cfg.policy == "adaptive" else cfg.policy
    return Decision(prefill.worker_id, decode.worker_id, "disagg", why,
                    max(0, num_tokens - prefill.cached_tokens), prefill.cached_tokens, blocks,
                    num_tokens)
