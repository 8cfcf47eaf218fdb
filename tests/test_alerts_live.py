"""The alerts, end to end: a real Prometheus (Debian's package) scrapes a live fleet with the rules
of deploy/prometheus/, a real Alertmanager routes with deploy/alertmanager/alertmanager.yml, and
the fleet's alert receiver (python -m deploy.alertlog) logs what arrives.

Changes to the shipped configuration, in the test's copies only: loopback addresses for the
services' compose names, a 1 s scrape and evaluation interval, and every rule's `for:` cut to 2 s
(the expressions and labels are the shipped ones). Proves that the worker-down alert fires naming
the host of the dead worker's last heartbeat, and that the error-rate alert fires on the first
failures of a kind (their counters exist from 0, so increase() sees every one of them).
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.procs import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy/prometheus/rules/comfy-service.rules.yml"
ALERTMANAGER = REPO / "deploy/alertmanager/alertmanager.yml"

pytestmark = pytest.mark.timeout(240)


def binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise AssertionError(f"{names[0]} is not installed: sudo deploy/setup-host.sh (Debian's packages)")


class Service:
    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def alerts(prom: str) -> list[dict]:
    return requests.get(prom + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]


def firing(prom: str, name: str) -> list[dict]:
    return [a for a in alerts(prom) if a["labels"]["alertname"] == name and a["state"] == "firing"]


def query(prom: str, expr: str) -> list[dict]:
    return requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=5).json()["data"]["result"]


def test_worker_down_and_error_rate_alerts_fire_and_reach_the_receiver(fleet_factory, tmp_path):
    fleet = fleet_factory(WORKER_HOST="vm")
    sims = [fleet.add_sim("--step-seconds", "0.01") for _ in range(2)]
    workers = [fleet.add_worker(sim, queue=f"gpu.prom.{i}") for i, sim in enumerate(sims)]
    fleet.wait_workers()
    fleet.start_api()
    services: list[Service] = []
    try:
        receiver_port, am_port, prom_port = free_port(), free_port(), free_port()
        receiver = Service("alertlog", [sys.executable, "-m", "deploy.alertlog"], tmp_path / "alertlog.log",
                           env={**fleet.env(), "ALERTLOG_PORT": str(receiver_port), "LOG_DIR": ""})
        services.append(receiver)
        wait_until(lambda: requests.get(f"http://127.0.0.1:{receiver_port}/healthz", timeout=1).ok, 15,
                   what="alert receiver")

        am_conf = ALERTMANAGER.read_text().replace("http://alert-webhook:9000", f"http://127.0.0.1:{receiver_port}")
        assert am_conf != ALERTMANAGER.read_text(), "the receiver URL names the compose service alert-webhook"
        (tmp_path / "alertmanager.yml").write_text(am_conf)
        services.append(Service("alertmanager", [
            binary("prometheus-alertmanager", "alertmanager"), f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address="], tmp_path / "alertmanager.log"))

        rules = re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 2s", RULES.read_text())
        (tmp_path / "rules.yml").write_text(rules)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "comfy-api", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{fleet.api_port}"]}]}],
        }))
        services.append(Service("prometheus", [
            binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            tmp_path / "prometheus.log"))
        prom = f"http://127.0.0.1:{prom_port}"

        def scraped_twice():
            for s in services:
                assert s.proc.poll() is None, f"{s.name} exited:\n{s.output()[-3000:]}"
            result = query(prom, 'count_over_time(comfy_jobs_failed_total{code="execution_error"}[1m])')
            return result and min(float(r["value"][1]) for r in result) >= 2
        wait_until(scraped_twice, 60, interval=0.5, what="Prometheus scraping the zero counters")

        # Ten failures of a kind never seen before, all at once: every sampler raises in ComfyUI.
        for sim in sims:
            sim.faults(fail_at_step=1)
        ids = []
        for _ in range(10):
            r = requests.post(fleet.url + "/api/v1/generate", timeout=10, json={
                "workflow": "sdxl", "prompt": "x", "width": 256, "height": 256, "steps": 2})
            assert r.status_code == 202, r.text
            ids.append(r.json()["task_id"])
        for task_id in ids:
            wait_until(lambda: requests.get(f"{fleet.url}/api/v1/tasks/{task_id}", timeout=5).json()["status"]
                       == "failed", 30, interval=0.1, what=f"task {task_id} failed")

        workers[1].send(signal.SIGKILL)

        wait_until(lambda: firing(prom, "JobErrorRateHigh"), 60, interval=0.5, what="JobErrorRateHigh firing")
        failed = float(query(prom, "comfy:jobs_failed:increase10m")[0]["value"][1])
        assert failed >= 9, f"increase() saw {failed} of the 10 first failures"
        down = wait_until(lambda: firing(prom, "ComfyServiceWorkerDown"), 60, interval=0.5,
                          what="ComfyServiceWorkerDown firing")
        assert [(a["labels"]["queue"], a["labels"]["host"]) for a in down] == [("gpu.prom.1", "vm")]

        def delivered():
            got = requests.get(f"http://127.0.0.1:{receiver_port}/alerts", timeout=5).json()["alerts"]
            names = {(a["labels"]["alertname"], a["labels"].get("host")) for a in got if a["status"] == "firing"}
            return {("JobErrorRateHigh", None), ("ComfyServiceWorkerDown", "vm")} <= names
        # Alertmanager's group_wait (10 s critical, 30 s warning) is the shipped one.
        wait_until(delivered, 90, interval=1, what="both alerts delivered to the receiver")
        assert "ALERT firing ComfyServiceWorkerDown" in receiver.output()
        assert "host=vm" in receiver.output()
    except BaseException:
        for s in services:
            sys.__stderr__.write(f"\n==== {s.name}\n{s.output()[-3000:]}\n")
        raise
    finally:
        for s in services:
            s.stop()
