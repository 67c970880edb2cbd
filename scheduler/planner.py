"""Per-pool autoscaling planner: a pure state machine (no I/O; time is an input).

Each tick takes measured inputs per pool (latency percentile over a window, queue depth,
prefill tokens waiting, KV usage, request rate, input/output lengths) and the current
replica counts, and returns the desired replica count for the prefill pool and the decode
pool, independently, with a reason for each. The prefill pool is judged on TTFT and the
decode pool on TPOT, each against the user's SLO (p90 by default).

Policy, per pool:
* No measurement at all (`metrics` is None: the pipeline that feeds us is broken or has not
  started): hold ("no_metrics"). Missing data never scales anything.
* Out of [min, max]: move inside at once ("bounds").
* Above the SLO (p90 > up_ratio x target) over at least `min_samples_up` samples (one slow
  request in a quiet window is not a breach: "few_samples"), and the last scale-up was at least
  `up_cooldown_s` ago: add replicas in proportion to the overshoot
  (ceil(replicas x p90 / target) - replicas), at least 1 and at most `max_step_up`.
* Well below the SLO (p90 < down_ratio x target), or idle (a measured window with no
  requests and nothing queued), on `down_ticks` consecutive ticks, the last change at least
  `down_cooldown_s` ago, and the newest replica older than `warmup_grace_s` (a short lull
  does not kill a replica that has just warmed up): remove one replica.
* Requests are in flight but none completed in the window yet (queue but no latency): hold.
* In between: hold. The gap between up_ratio and down_ratio is the hysteresis.

Every decision carries an action ("up", "down", "hold"), a short reason code (a bounded
set, safe as a Prometheus label) and a human-readable reason for the log.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

POOLS = ("prefill", "decode")
SIGNAL = {"prefill": "TTFT", "decode": "TPOT"}

# reason codes (bounded: exported as a Prometheus enum)
REASONS = ("no_metrics", "bounds", "slo_breach", "at_max", "up_cooldown", "in_flight",
           "low", "idle", "at_min", "down_cooldown", "warmup_grace", "band", "few_samples")


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
    min_samples_up: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.down_ratio < self.up_ratio:
            raise ValueError("need 0 < down_ratio < up_ratio (the hysteresis band)")
        if self.down_ticks < 1 or self.max_step_up < 1 or self.min_samples_up < 1:
            raise ValueError("down_ticks, max_step_up and min_samples_up must be at least 1")
        if min(self.up_cooldown_s, self.down_cooldown_s, self.warmup_grace_s) < 0:
            raise ValueError("cooldowns and the warm-up grace must not be negative")


@dataclass(frozen=True)
class PoolMetrics:
    latency_p90_ms: float | None      # TTFT (prefill) or TPOT (decode) p90 over the window
    queue_depth: int = 0              # requests waiting in the pool's engines
    prefill_tokens_waiting: int = 0
    kv_usage: float = 0.0             # mean over the pool's replicas, 0..1
    request_rate: float = 0.0         # requests/s routed to the pool over the window
    samples: int | None = None        # latency samples in the window; None: not counted
                                      # (a modelled percentile, as in the dry-run simulator)
    mean_input_tokens: float = 0.0
    mean_output_tokens: float = 0.0

    @property
    def idle(self) -> bool:
        return (self.latency_p90_ms is None and self.request_rate == 0
                and self.queue_depth == 0 and self.prefill_tokens_waiting == 0)


@dataclass(frozen=True)
class PlannerInput:
    now: float
    replicas: dict[str, int]                          # current, per pool
    metrics: dict[str, PoolMetrics | None]            # per pool; None: nothing measured
    newest_replica_age_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    desired: dict[str, int]
    reasons: dict[str, str]                           # human-readable, for the log
    actions: dict[str, str] = field(default_factory=dict)   # "up" | "down" | "hold"
    codes: dict[str, str] = field(default_factory=dict)     # one of REASONS


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
        desired, reasons, actions, codes = {}, {}, {}, {}
        for pool in POOLS:
            cur = inp.replicas.get(pool, 0)
            new, code, why = self._pool(pool, inp)
            desired[pool], codes[pool], reasons[pool] = new, code, why
            actions[pool] = "up" if new > cur else "down" if new < cur else "hold"
        return Decision(desired, reasons, actions, codes)

    def _pool(self, pool: str, inp: PlannerInput) -> tuple[int, str, str]:
        cfg, st = self.cfg, self.state[pool]
        pol: PoolPolicy = getattr(cfg, pool)
        cur = inp.replicas.get(pool, 0)
        if cur < pol.min_replicas or cur > pol.max_replicas:
            st.last_change = inp.now
            new = min(max(cur, pol.min_replicas), pol.max_replicas)
            return new, "bounds", f"bounds: {cur} outside [{pol.min_replicas}, " \
                                  f"{pol.max_replicas}]"
        m = inp.metrics.get(pool)
        if m is None:
            st.below = 0
            return cur, "no_metrics", "no metrics: hold"
        if m.latency_p90_ms is None:
            if not m.idle:      # requests in flight, none finished in the window yet
                st.below = 0
                return cur, "in_flight", (f"no {SIGNAL[pool]} sample yet, {m.queue_depth} "
                                          f"queued: hold")
            ratio = 0.0
            obs = "idle (no requests in the window)"
        else:
            ratio = m.latency_p90_ms / pol.target_ms
            obs = (f"{SIGNAL[pool]} p90 {m.latency_p90_ms:.0f} ms vs SLO "
                   f"{pol.target_ms:.0f} ms")
        if ratio > cfg.up_ratio:
            st.below = 0
            if m.samples is not None and m.samples < cfg.min_samples_up:
                return cur, "few_samples", (f"{obs} over {m.samples} sample(s), fewer than "
                                            f"{cfg.min_samples_up}: hold")
            if cur >= pol.max_replicas:
                return cur, "at_max", f"{obs}: at max {pol.max_replicas}"
            if inp.now - st.last_up < cfg.up_cooldown_s:
                return cur, "up_cooldown", f"{obs}: scale-up cooldown"
            step = max(1, min(cfg.max_step_up, math.ceil(max(cur, 1) * ratio) - cur,
                              pol.max_replicas - cur))
            st.last_up = st.last_change = inp.now
            return cur + step, "slo_breach", f"{obs}: scale up by {step}"
        if ratio < cfg.down_ratio:
            st.below += 1
            code = "idle" if m.latency_p90_ms is None else "low"
            if cur <= pol.min_replicas:
                return cur, "at_min", f"{obs}: at min {pol.min_replicas}"
            if st.below < cfg.down_ticks:
                return cur, code, f"{obs}: low for {st.below}/{cfg.down_ticks} ticks"
            if inp.now - st.last_change < cfg.down_cooldown_s:
                return cur, "down_cooldown", f"{obs}: scale-down cooldown"
            if inp.newest_replica_age_s.get(pool, math.inf) < cfg.warmup_grace_s:
                return cur, "warmup_grace", f"{obs}: newest replica still in its warm-up grace"
            st.last_change = inp.now
            st.below = 0
            return cur - 1, code, f"{obs}: scale down by 1"
        st.below = 0
        return cur, "band", f"{obs}: within band"


def nearest_rank(values, q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None if there are none."""
    v = sorted(values)
    if not v:
        return None
    return v[max(1, math.ceil(q / 100 * len(v))) - 1]


class SlidingWindow:
    """Samples over the last `window_s` seconds; time is passed in (pure)."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window must be positive")
        self.window_s = window_s
        self._q: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._q.append((now, value))
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._q and now - self._q[0][0] > self.window_s:
            self._q.popleft()

    def values(self, now: float) -> list[float]:
        self._prune(now)
        return [v for _, v in self._q]

    def count(self, now: float) -> int:
        self._prune(now)
        return len(self._q)

    def rate(self, now: float) -> float:
        return self.count(now) / self.window_s

    def mean(self, now: float) -> float:
        v = self.values(now)
        return sum(v) / len(v) if v else 0.0

    def percentile(self, now: float, q: float) -> float | None:
        """Nearest-rank percentile (q in 0..100) of the window's samples; None if empty."""
        return nearest_rank(self.values(now), q)
