"""The scheduler's flags (placement, roles, autoscaling): parsed by `pdserve scheduler`,
passed on by `pdserve serve`, replayed by `pdserve planner-dryrun`."""

from __future__ import annotations

import argparse

from scheduler.config import AutoscaleConfig
from scheduler.planner import PlannerConfig, PoolPolicy
from scheduler.policy import FIRST_TOKENS, HOLD_ORDERS, OVERFLOWS, POLICIES, PlacementConfig


PLACEMENT_FLAGS = {  # flag -> (PlacementConfig field, type, help)
    "--policy": ("policy", str, "prefill placement: kv (prefix-cache aware), least_loaded, "
                 "round_robin"),
    "--overlap-weight": ("overlap_weight", float, "weight of uncached prompt tokens in the "
                         "prefill cost (>1 favours cache hits over balance)"),
    "--running-weight": ("running_weight", float, "prefill cost of a running request, in "
                         "tokens"),
    "--placement-temperature": ("temperature", float, "0: the cheapest worker; >0: sample "
                                "workers by cost (--temperature: the old name)"),
    "--local-prefill-max-tokens": ("local_prefill_max_tokens", int, "conditional "
                                   "disaggregation: prefill on the decode worker when at most "
                                   "this many prompt tokens are uncached there (0: never)"),
    "--prefill-saturation-tokens": ("prefill_saturation_tokens", int, "prefill locally when "
                                    "every prefill worker has this many tokens queued and the "
                                    "decode worker has room (0: never)"),
    "--admit-ttft-factor": ("admit_ttft_factor", float, "admission control: 429 when the "
                            "forecast TTFT of the best option exceeds this many TTFT SLOs "
                            "(0: admit everything)"),
    "--hold-max-s": ("hold_max_s", float, "late binding: a request waits in the scheduler, "
                     "not in a busy worker's queue, and is placed when a worker is about to "
                     "be free; at most this many seconds (0: place on arrival)"),
    "--hold-order": ("hold_order", str, "late binding's order: deadline (a request "
                     "predicted to miss its TTFT SLO lets the held requests that can still "
                     "meet theirs go first) or fifo (arrival order)"),
    "--first-token": ("first_token", str, "a remote prefill's first token: with_stream (the "
                      "frontend keeps it until the decode worker's first token, so the "
                      "handoff counts in TTFT, not TPOT, as vLLM's and SGLang's P/D do), "
                      "adaptive (kept where the SLOs favour it) or early (sent as soon as "
                      "the prefill worker computes it)"),
    "--overflow": ("overflow", str, "a whole request on a prefill worker: fallback (when "
                   "no decode-capable worker is left, dead, draining or excluded after a "
                   "failure), on (also when no other option is predicted to serve it within "
                   "its SLOs and that one is), balance (the default: also when that one "
                   "scores well over the best that is, so a prefill worker decodes a share "
                   "of the streams while the decode engine's are near their SLO), off "
                   "(never)"),
}
# either threshold set (non-zero) pins these fixed rules instead of the adaptive choice

ROLE_FLAGS = {  # flag -> (RolePlannerConfig field or None for the switch, type, help)
    "--role-planner": (None, str, "on: change worker roles (prefill <-> mixed) when the mix "
                       "shifts for longer than --role-window-s; off: only SetRole changes them"),
    "--role-window-s": ("window_s", float, "a shift must last this long before a role flips"),
    "--role-dwell-s": ("dwell_s", float, "no role flip sooner than this after the last one"),
}


def role_args(p: argparse.ArgumentParser) -> None:
    from scheduler.roles import RolePlannerConfig
    d = RolePlannerConfig()
    for flag, (name, typ, hlp) in ROLE_FLAGS.items():
        p.add_argument(flag, type=typ, default="on" if name is None else getattr(d, name),
                       help=hlp, **({"choices": ["on", "off"]} if name is None else {}))


def role_argv(ns) -> list[str]:
    return [x for flag in ROLE_FLAGS
            for x in (flag, str(getattr(ns, flag[2:].replace("-", "_"))))]


def role_config(ns):
    from scheduler.roles import RolePlannerConfig
    return RolePlannerConfig(window_s=ns.role_window_s, dwell_s=ns.role_dwell_s)


# old names still accepted (the placement temperature is not a sampling temperature)
PLACEMENT_ALIASES = {"--placement-temperature": ("--temperature",)}


def placement_args(p: argparse.ArgumentParser) -> None:
    d = PlacementConfig()
    choices = {"--policy": POLICIES, "--hold-order": HOLD_ORDERS, "--first-token": FIRST_TOKENS,
               "--overflow": OVERFLOWS}
    for flag, (name, typ, hlp) in PLACEMENT_FLAGS.items():
        p.add_argument(flag, *PLACEMENT_ALIASES.get(flag, ()), dest=name, type=typ,
                       default=getattr(d, name), help=hlp, choices=choices.get(flag))


def placement_argv(ns) -> list[str]:
    out = []
    for flag, (name, _t, _h) in PLACEMENT_FLAGS.items():
        out += [flag, str(getattr(ns, name))]
    return out


