"""The scheduler's Prometheus metrics: placement, the KV index, roles, the autoscaling planner.
Names are the contract with deploy/ dashboards."""

from __future__ import annotations

from prometheus_client import Counter, Enum, Gauge, Histogram

from pdserve.metrics import _LAT
from scheduler.planner import REASONS as PLANNER_REASONS

ROUTES = Counter("pdserve_scheduler_routes", "Route decisions", ["outcome"])
ROUTE_SECONDS = Histogram("pdserve_scheduler_route_seconds", "Routing decision latency",
                          buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01))
WORKERS = Gauge("pdserve_scheduler_workers", "Registered live workers", ["role"])
WORKERS_EXPIRED = Counter("pdserve_scheduler_workers_expired",
                          "Workers dropped after missing heartbeats")
SCHED_DECISIONS = Counter("pdserve_scheduler_decisions",
                          "Placement decisions by mode (disagg|local) and reason",
                          ["mode", "reason"])
SCHED_LOCAL_PREFILL_MAX = Gauge("pdserve_scheduler_local_prefill_max_tokens",
                                "Conditional disaggregation: uncached prompts up to this many "
                                "tokens are prefilled on the decode worker (0: never)")
SCHED_PROMPT_TOKENS = Counter("pdserve_scheduler_prompt_tokens", "Prompt tokens routed")
SCHED_CACHED_TOKENS = Counter("pdserve_scheduler_cached_tokens",
                              "Prompt tokens the chosen worker held in its prefix cache "
                              "(per the index); over pdserve_scheduler_prompt_tokens: hit rate")
SCHED_INDEX_BLOCKS = Gauge("pdserve_scheduler_index_blocks", "Distinct KV blocks indexed")
SCHED_INDEX_EVENTS = Counter("pdserve_scheduler_index_events", "KV block events ingested")
SCHED_HELD = Gauge("pdserve_scheduler_held_requests",
                   "Requests waiting in the scheduler for their worker (late binding)")
SCHED_HELD_SECONDS = Histogram("pdserve_scheduler_held_seconds",
                               "How long routed requests waited in the scheduler (late binding)",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
SCHED_DEFERRED = Counter("pdserve_scheduler_deferred_requests",
                         "Held requests predicted to miss their TTFT SLO that let the ones "
                         "held behind them go first (late binding, --hold-order deadline)")
SCHED_JOINED = Counter("pdserve_scheduler_joined_requests",
                       "Held requests dispatched at once to share the next step of the "
                       "prompts queued on their prefill worker (late binding's join)")
SCHED_BOOKINGS = Gauge("pdserve_scheduler_bookings", "Routed requests not yet reported done")
SCHED_FAILED_REQUESTS = Counter("pdserve_scheduler_failed_requests",
                                "Requests whose booking was rolled back (failed or cancelled)")
SCHED_PRED_ERROR = Histogram("pdserve_scheduler_prediction_error",
                             "Latency model: (predicted - measured) / measured per request, "
                             "for ttft and tpot; a kept first token's ttft also in its two "
                             "parts, ready (the prefill worker computed it) and handoff",
                             ["kind"],
                             buckets=(-1, -0.5, -0.3, -0.2, -0.1, -0.05, 0, 0.05, 0.1, 0.2,
                                      0.3, 0.5, 1, 2, 5))
SCHED_PREDICTED = Histogram("pdserve_scheduler_predicted_seconds",
                            "Latency model: predicted TTFT and TPOT of the option taken",
                            ["kind"], buckets=_LAT)
SCHED_HANDOFF = Histogram("pdserve_scheduler_handoff_seconds",
                          "A remote prefill's handoff as its client saw it: the first gap "
                          "(first token to second) beyond the request's other gaps",
                          buckets=_LAT)
SCHED_FIRST_OVER = Gauge("pdserve_scheduler_first_token_fixed_seconds",
                         "Latency model: the fixed part of a first token's way to the client "
                         "that no engine step holds, learned per prefilling worker, for "
                         "remote and (short) local prefills", ["worker", "kind"])
SCHED_LOCAL_SLOW = Gauge("pdserve_scheduler_local_slow_ratio",
                         "Latency model: how many times their prediction recent long local "
                         "prefills took on this decode worker (1 until eight of them)",
                         ["worker"])
SCHED_ROLE_CHANGES = Counter("pdserve_scheduler_role_changes",
                             "Worker role changes by new role and reason", ["role", "reason"])
SCHED_ROLE_PENDING = Gauge("pdserve_scheduler_role_changes_pending",
                           "Role changes waiting for the worker to drain")
SCHED_MODEL_SAMPLES = Counter("pdserve_scheduler_step_samples",
                              "Engine steps received for the latency model")
# -- autoscaling planner (scheduler)
PLANNER_DESIRED = Gauge("pdserve_planner_desired_replicas",
                        "Replicas the planner wants per pool (HPA/KEDA can scale on this)",
                        ["pool"])
PLANNER_ACTUAL = Gauge("pdserve_planner_actual_replicas",
                       "Registered, routable (not draining) replicas per pool", ["pool"])
PLANNER_DECISIONS = Counter("pdserve_planner_decisions",
                            "Planner decisions per pool by action (up|down|hold)",
                            ["pool", "action"])
PLANNER_REASON = Enum("pdserve_planner_last_decision_reason",
                      "Reason code of the planner's last decision per pool", ["pool"],
                      states=["none", *PLANNER_REASONS])
PLANNER_LATENCY = Gauge("pdserve_planner_latency_p90_seconds",
                        "Measured p90 over the planner window: TTFT (prefill pool), TPOT "
                        "(decode pool), as clients saw them", ["pool"])
PLANNER_SLO = Gauge("pdserve_planner_slo_seconds", "The p90 SLO per pool: TTFT (prefill), "
                    "TPOT (decode)", ["pool"])
PLANNER_RATE = Gauge("pdserve_planner_request_rate", "Requests/s routed to the pool over the "
                     "planner window", ["pool"])
