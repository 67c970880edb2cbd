"""deploy/ is valid: Kubernetes objects (kustomize render, schemas), systemd units
(systemd-analyze verify), Dockerfiles and compose, Prometheus config and alert rules, the
Grafana dashboard. No cluster and no Docker engine: see docs/deployment.md for what only a
real cluster or GPU node can show. Which metrics the dashboard and alerts query is checked
against running processes in tests/e2e/test_deploy_metrics.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy_queries import alert_rules, dashboard_exprs, metric_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir())
K8S_VERSION = "1.30"
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing; .ci/run must provide it")
        pytest.skip(f"{tool} not installed")
    return path


# ------------------------------------------------------------------ Kubernetes

def render(overlay: str) -> list[dict]:
    out = subprocess.run([need("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" /
                                                            overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Role"} <= kinds
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            assert d["metadata"]["name"] and d["spec"], d   # checked below, by hand
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_fit_together(overlay):
    docs = render(overlay)
    by = {}
    for d in docs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    cm = by["ConfigMap"]["pdserve"]["data"]
    deps = by["Deployment"]
    assert set(deps) == {"pdserve-scheduler", "pdserve-frontend", "pdserve-prefill",
                         "pdserve-decode"}
    for name, dep in deps.items():
        spec = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        c = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in c, (name, probe)
            pr = c[probe]
            port = (pr.get("grpc") or pr.get("httpGet"))["port"]
            assert port in ports or port in ports.values(), (name, probe, port)
        # every $(VAR) in the command comes from the ConfigMap or the pod's env
        env = set(cm) | {e["name"] for e in c.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(c["command"])):
            assert var in env, (name, var)
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in by["PersistentVolumeClaim"]
    for pool in ("prefill", "decode"):
        spec = deps[f"pdserve-{pool}"]["spec"]["template"]["spec"]
        c = spec["containers"][0]
        # a drained stop fits in the grace period; pinned KV memory; a real /dev/shm
        assert spec["terminationGracePeriodSeconds"] > float(cm["PDSERVE_DRAIN_TIMEOUT_S"])
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"])
        assert "grpc" in c["startupProbe"]
    # one pair of SLOs: the engines' step budget protects the TPOT the scheduler plans for
    for name, dep in deps.items():
        cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
        if name in ("pdserve-prefill", "pdserve-decode", "pdserve-scheduler"):
            assert "--tpot-slo-ms" in cmd, name
        if "--tpot-slo-ms" in cmd:
            assert cmd[cmd.index("--tpot-slo-ms") + 1] == "$(PDSERVE_TPOT_SLO_MS)", name
    for svc in by["Service"].values():
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deps.values()), svc["metadata"]["name"]
    for pdb in by["PodDisruptionBudget"].values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deps.values())
    for name, dep in deps.items():
        # hardened pods, each with the cluster secret from a Secret (never a literal)
        spec = dep["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        c = spec["containers"][0]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        assert set(c["securityContext"]["capabilities"].get("add", [])) <= {"IPC_LOCK"}, name
        secret = {e["name"]: e for e in c["env"]}["PDSERVE_CLUSTER_SECRET"]
        assert secret["valueFrom"]["secretKeyRef"]["name"] == "pdserve-cluster", name
    # the internal ports are for pdserve's pods only; the API port for anyone
    pols = by["NetworkPolicy"]
    assert pols["pdserve-default-deny"]["spec"] == {"podSelector": {},
                                                    "policyTypes": ["Ingress"]}
    (internal,) = pols["pdserve-internal"]["spec"]["ingress"]
    assert internal["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "pdserve"}}}] and "ports" not in internal
    (api,) = pols["pdserve-frontend-api"]["spec"]["ingress"]
    assert api == {"ports": [{"port": 8000, "protocol": "TCP"}]}
    role = by["Role"]["pdserve-scheduler"]["rules"][0]
    assert role["resources"] == ["deployments/scale"]
    assert set(role["resourceNames"]) == {"pdserve-prefill", "pdserve-decode"}
    autoscalers = list(by.get("ScaledObject", {}).values()) + \
        list(by.get("HorizontalPodAutoscaler", {}).values())
    for a in autoscalers:      # they follow the planner, which then only exports
        assert a["spec"]["scaleTargetRef"]["name"] in deps
        assert cm["PDSERVE_AUTOSCALE"] == "metrics"
    if not autoscalers:
        assert cm["PDSERVE_AUTOSCALE"] == "kubernetes"


def test_overlays_set_what_their_transport_needs():
    nv = render("single-node-nvlink")
    cm = next(d for d in nv if d["kind"] == "ConfigMap")["data"]
    pod = next(d for d in nv if d["metadata"]["name"] == "pdserve-decode")["spec"]
    assert cm["PDSERVE_KV_EXPECT_TRANSPORT"] == "nvlink" and "cuda_ipc" in cm["UCX_TLS"]
    assert pod["replicas"] == 4 and pod["template"]["spec"]["hostIPC"] is True
    ib = render("multi-node-ib")
    cm = next(d for d in ib if d["kind"] == "ConfigMap")["data"]
    pod = next(d for d in ib if d["metadata"]["name"] == "pdserve-prefill")["spec"]["template"]
    assert cm["PDSERVE_KV_EXPECT_TRANSPORT"] == "rdma" and cm["UCX_TLS"].startswith("rc")
    res = pod["spec"]["containers"][0]["resources"]
    assert res["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert "k8s.v1.cni.cncf.io/networks" in pod["metadata"]["annotations"]


def test_the_tensor_parallel_overlay_gives_each_pool_its_degree_and_gpus():
    docs = render("tensor-parallel")
    for pool, tp, n in (("prefill", "4", 1), ("decode", "2", 2)):
        dep = next(d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == f"pdserve-{pool}")["spec"]
        c = dep["template"]["spec"]["containers"][0]
        assert c["command"][-2:] == ["--tensor-parallel-size", tp], c["command"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp
        assert c["resources"]["requests"]["nvidia.com/gpu"] == tp
        assert dep["replicas"] == n and dep["template"]["spec"]["hostIPC"] is True
    # the flags are vLLM's and pdserve's worker takes them
    from pdserve.cli import parse_args
    ns = parse_args(["prefill", "--tensor-parallel-size", "4", "--gpus", "0-3"])
    assert ns.gpus == "0-3" and ns.vllm == {"tensor_parallel_size": 4}


# ------------------------------------------------------------------ systemd

def test_systemd_units_verify(tmp_path):
    analyze = need("systemd-analyze")
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"pdserve-scheduler.service", "pdserve-frontend.service",
                                       "pdserve-prefill@.service", "pdserve-decode@.service"}
    # ExecStart must name an existing binary: point the units at this checkout's venv
    for u in units:
        (tmp_path / u.name).write_text(u.read_text().replace("/opt/pdserve", str(ROOT)))
    names = ["pdserve-scheduler.service", "pdserve-frontend.service",
             "pdserve-prefill@0.service", "pdserve-decode@1.service"]
    out = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "pdserve.env").read_text()
               .splitlines() if line and not line.startswith("#"))
    for u in units:
        text = u.read_text()
        assert "User=pdserve" in text and "Restart=" in text and "LimitNOFILE=" in text
        for var in re.findall(r"\$\{(\w+)\}", text):
            assert var in env, (u.name, var)
        assert "LoadCredential=cluster-secret:" in text, u.name     # internal auth
        stop = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))
        if "@" in u.name:        # workers drain before they stop
            assert stop > float(env["PDSERVE_DRAIN_TIMEOUT_S"])
            assert "LimitMEMLOCK=infinity" in text and "--drain-timeout-s" in text
            # the engines' step budget protects the TPOT SLO the scheduler plans for
            assert "--tpot-slo-ms ${PDSERVE_TPOT_SLO_MS}" in text, u.name
    sh = subprocess.run(["bash", "-n", str(DEPLOY / "systemd" / "install.sh")])
    assert sh.returncode == 0


# ------------------------------------------------------------------ containers

@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_parse(name, tmp_path):
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(tmp_path))
    df.content = (DEPLOY / "docker" / name).read_text()
    assert df.baseimage and ":" in df.baseimage            # a pinned base image
    instr = [i["instruction"] for i in df.structure if i["instruction"] != "COMMENT"]
    assert instr[0] == "FROM" and "CMD" in instr and "USER" in instr
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users[-1] not in ("root", "0")
    for i in df.structure:
        if i["instruction"] == "COPY" and "--from=" not in i["value"]:   # from the context
            for src in [a for a in i["value"].split()[:-1] if not a.startswith("--")]:
                assert (ROOT / src).exists(), (name, src)


def test_compose_file():
    c = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    svcs = c["services"]
    assert {"scheduler", "prefill", "decode", "frontend", "prometheus", "grafana"} <= set(svcs)
    for s in ("prefill", "decode"):
        assert svcs[s]["ulimits"]["memlock"] == -1 and svcs[s]["ipc"] == "host"
    assert svcs["prefill"]["cpuset"] != svcs["decode"]["cpuset"]
    # internal auth: the secret from the caller's environment, never a literal
    assert c["x-common"]["environment"]["PDSERVE_CLUSTER_SECRET"].startswith(
        "${PDSERVE_CLUSTER_SECRET:?")
    build = svcs["frontend"]["build"]
    assert (DEPLOY / "docker" / build["context"] / build["dockerfile"]).exists()
    for s in ("prometheus", "grafana"):
        for v in svcs[s]["volumes"]:
            assert (DEPLOY / "docker" / v.split(":")[0]).exists(), v


# ------------------------------------------------------------------ Prometheus, Grafana

def test_alert_rules_parse_and_cover_what_operators_need():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {"PdserveTTFTSLOBreach", "PdserveTPOTSLOBreach", "PdserveKVTransferFailures",
            "PdserveKVTransportFallback"} <= names
    for r in rules:
        assert metric_names(r["expr"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for f in prom["rule_files"]:
        assert (DEPLOY / "prometheus" / f).exists()
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert jobs == {"pdserve-frontend", "pdserve-scheduler", "pdserve-workers"}


def test_prometheus_rule_is_the_same_rules():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "to_rule", DEPLOY / "prometheus" / "to_prometheus_rule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = mod.prometheus_rule(yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml")
                                              .read_text()))
    got = yaml.safe_load((DEPLOY / "k8s" / "components" / "monitoring" / "rules.yaml")
                         .read_text())
    assert got == want, "regenerate: python deploy/prometheus/to_prometheus_rule.py"


def test_grafana_dashboard_loads_and_every_query_parses():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build", DEPLOY / "grafana" /
                                                  "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    on_disk = json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())
    assert on_disk == json.loads(json.dumps(mod.dashboard())), \
        "regenerate: python deploy/grafana/build_dashboard.py"
    titles = " ".join(p["title"] for p in on_disk["panels"]).lower()
    for topic in ("ttft", "tpot", "goodput", "queue", "kv cache usage", "gb/s", "failures",
                  "hit rate", "desired"):
        assert topic in titles, topic
    for e in dashboard_exprs():
        assert metric_names(e), e


def test_systemd_units_expose_at_most_medium():
    """`systemd-analyze security` scores each unit's sandbox; MEDIUM is below 7.0."""
    analyze = need("systemd-analyze")
    for u in sorted((DEPLOY / "systemd").glob("*.service")):
        out = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(u)],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", out.stdout)
        assert m, out.stdout[-2000:] + out.stderr
        assert float(m.group(1)) < 7.0 and m.group(2) in ("OK", "MEDIUM"), (u.name, m.group(0))