AUTOSCALE_FLAGS = {  # flag -> (namespace attr, type, default, help)
    "--autoscale": ("autoscale", str, "off", "off | metrics (export desired replicas for "
                    "HPA/KEDA) | local (start/stop worker processes here) | kubernetes "
                    "(patch the Deployments' scale)"),
    "--ttft-slo-ms": ("ttft_slo_ms", float, 2000.0, "prefill pool SLO: TTFT p90"),
    "--tpot-slo-ms": ("tpot_slo_ms", float, 100.0, "decode pool SLO: TPOT p90"),
    "--prefill-min": ("prefill_min", int, 1, "prefill replicas, at least"),
    "--prefill-max": ("prefill_max", int, 4, "prefill replicas, at most"),
    "--decode-min": ("decode_min", int, 1, "decode replicas, at least"),
    "--decode-max": ("decode_max", int, 4, "decode replicas, at most"),
    "--planner-interval-s": ("planner_interval_s", float, 10.0, "planner tick"),
    "--planner-window-s": ("planner_window_s", float, 60.0, "latency/rate window"),
    "--scale-up-cooldown-s": ("scale_up_cooldown_s", float, 30.0, "after a scale-up"),
    "--scale-down-cooldown-s": ("scale_down_cooldown_s", float, 120.0, "after any change"),
    "--scale-up-min-samples": ("scale_up_min_samples", int, 3, "latency samples in the "
                               "window before a breach can scale up"),
    "--scale-down-ticks": ("scale_down_ticks", int, 3, "consecutive low ticks before a "
                           "scale-down"),
    "--warmup-grace-s": ("warmup_grace_s", float, 120.0, "never remove a replica younger "
                         "than this"),
    "--planner-startup-grace-s": ("planner_startup_grace_s", float, 300.0, "no planning "
                                  "until every pool reached its minimum, or this long"),
    "--planner-record": ("planner_record", str, "", "append every tick to this JSON-lines "
                         "file (`pdserve planner-dryrun --trace` replays it)"),
    "--autoscale-worker-args": ("autoscale_worker_args", str, "", "local: engine flags for "
                                "the workers it starts (`pdserve serve` fills this in)"),
    "--autoscale-prefill-worker-args": ("autoscale_prefill_worker_args", str, "", "local: "
                                        "extra flags for the prefill workers it starts "
                                        "(after the shared ones; `pdserve serve` puts "
                                        "--prefill-block-size here)"),
    "--autoscale-decode-worker-args": ("autoscale_decode_worker_args", str, "", "local: "
                                       "extra flags for the decode workers it starts (after "
                                       "the shared ones)"),
    "--autoscale-prefill-cores": ("autoscale_prefill_cores", str, "0", "local: the prefill "
                                  "pool's cores (comma list)"),
    "--autoscale-decode-cores": ("autoscale_decode_cores", str, "1", "local: the decode "
                                 "pool's cores (comma list)"),
    "--autoscale-base": ("autoscale_base", str, "0,0", "local: prefill,decode replicas "
                         "started by others on those cores"),
    "--autoscale-drain-timeout-s": ("autoscale_drain_timeout_s", float, 120.0, "local: stop "
                                    "a draining replica after this even if busy"),
    "--k8s-namespace": ("k8s_namespace", str, "default", "kubernetes: namespace"),
    "--k8s-prefill-deployment": ("k8s_prefill_deployment", str, "pdserve-prefill",
                                 "kubernetes: the prefill Deployment"),
    "--k8s-decode-deployment": ("k8s_decode_deployment", str, "pdserve-decode",
                                "kubernetes: the decode Deployment"),
}


def autoscale_args(p: argparse.ArgumentParser, planner_only: bool = False) -> None:
    for flag, (name, typ, default, hlp) in AUTOSCALE_FLAGS.items():
        if planner_only and (flag.startswith(("--autoscale", "--k8s")) or
                             flag in ("--planner-record", "--planner-startup-grace-s")):
            continue
        p.add_argument(flag, dest=name, type=typ, default=default, help=hlp)


def autoscale_argv(ns, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for flag, (name, _t, _d, _h) in AUTOSCALE_FLAGS.items():
        if flag not in skip:
            out += [flag, str(getattr(ns, name))]
    return out


def planner_config(ns) -> PlannerConfig:
    return PlannerConfig(
        prefill=PoolPolicy(ns.ttft_slo_ms, ns.prefill_min, ns.prefill_max),
        decode=PoolPolicy(ns.tpot_slo_ms, ns.decode_min, ns.decode_max),
        up_cooldown_s=ns.scale_up_cooldown_s, down_cooldown_s=ns.scale_down_cooldown_s,
        down_ticks=ns.scale_down_ticks, warmup_grace_s=ns.warmup_grace_s,
        min_samples_up=ns.scale_up_min_samples)


def autoscale_config(ns) -> AutoscaleConfig:
    cores = lambda v: tuple(c.strip() for c in v.split(",") if c.strip())  # noqa: E731
    base = [int(x) for x in ns.autoscale_base.split(",")]
    return AutoscaleConfig(
        mode=ns.autoscale, planner=planner_config(ns), interval_s=ns.planner_interval_s,
        window_s=ns.planner_window_s, record_path=ns.planner_record,
        startup_grace_s=ns.planner_startup_grace_s,
        worker_args=ns.autoscale_worker_args,
        prefill_worker_args=ns.autoscale_prefill_worker_args,
        decode_worker_args=ns.autoscale_decode_worker_args,
        prefill_cores=cores(ns.autoscale_prefill_cores),
        decode_cores=cores(ns.autoscale_decode_cores), base_replicas=(base[0], base[1]),
        drain_timeout_s=ns.autoscale_drain_timeout_s, k8s_namespace=ns.k8s_namespace,
        k8s_prefill_deployment=ns.k8s_prefill_deployment,
        k8s_decode_deployment=ns.k8s_decode_deployment)
