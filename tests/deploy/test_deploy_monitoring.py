"""deploy/monitoring: alert rules checked and unit-tested by promtool (Debian's prometheus
package), every metric they and the Grafana dashboard name exported by a real server, and the
ServiceMonitor and scrape annotations pointing at the Service's port and /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import K8S_DIR, REPO

from conftest import serve

MONITORING = REPO / "deploy" / "monitoring"
# series suffixes Prometheus adds to a collector's name
SUFFIXES = re.compile(r"_(total|bucket|count|sum|created)$")
NAMES = re.compile(r"\b((?:gruserve|process)_[a-z_]+)\b")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


def test_promtool_unit_tests_every_alert() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == alerts
    result = _promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _queries() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return exprs


async def test_every_metric_named_is_exported(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    async for s in serve(models_dir):
        await s.client.post("/v1/models/simple/sessions", json={})
        exposition = (await s.client.get("/metrics")).text
    exported = {SUFFIXES.sub("", n) for n in re.findall(r"^# TYPE (\S+) ", exposition, re.M)}
    named = {SUFFIXES.sub("", n) for expr in _queries() for n in NAMES.findall(expr)}
    assert len(named) >= 15
    assert named - exported == set()


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)


def test_scrapes_reach_the_metrics_port() -> None:
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    services = list(yaml.safe_load_all((K8S_DIR / "base" / "service.yaml").read_text()))
    (service,) = [s for s in services if s["metadata"]["name"] == "gruserve"]
    kustomization = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())
    deployment = yaml.safe_load((K8S_DIR / "base" / "deployment.yaml").read_text())
    assert monitor["metadata"]["namespace"] == kustomization["namespace"]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [kustomization["namespace"]]
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert scraped == [service], "each pod scraped once: through the one Service"
    # the job label comes from the Service's label: the job the alert rules name
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "gruserve"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    (container,) = pod["spec"]["containers"]
    ports = {str(p["containerPort"]) for p in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] in ports
    assert annotations["prometheus.io/path"] == "/metrics"
