"""The deploy tree's Prometheus rules and Grafana queries, read for the tests
(tests/unit/test_deploy.py checks them; tests/e2e/test_deploy_metrics.py checks that they
query only metrics a running cluster exports)."""

from __future__ import annotations

import json
from pathlib import Path

import promql_parser
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects (walks the parsed AST)."""
    out: set[str] = set()

    def walk(e):
        name = type(e).__name__
        if name == "VectorSelector":
            out.add(e.name)
        elif name == "MatrixSelector":
            walk(e.vector_selector)
        elif name == "BinaryExpr":
            walk(e.lhs)
            walk(e.rhs)
        elif name == "Call":
            for a in e.args:
                walk(a)
        elif hasattr(e, "expr"):
            walk(e.expr)

    walk(promql_parser.parse(expr))
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    d = json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())
    return [t["expr"].replace("$__rate_interval", "1m") for p in d["panels"]
            for t in p["targets"]]
