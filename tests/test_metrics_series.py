"""/metrics series that alerts depend on: a dead worker keeps the labels its heartbeats gave,
and every known counter label set exists from 0 (Prometheus' increase() cannot count a series'
first sample, so a counter born at its first increment hides that first failure)."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from common import metrics
from tests.support.procs import wait_until

REPO = Path(__file__).resolve().parents[1]


def samples(base: str) -> dict[tuple, float]:
    text = requests.get(base + "/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def find(all_samples: dict, name: str, **labels) -> list[float]:
    return [v for (n, ls), v in all_samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())]


def test_known_failures_cover_every_code_the_code_base_produces():
    produced = set()
    tasks = (REPO / "workers/tasks.py").read_text()
    produced |= set(re.findall(r'_error\(\s*"(service|comfyui)",\s*"([a-z_]+)"', tasks))
    errors = (REPO / "workers/comfy/errors.py").read_text()
    produced |= {("comfyui", c) for c in re.findall(r'\bcode = "([a-z_]+)"', errors)}
    for path in ("app/routes.py", "workers/monitor.py"):
        text = (REPO / path).read_text()
        produced |= set(re.findall(r'"source": "(service|comfyui)", "code": "([a-z_]+)"', text))
    # The failover monitor's decisions (common/reconcile.py): FAIL is ComfyUI's, the others the service's.
    reconcile = REPO / "common/reconcile.py"
    if reconcile.exists():
        text = reconcile.read_text()
        for action, code in re.findall(r"Decision\((FAIL|GIVE_UP|TIMEOUT), \"([a-z_]+)\"", text):
            produced.add(("comfyui" if action == "FAIL" else "service", code))
        for a, b in re.findall(r'code = "([a-z_]+)" if .* else "([a-z_]+)"', text):
            produced |= {("service", a), ("service", b)}
    assert ("comfyui", "validation_error") in produced and ("service", "worker_lost") in produced  # the scan works
    assert produced <= set(metrics.KNOWN_FAILURES), sorted(produced - set(metrics.KNOWN_FAILURES))


def test_counters_start_at_zero_and_a_dead_worker_keeps_its_heartbeat_labels(fleet_factory):
    # Queue names that do not contain the host: the host label must come from the heartbeat.
    fleet = fleet_factory(WORKER_HOST="vm")
    sims = [fleet.add_sim("--step-seconds", "0.01") for _ in range(2)]
    workers = [fleet.add_worker(sim, queue=f"gpu.prom.{i}") for i, sim in enumerate(sims)]
    fleet.wait_workers()
    fleet.start_api()

    before = samples(fleet.url)
    for workflow in ("storydiffusion", "sdxl"):
        assert find(before, "comfy_jobs_submitted_total", workflow=workflow) == [0.0]
        assert find(before, "comfy_jobs_succeeded_total", workflow=workflow) == [0.0]
        assert find(before, "comfy_jobs_cancelled_total", workflow=workflow) == [0.0]
        for source, code in metrics.KNOWN_FAILURES:
            assert find(before, "comfy_jobs_failed_total", workflow=workflow, source=source, code=code) == [0.0]
    assert find(before, "comfy_webhook_attempts_total", event="succeeded", outcome="failed") == [0.0]
    assert find(before, "comfy_worker_up", queue="gpu.prom.1", host="vm") == [1.0]

    workers[1].send(signal.SIGKILL)
    wait_until(lambda: find(samples(fleet.url), "comfy_worker_up", queue="gpu.prom.1") == [0.0], 15,
               interval=0.2, what="gpu.prom.1 reported down")
    after = samples(fleet.url)
    # One series, the same labels as alive: the alert names the host the worker ran on.
    assert find(after, "comfy_worker_up", queue="gpu.prom.1", host="vm") == [0.0]
    assert len(find(after, "comfy_worker_up", queue="gpu.prom.1")) == 1
    assert find(after, "comfy_worker_up", queue="gpu.prom.0", host="vm") == [1.0]
