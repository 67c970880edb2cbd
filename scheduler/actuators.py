"""Actuators: what makes the planner's desired replica counts real. One interface, three kinds.

* `MetricsOnlyActuator`: only remembers the target; the autoscaler exports it as
  `pdserve_planner_desired_replicas{pool}` for an HPA or KEDA to act on
  (deploy/k8s/autoscaling/).
* `KubernetesActuator`: patches the scale subresource of the prefill and decode
  Deployments through the official kubernetes client.
* `LocalActuator`: starts and stops `pdserve prefill|decode` processes on this host, on
  the pool's cores, and drains before it stops (no new requests; in-flight requests and the
  KV blocks held for them finish; then SIGTERM, which drains again inside the worker).

The autoscaler calls `refresh()` once per tick (progress drains, read the current scale),
then `current(pool)` for the replica count the planner starts from, then `apply()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pdserve import procs
from scheduler.state import Registry, Worker

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")


class Actuator(Protocol):
    kind: str

    async def refresh(self, reg: Registry, now: float) -> None: ...

    def current(self, pool: str, reg: Registry) -> int: ...

    def starting(self, pool: str) -> int: ...

    async def apply(self, pool: str, desired: int, reason: str, reg: Registry) -> None: ...

    async def close(self) -> None: ...


def routable(reg: Registry, pool: str) -> list[Worker]:
    return reg.live(pool, routable=True)


# ---------------------------------------------------------------------------- metrics-only

class MetricsOnlyActuator:
    """Keeps the target; something else (HPA/KEDA on the exported gauge) acts on it."""
    kind = "metrics"

    def __init__(self) -> None:
        self.target: dict[str, int] = {}

    async def refresh(self, reg: Registry, now: float) -> None:
        for pool in POOLS:
            self.target.setdefault(pool, len(routable(reg, pool)))

    def current(self, pool: str, reg: Registry) -> int:
        return self.target.get(pool, len(routable(reg, pool)))

    def starting(self, pool: str) -> int:
        return 0

    async def apply(self, pool: str, desired: int, reason: str, reg: Registry) -> None:
        self.target[pool] = desired

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------- kubernetes

@dataclass(frozen=True)
class KubernetesTarget:
    namespace: str
    deployments: dict[str, str]          # pool -> Deployment name


class KubernetesActuator:
    """Reads and patches `apps/v1 Deployment/scale` (the scale subresource).

    `api` is a `kubernetes.client.AppsV1Api`; `from_cluster()` builds one from the pod's
    service account (in cluster) or the local kubeconfig. The Deployments' pods drain on
    SIGTERM by themselves (the worker deregisters, finishes in-flight requests and the KV
    blocks held for them, then exits; see `--drain-timeout-s`), so scaling down needs no
    more than lowering `spec.replicas` with a long enough terminationGracePeriodSeconds.
    """
    kind = "kubernetes"

    def __init__(self, target: KubernetesTarget, api) -> None:
        self.t = target
        self.api = api
        self.spec: dict[str, int] = {}       # last read spec.replicas per pool
        self.status: dict[str, int] = {}     # last read status.replicas per pool

    @classmethod
    def from_cluster(cls, target: KubernetesTarget) -> "KubernetesActuator":
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(target, client.AppsV1Api())

    def _read(self, pool: str) -> None:
        scale = self.api.read_namespaced_deployment_scale(self.t.deployments[pool],
                                                          self.t.namespace)
        self.spec[pool] = int(scale.spec.replicas or 0)
        self.status[pool] = int(getattr(scale.status, "replicas", 0) or 0)

    async def refresh(self, reg: Registry, now: float) -> None:
        for pool in POOLS:
            try:
                await asyncio.to_thread(self._read, pool)
            except Exception as e:  # noqa: BLE001 - the API server is a peer; keep planning
                log.warning("kubernetes: reading the scale of %s/%s failed: %s",
                            self.t.namespace, self.t.deployments[pool], e)

    def current(self, pool: str, reg: Registry) -> int:
        return self.spec.get(pool, len(routable(reg, pool)))

    def starting(self, pool: str) -> int:
        return 0

    def _patch(self, pool: str, desired: int) -> None:
        # JSON Patch: replace exactly one field, whatever else the object holds
        self.api.patch_namespaced_deployment_scale(
            self.t.deployments[pool], self.t.namespace,
            [{"op": "replace", "path": "/spec/replicas", "value": int(desired)}])
        self.spec[pool] = desired

    async def apply(self, pool: str, desired: int, reason: str, reg: Registry) -> None:
        if desired == self.spec.get(pool):
            return
        try:
            await asyncio.to_thread(self._patch, pool, desired)
            log.info("kubernetes: scaled %s/%s to %d (%s)", self.t.namespace,
                     self.t.deployments[pool], desired, reason)
        except Exception as e:  # noqa: BLE001
            log.error("kubernetes: scaling %s/%s to %d failed: %s", self.t.namespace,
                      self.t.deployments[pool], desired, e)

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------- local

@dataclass(frozen=True)
class LocalConfig:
    worker_args: str                     # engine flags for `pdserve prefill|decode`
    scheduler_address: str
    host: str = "127.0.0.1"
    cores: dict[str, tuple[str, ...]] = field(default_factory=dict)   # pool -> its cores
    base_replicas: dict[str, int] = field(default_factory=dict)      # started by others
    drain_timeout_s: float = 120.0
    stop_grace_s: float = 30.0
    python: str = sys.executable
    pool_args: dict[str, str] = field(default_factory=dict)   # pool -> its own extra flags


@dataclass
class Managed:
    worker_id: str
    pool: str
    core: str
    proc: subprocess.Popen
    started: float
    state: str = "starting"     # starting -> running -> draining -> stopping
    since: float = 0.0
    seq: int = 0


class LocalActuator:
    """Starts and stops worker processes on this host.

    New replicas go on the pool's least used core (the pools never share a core: see
    `pdserve.launcher.assign_cores`). Scale-down takes the newest replica this actuator
    started: the scheduler stops routing to it (drain), and once it has no booked or
    running requests and holds no KV blocks for a decode worker, it gets SIGTERM (the worker
    deregisters and drains again by itself), then SIGKILL after `stop_grace_s`. Replicas it
    did not start (the launcher's, or ones started by hand) are counted, never stopped.
    Its children die with the scheduler (PR_SET_PDEATHSIG).
    """
    kind = "local"

    def __init__(self, cfg: LocalConfig, clock: Callable[[], float] = time.monotonic,
                 spawn: Callable[[list[str]], subprocess.Popen] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self._spawn = spawn or procs.spawn   # never a preexec_fn here (pdserve/procs.py)
        self.managed: dict[str, Managed] = {}
        self._per_pool = {p: 0 for p in POOLS}

    # -- views
    def _mine(self, pool: str, *states: str) -> list[Managed]:
        return [m for m in self.managed.values() if m.pool == pool and m.state in states]

    def current(self, pool: str, reg: Registry) -> int:
        others = [w for w in routable(reg, pool) if w.worker_id not in self.managed]
        return len(others) + len(self._mine(pool, "starting", "running"))

    def starting(self, pool: str) -> int:
        return len(self._mine(pool, "starting"))

    def _pick_core(self, pool: str) -> str:
        cores = list(self.cfg.cores.get(pool) or ("0",))
        use = {c: 0 for c in cores}
        for i in range(self.cfg.base_replicas.get(pool, 0)):   # the launcher's round-robin
            use[cores[i % len(cores)]] += 1
        for m in self.managed.values():
            if m.pool == pool and m.core in use:
                use[m.core] += 1
        return min(cores, key=lambda c: (use[c], cores.index(c)))

    def argv(self, pool: str, worker_id: str, core: str) -> list[str]:
        return [self.cfg.python, "-m", "pdserve.cli", pool, "--worker-id", worker_id,
                "--cores", core, "--scheduler", self.cfg.scheduler_address,
                "--host", self.cfg.host, *shlex.split(self.cfg.worker_args),
                *shlex.split(self.cfg.pool_args.get(pool, ""))]   # the last flag counts

    # -- actions
    async def apply(self, pool: str, desired: int, reason: str, reg: Registry) -> None:
        cur = self.current(pool, reg)
        now = self.clock()
        for _ in range(desired - cur):
            self._per_pool[pool] += 1
            wid = f"{pool}-auto{self._per_pool[pool]}"
            core = self._pick_core(pool)
            proc = self._spawn(self.argv(pool, wid, core))
            self.managed[wid] = Managed(wid, pool, core, proc, now, since=now,
                                        seq=self._per_pool[pool])
            log.info("local: started %s on core %s (pid %d): %s", wid, core, proc.pid, reason)
        if desired < cur:
            victims = sorted(self._mine(pool, "running", "starting"),
                             key=lambda m: m.seq, reverse=True)[:cur - desired]
            if len(victims) < cur - desired:
                log.warning("local: %s pool wants %d fewer replicas; only %d were started "
                            "here and can be stopped", pool, cur - desired, len(victims))
            for m in victims:
                if m.state == "starting":     # never served anything: stop it now
                    self._stop(m, now, "scale-down before it registered")
                    continue
                w = reg.workers.get(m.worker_id)
                if w is not None:
                    w.draining = True
                m.state, m.since = "draining", now
                log.info("local: draining %s: %s", m.worker_id, reason)

    def _stop(self, m: Managed, now: float, why: str) -> None:
        _signal_group(m.proc, signal.SIGTERM)
        m.state, m.since = "stopping", now
        log.info("local: stopping %s (pid %d): %s", m.worker_id, m.proc.pid, why)

    async def refresh(self, reg: Registry, now: float) -> None:
        for m in list(self.managed.values()):
            w = reg.workers.get(m.worker_id)
            if m.proc.poll() is not None:
                if m.state != "stopping":
                    log.error("local: %s exited unexpectedly (code %s)", m.worker_id,
                              m.proc.returncode)
                else:
                    log.info("local: %s stopped (code %s)", m.worker_id, m.proc.returncode)
                del self.managed[m.worker_id]
                continue
            if m.state == "starting" and w is not None:
                m.state, m.since = "running", now
                log.info("local: %s registered after %.1fs", m.worker_id, now - m.started)
            elif m.state == "draining":
                if w is not None:
                    w.draining = True         # a re-registration must not undo the drain
                if w is None or _idle(w):
                    self._stop(m, now, "drained")
                elif now - m.since > self.cfg.drain_timeout_s:
                    self._stop(m, now, f"drain timeout {self.cfg.drain_timeout_s:.0f}s")
            elif m.state == "stopping" and now - m.since > self.cfg.stop_grace_s:
                log.warning("local: %s did not stop in %.0fs; killing", m.worker_id,
                            self.cfg.stop_grace_s)
                _signal_group(m.proc, signal.SIGKILL)

    async def close(self) -> None:
        now = self.clock()
        for m in self.managed.values():
            if m.proc.poll() is None and m.state != "stopping":
                self._stop(m, now, "autoscaler shutting down")
        deadline = time.monotonic() + self.cfg.stop_grace_s
        for m in self.managed.values():
            while m.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            _signal_group(m.proc, signal.SIGKILL)
        self.managed.clear()


def _idle(w: Worker) -> bool:
    """Nothing booked, nothing running or queued, no KV blocks held for (or loading from)
    a peer: stopping it now loses nothing."""
    ld = w.load
    return (w.booked_requests == 0 and ld.running == 0 and ld.waiting == 0
            and ld.kv_leases_held == 0)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)       # the engine-core grandchild goes with it
    except (ProcessLookupError, PermissionError):
        pass
