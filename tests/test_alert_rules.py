"""Prometheus and Alertmanager configuration: valid, and every alert unit-tested by promtool.

promtool (Debian package `prometheus`) and amtool (package `prometheus-alertmanager`) are
required: deploy/setup-host.sh installs both (`make test` and `.ci/run` run it first), and without
them these tests fail rather than skip. tests/test_alerts_live.py runs both servers for real.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules" / "comfy-service.rules.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
ALERTMANAGER = REPO / "deploy" / "alertmanager" / "alertmanager.yml"

SEVERITIES = {"critical", "warning"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install -y prometheus` (Debian) or run "
                    ".ci/run, which installs it; the alert rules cannot be checked without it",
                    pytrace=False)
    return path


def run_tool(*args: str) -> str:
    proc = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"{' '.join(args)} failed (exit {proc.returncode}):\n{output}"
    return output


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rules() -> list[dict]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def rule_test_cases() -> list[tuple[str, dict]]:
    """Every alert_rule_test case of every promtool test file, with its file name."""
    cases = []
    for path in RULE_TESTS:
        for test in load(path)["tests"]:
            cases.extend((path.name, case) for case in test.get("alert_rule_test", []))
    return cases


# --- promtool -----------------------------------------------------------------------------

def test_prometheus_config_is_valid():
    output = run_tool(promtool(), "check", "config", str(CONFIG.relative_to(REPO)))
    assert RULES.name in output, f"promtool did not load {RULES.name}:\n{output}"


def test_rule_file_is_valid():
    run_tool(promtool(), "check", "rules", str(RULES.relative_to(REPO)))


def test_rule_unit_tests_pass():
    assert RULE_TESTS, f"no promtool test files under {PROMETHEUS / 'tests'}"
    run_tool(promtool(), "test", "rules", *(str(p.relative_to(REPO)) for p in RULE_TESTS))


# --- coverage and shape of the rules ----------------------------------------------------------

def test_config_loads_every_rule_file():
    config = load(CONFIG)
    loaded = {(CONFIG.parent / name).resolve() for name in config["rule_files"]}
    present = {p.resolve() for p in (PROMETHEUS / "rules").glob("*.yml")}
    assert loaded == present, f"rule_files {sorted(map(str, loaded))} != files {sorted(map(str, present))}"
    for path in RULE_TESTS:
        for name in load(path)["rule_files"]:
            assert (path.parent / name).resolve() == RULES.resolve(), f"{path.name} tests {name}"


def test_config_sends_alerts_to_alertmanager():
    targets = [t for am in load(CONFIG)["alerting"]["alertmanagers"]
               for sc in am.get("static_configs", []) for t in sc["targets"]]
    assert "alertmanager:9093" in targets


def test_every_alert_has_severity_for_and_annotations():
    rules = alert_rules()
    assert rules, f"no alerts in {RULES}"
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name} has no `for`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not in {SEVERITIES}"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), f"{name}: summary/description"


def test_recorded_series_are_used_after_their_rule_in_the_same_group():
    """Groups run independently (and in random order under promtool): a rule reading a
    recorded series must come after it in the same group, or it reads the previous round."""
    recorded_anywhere = {rule["record"] for group in load(RULES)["groups"]
                         for rule in group["rules"] if "record" in rule}
    for group in load(RULES)["groups"]:
        seen: set[str] = set()
        for rule in group["rules"]:
            used = {name for name in recorded_anywhere if re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", rule["expr"])}
            name = rule.get("alert") or rule.get("record")
            assert used <= seen, f"{name} reads {sorted(used - seen)} before it is recorded in its group"
            if "record" in rule:
                seen.add(rule["record"])


def test_every_alert_is_tested_firing_and_not_firing():
    names = {rule["alert"] for rule in alert_rules()}
    fires = {case["alertname"] for _, case in rule_test_cases() if case.get("exp_alerts")}
    silent = {case["alertname"] for _, case in rule_test_cases() if not case.get("exp_alerts")}
    assert not names - fires, f"alerts with no promtool case expecting them to fire: {sorted(names - fires)}"
    assert not names - silent, f"alerts with no promtool case expecting silence: {sorted(names - silent)}"
    unknown = (fires | silent) - names
    assert not unknown, f"promtool cases for alerts that do not exist: {sorted(unknown)}"


def test_readme_documents_every_alert():
    readme = (PROMETHEUS / "README.md").read_text(encoding="utf-8")
    missing = sorted(rule["alert"] for rule in alert_rules() if rule["alert"] not in readme)
    assert not missing, f"deploy/prometheus/README.md does not describe {missing}"


# --- Alertmanager -------------------------------------------------------------------------------

def test_alertmanager_routes_and_inhibits():
    config = load(ALERTMANAGER)
    receivers = {r["name"] for r in config["receivers"]}
    route = config["route"]
    assert route["receiver"] in receivers
    assert set(route["group_by"]) == {"alertname", "queue"}
    for child in route["routes"]:
        assert child["receiver"] in receivers
    alerts = {rule["alert"] for rule in alert_rules()}
    inhibit = [r for r in config["inhibit_rules"]
               if r["source_matchers"] == ['alertname="ComfyServiceWorkerDown"']]
    assert len(inhibit) == 1, "ComfyServiceWorkerDown must inhibit its consequences"
    assert inhibit[0]["equal"] == ["queue"]
    assert inhibit[0]["target_matchers"] == ['alertname=~"ComfyUIDown|GpuHeartbeatMissing"']
    assert {"ComfyServiceWorkerDown", "ComfyUIDown", "GpuHeartbeatMissing"} <= alerts


def amtool() -> str:
    path = shutil.which("amtool")
    assert path, "amtool is not installed: sudo deploy/setup-host.sh (Debian package prometheus-alertmanager)"
    return path


def test_every_receiver_posts_to_a_service_of_the_compose_fleet():
    """Alertmanager's webhooks go to a service that exists: alert-webhook (deploy/alertlog.py)."""
    config = yaml.safe_load(ALERTMANAGER.read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            host, port = hook["url"].split("/")[2].split(":")
            assert host in compose, f"{receiver['name']} posts to {host}, which no compose service provides"
            assert port in compose[host]["expose"], f"{host} does not expose {port}"
            assert "deploy.alertlog" in compose[host]["command"]


def test_alertmanager_config_is_valid():
    run_tool(amtool(), "check-config", str(ALERTMANAGER.relative_to(REPO)))


@pytest.mark.parametrize("labels, receiver", [
    (["alertname=JobErrorRateHigh", "severity=critical"], "webhook-critical"),
    (["alertname=ComfyUIDown", "severity=warning", "queue=gpu.host-a.0"], "webhook-warning"),
    (["alertname=SomethingElse"], "webhook-warning"),
])
def test_alertmanager_routing(labels, receiver):
    run_tool(amtool(), "config", "routes", "test", f"--config.file={ALERTMANAGER.relative_to(REPO)}",
             f"--verify.receivers={receiver}", *labels)
