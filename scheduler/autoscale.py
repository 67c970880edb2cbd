"""The autoscaler: feeds the pure planner with live measurements and drives an actuator.

Inputs, per pool, over a sliding window (`window_s`):
* TTFT (prefill pool) and TPOT (decode pool) as the clients saw them: the frontend reports
  each request's TTFT when its first token leaves, and its TPOT when it ends
  (`Scheduler.Report`), so the SLO is judged on what users get, not on engine internals;
  the TTFT of a request a decode worker prefilled itself is not the prefill pool's;
* requests routed per second, mean prompt and output lengths;
* from the workers' heartbeats: requests waiting, prefill tokens queued, KV usage.

Each tick: the actuator refreshes (drains progress, the current scale is read), the planner
decides, every decision is logged (and appended to `record_path` as JSON lines, which
`pdserve planner-dryrun --trace` replays), metrics are exported, and the actuator applies
the desired counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import asdict
from typing import Callable

from scheduler import metrics as SM
from scheduler.config import AutoscaleConfig
from scheduler.actuators import (Actuator, KubernetesActuator, KubernetesTarget, LocalActuator,
                                 LocalConfig, MetricsOnlyActuator)
from scheduler.planner import POOLS, Decision, Planner, PlannerInput, PoolMetrics, SlidingWindow
from scheduler.state import Registry

log = logging.getLogger(__name__)


def build_actuator(cfg: AutoscaleConfig, scheduler_address: str, host: str) -> Actuator:
    if cfg.mode == "metrics":
        return MetricsOnlyActuator()
    if cfg.mode == "kubernetes":
        return KubernetesActuator.from_cluster(KubernetesTarget(
            cfg.k8s_namespace, {"prefill": cfg.k8s_prefill_deployment,
                                "decode": cfg.k8s_decode_deployment}))
    if cfg.mode == "local":
        if not cfg.worker_args:
            raise ValueError("the local actuator needs --autoscale-worker-args (at least "
                             "--model)")
        return LocalActuator(LocalConfig(
            worker_args=cfg.worker_args, scheduler_address=scheduler_address, host=host,
            cores={"prefill": tuple(cfg.prefill_cores), "decode": tuple(cfg.decode_cores)},
            base_replicas={"prefill": cfg.base_replicas[0], "decode": cfg.base_replicas[1]},
            drain_timeout_s=cfg.drain_timeout_s,
            pool_args={"prefill": cfg.prefill_worker_args,
                       "decode": cfg.decode_worker_args}))
    raise ValueError(f"no actuator for autoscale mode {cfg.mode!r}")


class Autoscaler:
    def __init__(self, cfg: AutoscaleConfig, reg: Registry, actuator: Actuator,
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.reg = reg
        self.actuator = actuator
        self.clock = clock
        self.planner = Planner(cfg.planner)
        w = cfg.window_s
        self.latency = {"prefill": SlidingWindow(w), "decode": SlidingWindow(w)}
        self.routes = {"prefill": SlidingWindow(w), "decode": SlidingWindow(w)}
        self.input_tokens = SlidingWindow(w)
        self.output_tokens = SlidingWindow(w)
        self.registered_at: dict[str, float] = {}
        self.last: Decision | None = None
        self._last_codes: dict[str, str] = {}
        self._record = open(cfg.record_path, "a") if cfg.record_path else None
        for pool in POOLS:
            pol = getattr(cfg.planner, pool)
            SM.PLANNER_SLO.labels(pool).set(pol.target_ms / 1e3)

    # ------------------------------------------------------------ observations
    def observe_route(self, now: float, mode: str, prompt_tokens: int) -> None:
        if mode == "disagg":
            self.routes["prefill"].add(now, 1)
        self.routes["decode"].add(now, 1)
        self.input_tokens.add(now, prompt_tokens)

    def observe_report(self, now: float, ttft_ms: float, tpot_ms: float,
                       output_tokens: int, local: bool = False) -> None:
        """`local`: the decode worker prefilled the request itself. Its TTFT is then the
        decode engine's doing (a wait for a slot beside its streams, its own chunks) and
        says nothing of the prefill pool: counted there, a decode burst served by local
        prefills scaled the prefill pool up (seen in tests/e2e/test_autoscale.py). The
        decode pool answers for it through its TPOT and queue."""
        if ttft_ms > 0 and not local:
            self.latency["prefill"].add(now, ttft_ms)
        if tpot_ms > 0 and output_tokens > 1:
            self.latency["decode"].add(now, tpot_ms)
        if output_tokens > 0:
            self.output_tokens.add(now, output_tokens)

    # ------------------------------------------------------------ one tick
    def _newest_age(self, pool: str, now: float) -> float:
        if self.actuator.starting(pool):
            return 0.0
        ages = [now - self.registered_at.setdefault(w.worker_id, now)
                for w in self.reg.live(pool)]
        return min(ages) if ages else math.inf

    def inputs(self, now: float) -> PlannerInput:
        metrics: dict[str, PoolMetrics | None] = {}
        live = {w.worker_id for w in self.reg.workers.values()}
        self.registered_at = {k: v for k, v in self.registered_at.items() if k in live}
        for pool in POOLS:
            ws = self.reg.live(pool)
            win = self.latency[pool]
            metrics[pool] = PoolMetrics(
                latency_p90_ms=win.percentile(now, 90),
                queue_depth=sum(w.load.waiting for w in ws),
                prefill_tokens_waiting=sum(w.queued_prefill_tokens() for w in ws)
                if pool == "prefill" else 0,
                kv_usage=(sum(w.kv_usage() for w in ws) / len(ws)) if ws else 0.0,
                request_rate=self.routes[pool].rate(now),
                samples=win.count(now),
                mean_input_tokens=self.input_tokens.mean(now),
                mean_output_tokens=self.output_tokens.mean(now))
        return PlannerInput(
            now=now,
            replicas={p: self.actuator.current(p, self.reg) for p in POOLS},
            metrics=metrics,
            newest_replica_age_s={p: self._newest_age(p, now) for p in POOLS})

    async def tick(self) -> Decision:
        now = self.clock()
        await self.actuator.refresh(self.reg, now)
        inp = self.inputs(now)
        d = self.planner.tick(inp)
        self.last = d
        for pool in POOLS:
            SM.PLANNER_DESIRED.labels(pool).set(d.desired[pool])
            SM.PLANNER_ACTUAL.labels(pool).set(len(self.reg.live(pool, routable=True)))
            SM.PLANNER_DECISIONS.labels(pool, d.actions[pool]).inc()
            SM.PLANNER_REASON.labels(pool).state(d.codes[pool])
            m = inp.metrics[pool]
            if m is not None and m.latency_p90_ms is not None:
                SM.PLANNER_LATENCY.labels(pool).set(m.latency_p90_ms / 1e3)
            SM.PLANNER_RATE.labels(pool).set(m.request_rate if m else 0.0)
        # every decision that differs from the last one is logged (a scale action, or a
        # new reason); the full tick-by-tick record goes to record_path
        prev = self._last_codes
        self._last_codes = dict(d.codes)
        changed = any(a != "hold" for a in d.actions.values()) or d.codes != prev
        log.log(logging.INFO if changed else logging.DEBUG,
                "planner: prefill %d->%d (%s); decode %d->%d (%s)",
                inp.replicas["prefill"], d.desired["prefill"], d.reasons["prefill"],
                inp.replicas["decode"], d.desired["decode"], d.reasons["decode"])
        if self._record is not None:
            self._record.write(json.dumps(record(inp, d)) + "\n")
            self._record.flush()
        for pool in POOLS:
            if d.desired[pool] != inp.replicas[pool] or self.actuator.kind == "kubernetes":
                await self.actuator.apply(pool, d.desired[pool], d.reasons[pool], self.reg)
        return d

    def pools_up(self) -> bool:
        return all(len(self.reg.live(p)) >= getattr(self.cfg.planner, p).min_replicas
                   for p in POOLS)

    async def run(self) -> None:
        log.info("autoscaler: %s actuator, tick %.1fs, window %.0fs, %s", self.actuator.kind,
                 self.cfg.interval_s, self.cfg.window_s, self.cfg.planner)
        # Start-up: workers take a while to load and register. Until every pool has reached
        # its minimum (or startup_grace_s passed), an empty pool means "not registered
        # yet", not "scale me up".
        t0 = self.clock()
        while not self.pools_up() and self.clock() - t0 < self.cfg.startup_grace_s:
            await asyncio.sleep(min(1.0, self.cfg.interval_s))
        log.info("autoscaler: planning from now on (%s)",
                 "every pool is up" if self.pools_up() else
                 f"start-up grace {self.cfg.startup_grace_s:.0f}s passed")
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad tick must not stop autoscaling
                log.exception("autoscaler tick failed")

    async def close(self) -> None:
        await self.actuator.close()
        if self._record is not None:
            self._record.close()


def record(inp: PlannerInput, d: Decision) -> dict:
    """One JSON-lines record: what the planner saw and what it decided."""
    return {"t": inp.now, "replicas": inp.replicas,
            "metrics": {p: (asdict(m) if m is not None else None)
                        for p, m in inp.metrics.items()},
            "newest_replica_age_s": {p: (a if math.isfinite(a) else None)
                                     for p, a in inp.newest_replica_age_s.items()},
            "desired": d.desired, "actions": d.actions, "codes": d.codes,
            "reasons": d.reasons}
