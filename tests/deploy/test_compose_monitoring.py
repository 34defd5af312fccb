"""The Compose stack, Prometheus config, alert rules and Grafana dashboard against the service's metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import COMPOSE_DIR, PROMETHEUS_DIR, REPO, find_tool

yaml = pytest.importorskip("yaml", reason="pyyaml not installed (pip install -e '.[deploy]')")

COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "retinagrade.json"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
METRIC_TOKEN = re.compile(r"\bretinagrade_[a-zA-Z0-9_]+")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_compose_file_matches_the_compose_spec() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install -e '.[deploy]')")
    try:
        from check_jsonschema.builtin_schemas import get_builtin_schema
    except ImportError:
        pytest.skip("check-jsonschema (vendored compose-spec schema) not installed (pip install -e '.[deploy]')")
    schema = get_builtin_schema("vendor.compose-spec")
    jsonschema.validate(_compose(), schema)


def test_compose_runs_api_prometheus_grafana_with_their_config_files_present() -> None:
    compose = _compose()
    assert set(compose["services"]) == {"api", "prometheus", "grafana"}
    assert compose["services"]["api"]["build"]["context"] == "../.."
    assert compose["services"]["api"]["healthcheck"]["test"][-1] == "/opt/retinagrade/healthcheck.py"
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} would listen on every interface"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{source} is mounted but missing"


def test_podman_compose_renders_the_file() -> None:
    tool = find_tool("podman-compose")
    if tool is None:
        pytest.skip("podman-compose not installed (pip install -e '.[deploy]')")
    # podman-compose runs the podman binary even to render the file.
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman not installed (make system-packages, or apt-get install podman)")
    result = subprocess.run(
        [tool, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(podman).parent}:/usr/bin:/bin", "GRAFANA_ADMIN_PASSWORD": "x"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "prom/prometheus" in result.stdout


def test_dashboard_loads_and_covers_the_service_signals() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in (
        "request rate",
        "p50 / p95",
        "error rate",
        "grades over time",
        "results by status",
        "ungradable rate",
        "batch size",
    ):
        assert topic in titles, f"no panel for {topic!r}"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource_uid
        assert panel["targets"], panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_metrics_the_service_exports(source: str, service_metric_samples: set[str]) -> None:
    exprs = _dashboard_exprs() if source == "dashboard" else _rule_exprs()
    used = {name for expr in exprs for name in METRIC_TOKEN.findall(expr)}
    assert used, "no retinagrade metric referenced"
    missing = used - service_metric_samples
    assert not missing, f"not exported by src/retinagrade/api/telemetry.py: {sorted(missing)}"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses expressions inside rule files: each panel query becomes a recording rule.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        rule.get("alert")
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    tested = (PROMETHEUS_DIR / "alerts.test.yml").read_text()
    for alert in alerts - {None}:
        assert f"alertname: {alert}" in tested, f"{alert} has no promtool unit test"


def test_yaml_files_pass_yamllint() -> None:
    tool = find_tool("yamllint")
    if tool is None:
        pytest.skip("yamllint not installed (pip install -e '.[deploy]')")
    result = subprocess.run(
        [tool, "-s", "-c", str(REPO / "deploy" / "yamllint.yml"), "deploy", ".github/workflows"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
