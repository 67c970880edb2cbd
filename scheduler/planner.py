"""Per-pool autoscaling planner: a pure state machine (no I/O; time is an input).

Each tick takes measured inputs per pool (latency percentile over a window, queue depth,
prefill tokens waiting, KV usage, request rate) and the current replica counts, and returns
the desired replica count for the prefill pool and the decode pool, independently, with a
reason for each. The prefill pool is judged on TTFT and the decode pool on TPOT, each
against the user's SLO (p90 by default).

Policy, per pool:
* No latency measurement: hold ("no metrics"). Missing data never scales anything.
* Out of [min, max]: move inside at once ("bounds").
* Above the SLO (p90 > up_ratio × target), and the last scale-up was at least
  `up_cooldown_s` ago: add replicas in proportion to the overshoot, at most `max_step_up`
  at a time.
* Well below the SLO (p90 < down_ratio × target) on `down_ticks` consecutive ticks, the last
  change at least `down_cooldown_s` ago, and the newest replica older than `warmup_grace_s`
  (a short lull does not kill a replica that has just warmed up): remove one replica.
* In between: hold. The gap between up_ratio and down_ratio is the hysteresis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class PoolPolicy:
    target_ms: float                 # SLO: TTFT p90 for prefill, TPOT p90 for decode
    min_replicas: int = 1
    max_replicas: int = 4

    def __post_init__(self) -> None:
        if self.target_ms <= 0 or not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"bad pool policy {self}")


@dataclass(frozen=True)
class PlannerConfig:
    prefill: PoolPolicy = field(default_factory=lambda: PoolPolicy(target_ms=2000))
    decode: PoolPolicy = field(default_factory=lambda: PoolPolicy(target_ms=100))
    up_ratio: float = 1.0
    down_ratio: float = 0.5
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    down_ticks: int = 3
    warmup_grace_s: float = 120.0
    max_step_up: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.down_ratio < self.up_ratio:
            raise ValueError("need 0 < down_ratio < up_ratio (the hysteresis band)")


@dataclass(frozen=True)
class PoolMetrics:
    latency_p90_ms: float | None      # TTFT (prefill) or TPOT (decode) p90 over the window
    queue_depth: int = 0
    prefill_tokens_waiting: int = 0
    kv_usage: float = 0.0
    request_rate: float = 0.0


@dataclass(frozen=True)
class PlannerInput:
    now: float
    replicas: dict[str, int]                          # current, per pool
    metrics: dict[str, PoolMetrics | None]            # per pool; None: nothing measured
    newest_replica_age_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    desired: dict[str, int]
    reasons: dict[str, str]


@dataclass
class _PoolState:
    last_up: float = -math.inf
    last_change: float = -math.inf
    below: int = 0


class Planner:
    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.state = {p: _PoolState() for p in POOLS}

    def tick(self, inp: PlannerInput) -> Decision:
        desired, reasons = {}, {}
        for pool in POOLS:
            desired[pool], reasons[pool] = self._pool(pool, inp)
        return Decision(desired, reasons)

    def _pool(self, pool: str, inp: PlannerInput) -> tuple[int, str]:
        cfg, st = self.cfg, self.state[pool]
        pol: PoolPolicy = getattr(cfg, pool)
        cur = inp.replicas.get(pool, 0)
        if cur < pol.min_replicas or cur > pol.max_replicas:
            st.last_change = inp.now
            new = min(max(cur, pol.min_replicas), pol.max_replicas)
            return new, f"bounds: {cur} outside [{pol.min_replicas}, {pol.max_replicas}]"
        m = inp.metrics.get(pool)
        if m is None or m.latency_p90_ms is None:
            st.below = 0
            return cur, "no metrics: hold"
        ratio = m.latency_p90_ms / pol.target_ms
        what = "TTFT" if pool == "prefill" else "TPOT"
        obs = f"{what} p90 {m.latency_p90_ms:.0f} ms vs SLO {pol.target_ms:.0f} ms"
        if ratio > cfg.up_ratio:
            st.below = 0
            if cur >= pol.max_replicas:
                return cur, f"{obs}: at max {pol.max_replicas}"
            if inp.now - st.last_up < cfg.up_cooldown_s:
                return cur, f"{obs}: scale-up cooldown"
            step = max(1, min(cfg.max_step_up, math.ceil(cur * ratio) - cur,
                              pol.max_replicas - cur))
            st.last_up = st.last_change = inp.now
            return cur + step, f"{obs}: scale up by {step}"
        if ratio < cfg.down_ratio:
            st.below += 1
            if cur <= pol.min_replicas:
                return cur, f"{obs}: at min {pol.min_replicas}"
            if st.below < cfg.down_ticks:
                return cur, f"{obs}: low for {st.below}/{cfg.down_ticks} ticks"
            if inp.now - st.last_change < cfg.down_cooldown_s:
                return cur, f"{obs}: scale-down cooldown"
            if inp.newest_replica_age_s.get(pool, math.inf) < cfg.warmup_grace_s:
                return cur, f"{obs}: newest replica still in its warm-up grace"
            st.last_change = inp.now
            st.below = 0
            return cur - 1, f"{obs}: scale down by 1"
        st.below = 0
        return cur, f"{obs}: within band"
