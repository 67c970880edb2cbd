"""Write deploy/k8s/components/monitoring/rules.yaml: alerts.yml as a PrometheusRule.

    python deploy/prometheus/to_prometheus_rule.py
"""

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "k8s" / "components" / "monitoring" / "rules.yaml"


def prometheus_rule(alerts: dict) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "pdserve", "labels": {"prometheus": "k8s", "role": "alert-rules"}},
            "spec": {"groups": alerts["groups"]}}


if __name__ == "__main__":
    rule = prometheus_rule(yaml.safe_load((HERE / "alerts.yml").read_text()))
    OUT.write_text("# generated from deploy/prometheus/alerts.yml by "
                   "deploy/prometheus/to_prometheus_rule.py; do not edit\n"
                   + yaml.safe_dump(rule, sort_keys=False, width=100))
    print(OUT)
