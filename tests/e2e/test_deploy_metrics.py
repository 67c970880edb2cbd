"""Every metric the Grafana dashboard and the alert rules query is one that pdserve's
running processes export: scraped here from a real cluster's frontend, scheduler and
workers (found through the frontend's Prometheus HTTP service discovery)."""

import re

import httpx

from tests.deploy_queries import alert_rules, dashboard_exprs, metric_names


def exported(text: str) -> set[str]:
    """Sample names a scrape can return, from the exposition's TYPE lines and samples."""
    out: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if m:
            name, kind = m.groups()
            out.add(name)
            if kind == "counter":
                out |= {name + "_total", name + "_created"}
            elif kind == "histogram":
                out |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
            elif kind == "summary":
                out |= {name + s for s in ("_sum", "_count", "_created")}
        elif line and not line.startswith("#"):
            out.add(re.match(r"[^{\s]+", line).group(0))
    return out


def test_dashboards_and_alerts_only_query_exported_metrics(cluster):
    # a request or two, so every process has something to say
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
        "model": cluster.model_name, "prompt": "the fox", "max_tokens": 4})
    assert r.status_code == 200
    sd = httpx.get(f"{cluster.url}/sd/targets", timeout=10).json()
    roles = sorted(t["labels"]["pdserve_role"] for t in sd)
    assert roles == ["decode", "prefill"] and all(len(t["targets"]) == 1 for t in sd)
    m = re.search(r"\[scheduler\].*metrics on :(\d+)", cluster.log_path.read_text())
    assert m, "the scheduler logs its metrics port"
    urls = [f"{cluster.url}/metrics", f"http://127.0.0.1:{m.group(1)}/metrics"] + \
        [f"http://{t['targets'][0]}/metrics" for t in sd]
    names: set[str] = set()
    for u in urls:
        names |= exported(httpx.get(u, timeout=10).text)
    wanted = set()
    for e in dashboard_exprs():
        wanted |= metric_names(e)
    for rule in alert_rules():
        wanted |= metric_names(rule["expr"])
    assert len(wanted) > 20
    missing = sorted(wanted - names)
    assert not missing, f"queried but not exported: {missing}"
