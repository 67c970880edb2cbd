"""Write pdserve-dashboard.json (Grafana). Every query names only metrics that pdserve's
processes export; tests/e2e/test_deploy_metrics.py scrapes running processes to check it.

    python deploy/grafana/build_dashboard.py
"""

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def quantiles(metric: str) -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket[$__rate_interval])))",
              f"p{int(p * 100)}") for p in (0.5, 0.9, 0.99)]


PANELS = [
    ("TTFT (frontend) and SLO", "s", quantiles("pdserve_time_to_first_token_seconds")
     + [q('max(pdserve_slo_seconds{signal="ttft"})', "SLO")]),
    ("TPOT (frontend) and SLO", "s", quantiles("pdserve_time_per_output_token_seconds")
     + [q('max(pdserve_slo_seconds{signal="tpot"})', "SLO")]),
    ("Goodput: requests/s within both SLOs", "reqps", [
        q("sum(rate(pdserve_goodput_requests_total[$__rate_interval]))", "goodput"),
        q('sum(rate(pdserve_requests_total{status="200"}[$__rate_interval]))', "completed")]),
    ("Queue depth per pool", "short", [
        q("sum by (role) (pdserve_worker_waiting_requests)", "{{role}} waiting"),
        q("sum by (role) (pdserve_worker_running_requests)", "{{role}} running")]),
    ("KV cache usage per worker", "percentunit", [
        q("pdserve_worker_kv_usage_ratio", "{{role}} {{pdserve_worker}}")]),
    ("KV transfer GB/s per request", "none", [
        q("histogram_quantile(0.5, sum by (le) (rate(pdserve_kv_transfer_gbps_bucket"
          "[$__rate_interval])))", "p50"),
        q("histogram_quantile(0.1, sum by (le) (rate(pdserve_kv_transfer_gbps_bucket"
          "[$__rate_interval])))", "p10 (slow end)")]),
    ("KV transfer time per request", "s", quantiles("pdserve_kv_transfer_seconds")),
    ("KV transfer failures and expired leases", "short", [
        q("sum(rate(pdserve_kv_transfer_failures_total[$__rate_interval]))", "failures/s"),
        q("sum(delta(pdserve_kv_leases_expired[$__rate_interval]))", "leases expired")]),
    ("KV transport per peer (from UCX)", "short", [
        q("sum by (transport) (pdserve_kv_transport_peers)", "{{transport}}"),
        q("max(pdserve_kv_transport_fallback_peers)", "FALLBACK (worse than expected)")]),
    ("Prefix cache hit rate", "percentunit", [
        q("sum(rate(pdserve_scheduler_cached_tokens_total[$__rate_interval])) / "
          "sum(rate(pdserve_scheduler_prompt_tokens_total[$__rate_interval]))",
          "scheduler (routed to the worker holding the prefix)"),
        q("sum(rate(vllm:prefix_cache_hits_total[$__rate_interval])) / "
          "sum(rate(vllm:prefix_cache_queries_total[$__rate_interval]))", "engines")]),
    ("Replicas: desired (planner) vs actual", "short", [
        q("max by (pool) (pdserve_planner_desired_replicas)", "{{pool}} desired"),
        q("max by (pool) (pdserve_planner_actual_replicas)", "{{pool}} actual")]),
    ("Planner input: p90 vs SLO", "s", [
        q("max by (pool) (pdserve_planner_latency_p90_seconds)", "{{pool}} p90"),
        q("max by (pool) (pdserve_planner_slo_seconds)", "{{pool}} SLO")]),
    ("Placement decisions", "reqps", [
        q("sum by (mode, reason) (rate(pdserve_scheduler_decisions_total[$__rate_interval]))",
          "{{mode}}:{{reason}}")]),
    ("Live workers per pool", "short", [
        q("max by (role) (pdserve_scheduler_workers)", "{{role}}")]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        for j, t in enumerate(targets):
            t["refId"] = chr(ord("A") + j)
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": targets})
    return {
        "uid": "pdserve", "title": "pdserve: disaggregated prefill/decode",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "tags": ["pdserve", "llm"],
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels}


if __name__ == "__main__":
    out = Path(__file__).with_name("pdserve-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)
