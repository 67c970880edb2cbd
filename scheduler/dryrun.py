"""Dry run: replay a load trace through the planner, print the replica timeline, plot it.

Two sources:

* `--trace FILE`: the JSON lines a scheduler wrote with `--planner-record`. Each line holds
  what the planner saw (per-pool p90, queue, rate, ...) and the replicas at the time. The
  replay keeps the simulated replica counts and scales each recorded latency by
  recorded replicas / simulated replicas: a first-order "latency follows load per replica"
  model. It is meant for tuning SLOs, cooldowns and bounds offline, not as a forecast.
* `--synthetic SHAPE`: a load shape (requests/s, prompt and output lengths over time) run
  through a small capacity model with the simulated replicas in the loop:
  - prefill: utilisation rho = rate x ISL / (replicas x prefill_tok_s); TTFT p90 =
    service time x (1 + rho / (2 (1 - rho))) (M/D/1 waiting), and 10x the SLO when rho >= 1;
  - decode: each replica runs rate x OSL x TPOT / replicas sequences, a step costs
    decode_step_ms + decode_step_ms_per_seq x running, so
    TPOT = step / (1 - per_seq x rate x OSL / replicas), and 10x the SLO when saturated.
  New replicas serve one tick after the planner asks for them.
  The role planner (scheduler/roles.py) runs in the loop too: decode pressure is the TPOT
  p90 over 0.9 x the TPOT SLO (and the same were a mixed worker to stop decoding), prefill
  pressure the TTFT p90's queueing part over the TTFT SLO; a mixed worker counts as half a
  prefill and half a decode replica. Its flips are in
  the timeline ("roles: ...").
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from scheduler.planner import POOLS, Planner, PlannerConfig, PlannerInput, PoolMetrics
from scheduler.roles import RolePlanner, RolePlannerConfig, Signals


@dataclass
class Step:
    t: float
    rate: float
    isl: float
    osl: float
    latency: dict[str, float | None]
    replicas: dict[str, int]
    desired: dict[str, int]
    reasons: dict[str, str]
    mixed: int = 0                # prefill workers in the mixed role
    role_change: str = ""


def synthetic_load(shape: str, t: float, duration: float, rng: random.Random):
    """(requests/s, input tokens, output tokens) at time t."""
    frac = t / duration
    jitter = 1 + rng.uniform(-0.05, 0.05)
    if shape == "spike":                      # long prompts burst in the middle third
        if 1 / 3 <= frac < 2 / 3:
            return 1.2 * jitter, 1800, 64
        return 0.2 * jitter, 512, 64
    if shape == "decode-heavy":               # short prompts, long answers
        if 1 / 3 <= frac < 2 / 3:
            return 1.0 * jitter, 64, 600
        return 0.2 * jitter, 64, 100
    if shape == "diurnal":
        return (0.2 + 0.5 * (1 - math.cos(2 * math.pi * frac))) * jitter, 800, 128
    if shape == "flap":                       # alternates every 30 s
        return (1.2 if int(t // 30) % 2 == 0 else 0.05) * jitter, 1024, 64
    raise ValueError(f"unknown synthetic shape {shape!r}")


def model_latency(pool: str, rate: float, isl: float, osl: float, replicas: int, ns,
                  slo_ms: float) -> float | None:
    if rate <= 0:
        return None
    if replicas <= 0:
        return 10 * slo_ms
    if pool == "prefill":
        service_ms = isl / ns.prefill_tok_s * 1e3
        rho = rate * isl / (replicas * ns.prefill_tok_s)
        if rho >= 1:
            return 10 * slo_ms
        return service_ms * (1 + rho / (2 * (1 - rho)))
    load = ns.decode_step_ms_per_seq / 1e3 * rate * osl / replicas
    if load >= 1:
        return 10 * slo_ms
    return ns.decode_step_ms / (1 - load)


def simulate(ns, cfg: PlannerConfig, roles_cfg: RolePlannerConfig | None = None) -> list[Step]:
    planner = Planner(cfg)
    roles = RolePlanner(roles_cfg) if roles_cfg is not None else None
    rng = random.Random(ns.seed)
    replicas = {"prefill": ns.start_prefill, "decode": ns.start_decode}
    born = {p: -math.inf for p in POOLS}
    mixed = 0
    steps = []
    t = 0.0
    while t <= ns.duration_s:
        rate, isl, osl = synthetic_load(ns.synthetic, t, ns.duration_s, rng)
        share = {"prefill": replicas["prefill"] - 0.5 * mixed,
                 "decode": replicas["decode"] + 0.5 * mixed}
        lat = {p: model_latency(p, rate, isl, osl, share[p], ns,
                                getattr(cfg, p).target_ms) for p in POOLS}
        change = ""
        if roles is not None:
            # the decode TPOT were a mixed worker to stop decoding, or one more to start
            tpot = [model_latency("decode", rate, isl, osl, share["decode"] + extra, ns,
                                  cfg.decode.target_ms) or 0.0 for extra in (-0.5, 0.5)]
            after = tpot[0] if mixed else math.inf
            more = tpot[1] if replicas["prefill"] > mixed else math.inf
            mixed, change = _roles_tick(roles, t, lat, after, more, isl, ns, cfg,
                                        replicas["prefill"], mixed)
        metrics = {p: PoolMetrics(latency_p90_ms=lat[p], request_rate=rate,
                                  mean_input_tokens=isl, mean_output_tokens=osl)
                   for p in POOLS}
        d = planner.tick(PlannerInput(t, dict(replicas), metrics,
                                      {p: t - born[p] for p in POOLS}))
        steps.append(Step(t, rate, isl, osl, lat, dict(replicas), d.desired, d.reasons, mixed,
                          change))
        for p in POOLS:
            if d.desired[p] > replicas[p]:
                born[p] = t
            replicas[p] = d.desired[p]
        mixed = min(mixed, replicas["prefill"])
        t += ns.tick_s
    return steps


def _roles_tick(roles: RolePlanner, t: float, lat: dict, after: float, more: float,
                isl: float, ns, cfg: PlannerConfig, n_prefill: int, mixed: int
                ) -> tuple[int, str]:
    tpot, ttft = lat["decode"] or 0.0, lat["prefill"] or 0.0
    queueing = max(0.0, ttft - isl / ns.prefill_tok_s * 1e3)
    allow = 0.9 * cfg.decode.target_ms
    sig = Signals(tpot / allow, queueing / cfg.prefill.target_ms,
                  {f"prefill-{i}": "mixed" if i < mixed else "prefill"
                   for i in range(n_prefill)}, after / allow,
                  (tpot - more) / allow, (after - tpot) / allow)
    for f in roles.tick(t, sig):
        mixed += 1 if f.role == "mixed" else -1
        return mixed, f"{f.worker_id} -> {f.role} ({f.reason})"
    return mixed, ""


def replay(path: str, cfg: PlannerConfig) -> list[Step]:
    planner = Planner(cfg)
    recs = [json.loads(line) for line in open(path) if line.strip()]
    if not recs:
        raise ValueError(f"{path}: no records")
    replicas = dict(recs[0]["replicas"])
    born = {p: -math.inf for p in POOLS}
    steps = []
    for r in recs:
        t = float(r["t"])
        metrics: dict[str, PoolMetrics | None] = {}
        lat: dict[str, float | None] = {}
        for p in POOLS:
            m = r["metrics"].get(p)
            if m is None:
                metrics[p], lat[p] = None, None
                continue
            v = m.get("latency_p90_ms")
            if v is not None and replicas[p] > 0:
                v = v * max(1, r["replicas"][p]) / replicas[p]
            lat[p] = v
            metrics[p] = PoolMetrics(**{**m, "latency_p90_ms": v})
        d = planner.tick(PlannerInput(t, dict(replicas), metrics,
                                      {p: t - born[p] for p in POOLS}))
        m0 = r["metrics"].get("decode") or {}
        steps.append(Step(t, m0.get("request_rate", 0.0), m0.get("mean_input_tokens", 0.0),
                          m0.get("mean_output_tokens", 0.0), lat, dict(replicas), d.desired,
                          d.reasons))
        for p in POOLS:
            if d.desired[p] > replicas[p]:
                born[p] = t
            replicas[p] = d.desired[p]
    return steps


def print_timeline(steps: list[Step], out=None) -> None:
    import sys
    out = out or sys.stdout
    print(f"{'t(s)':>7} {'req/s':>6} {'ISL':>5} {'OSL':>5} | {'TTFT p90':>9} {'P':>2} | "
          f"{'TPOT p90':>9} {'D':>2} | changes", file=out)
    last = None
    for s in steps:
        change = [f"{p} {s.replicas[p]}->{s.desired[p]} ({s.reasons[p]})" for p in POOLS
                  if s.desired[p] != s.replicas[p]]
        if s.role_change:
            change.append(f"roles: {s.role_change}")
        row = (s.replicas["prefill"], s.replicas["decode"])
        if change or row != last or s is steps[-1]:
            f = lambda v: "-" if v is None else f"{v:.0f} ms"  # noqa: E731
            print(f"{s.t:7.0f} {s.rate:6.2f} {s.isl:5.0f} {s.osl:5.0f} | "
                  f"{f(s.latency['prefill']):>9} {s.replicas['prefill']:>2} | "
                  f"{f(s.latency['decode']):>9} {s.replicas['decode']:>2} | "
                  f"{'; '.join(change)}", file=out)
        last = row


def plot(steps: list[Step], cfg: PlannerConfig, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in steps]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(t, [s.rate for s in steps], color="black")
    axes[0].set_ylabel("requests/s")
    axes[0].set_title(title)
    for ax, pool, color in ((axes[1], "prefill", "tab:blue"), (axes[2], "decode", "tab:red")):
        lat = [s.latency[pool] if s.latency[pool] is not None else float("nan") for s in steps]
        ax.plot(t, lat, color=color, label=f"{'TTFT' if pool == 'prefill' else 'TPOT'} p90")
        ax.axhline(getattr(cfg, pool).target_ms, color=color, ls="--", lw=0.8, label="SLO")
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax2 = ax.twinx()
        ax2.step(t, [s.replicas[pool] for s in steps], where="post", color="gray",
                 label=f"{pool} replicas")
        ax2.set_ylabel(f"{pool} replicas")
        ax2.set_ylim(0, getattr(cfg, pool).max_replicas + 1)
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(ns, cfg: PlannerConfig, roles_cfg: RolePlannerConfig | None = None) -> int:
    if ns.trace:
        steps = replay(ns.trace, cfg)
        title = f"replay of {ns.trace}"
    else:
        steps = simulate(ns, cfg, roles_cfg)
        title = f"synthetic '{ns.synthetic}' load"
    print_timeline(steps)
    for p in POOLS:
        counts = [s.replicas[p] for s in steps]
        print(f"{p}: replicas min {min(counts)} max {max(counts)}, "
              f"{sum(1 for a, b in zip(counts, counts[1:]) if b != a)} changes")
    if roles_cfg is not None and not ns.trace:
        print(f"roles: {sum(1 for s in steps if s.role_change)} changes, at most "
              f"{max(s.mixed for s in steps)} mixed")
    if ns.plot:
        plot(steps, cfg, ns.plot, title)
        print(f"plot: {ns.plot}")
    return 0
