"""deploy/monitoring: the alerts pass `promtool test rules`, and the PodMonitor and the rules
agree with what the agent and its DaemonSet really expose."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blockpull.agent.metrics import AgentMetrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `bash scripts/setup.sh` installs Debian's prometheus package")
    return found


def _write_rules(directory: Path, spec: dict[str, Any]) -> None:
    """The PrometheusRule's spec as a plain rule file, beside a copy of the promtool tests."""
    (directory / "blockpull-rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(MONITORING / "tests" / "alerts_test.yaml", directory)


def _promtool_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> dict[str, Any]:
    rule = _yaml(MONITORING / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    _write_rules(tmp_path, _rules())
    check = _promtool_run("check", "rules", "blockpull-rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    test = _promtool_run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


@pytest.mark.parametrize(
    ("alert", "field", "broken"),
    [
        ("BlockPullPendingTooLong", "for", "1m"),  # would page on every short wait
        ("BlockPullFailed", "expr", 'sum by (node) (blockpull_jobs_finished_total{result="failed"}) > 0'),
        ("BlockPullAgentDown", "for", "30m"),
    ],
)
def test_the_promtool_tests_catch_a_broken_alert(alert: str, field: str, broken: str, tmp_path: Path) -> None:
    spec = _rules()
    (rule,) = [r for group in spec["groups"] for r in group["rules"] if r.get("alert") == alert]
    rule[field] = broken
    _write_rules(tmp_path, spec)
    test = _promtool_run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert test.returncode != 0, test.stdout
    assert alert in test.stdout + test.stderr


def test_alerts_use_only_metrics_the_agent_exports() -> None:
    metrics = AgentMetrics("node-a")
    exported = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        exported |= {sample.name for sample in family.samples}
    used = set()
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\b(blockpull_[a-z_]+)", rule["expr"]))
            assert 'job="blockpull-agent"' in rule["expr"], rule["alert"]
    assert used, "the alerts read the agent's metrics"
    assert used <= exported, used - exported


def test_podmonitor_scrapes_the_daemonsets_metrics_port() -> None:
    monitor = _yaml(MONITORING / "podmonitor.yaml")
    daemonset = _yaml(REPO / "deploy" / "daemonset.yaml")
    pod = daemonset["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert str(ports["metrics"]) == env["BLOCKPULL_METRICS_PORT"]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [daemonset["metadata"]["namespace"]]
    labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The alerts select job="blockpull-agent": the value of the pods' jobLabel.
    assert labels[monitor["spec"]["jobLabel"]] == "blockpull-agent"
    kustomization = _yaml(MONITORING / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]
