"""The scheduler's configuration: placement, roles, the autoscaling planner and its
actuator."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.planner import PlannerConfig
from scheduler.policy import PlacementConfig
from scheduler.roles import RolePlannerConfig


@dataclass(frozen=True)
class AutoscaleConfig:
    """The planner in the scheduler and the actuator that realises its decisions."""
    mode: str = "off"                 # off | metrics | local | kubernetes
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    interval_s: float = 10.0          # one planner tick
    window_s: float = 60.0            # latency percentiles and rates over this window
    record_path: str = ""             # append every tick as JSON lines (dry-run replays it)
    startup_grace_s: float = 300.0    # no planning before every pool reached its minimum
    # local actuator: flags for the `pdserve prefill|decode` processes it starts
    worker_args: str = ""
    prefill_worker_args: str = ""     # prefill replicas only, after worker_args
    decode_worker_args: str = ""      # decode replicas only, after worker_args
    prefill_cores: tuple[str, ...] = ("0",)
    decode_cores: tuple[str, ...] = ("1",)
    base_replicas: tuple[int, int] = (0, 0)   # (prefill, decode) started by the launcher
    drain_timeout_s: float = 120.0
    # kubernetes actuator: Deployments whose scale subresource it patches
    k8s_namespace: str = "default"
    k8s_prefill_deployment: str = "pdserve-prefill"
    k8s_decode_deployment: str = "pdserve-decode"

    def __post_init__(self) -> None:
        if self.mode not in ("off", "metrics", "local", "kubernetes"):
            raise ValueError(f"unknown autoscale mode {self.mode!r}")
        if self.interval_s <= 0 or self.window_s <= 0:
            raise ValueError("planner interval and window must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    booking_ttl_s: float = 900.0      # bookings no frontend reported are reclaimed after this
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    seed: int = 0                     # for temperature sampling
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    role_planning: bool = True        # change worker roles as the mix shifts
    roles: RolePlannerConfig = field(default_factory=RolePlannerConfig)
