"""Operations: Prometheus metrics from a running fleet, and Flower's view of it."""
from __future__ import annotations

import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import story, submit, wait_status
from tests.support.fleet import Proc
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.timeout(120)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = requests.get(base + "/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_follow_the_jobs_across_api_processes(fleet_factory):
    fleet = fleet_factory()
    sim = fleet.add_sim("--step-seconds", "0.02", "--gpu-name", "Metrics GPU", "--vram", "16")
    fleet.add_worker(sim)
    fleet.wait_workers()
    fleet.start_api(processes=2)

    before = scrape(fleet.url)
    assert value(before, "comfy_workers_alive") == 1
    assert value(before, "comfy_jobs_submitted_total", workflow="storydiffusion") == 0.0  # known label sets start at 0 (increase() needs the 0)

    ok = [submit(fleet.url, story()) for _ in range(2)]
    for task in ok:
        assert wait_status(fleet.url, task["task_id"])["status"] == "succeeded"
    sim.faults(fail_at_step=2)
    bad = submit(fleet.url, story())
    assert wait_status(fleet.url, bad["task_id"])["status"] == "failed"
    sim.faults(reset=True)

    after = scrape(fleet.url)
    assert value(after, "comfy_jobs_submitted_total", workflow="storydiffusion") == 3
    assert value(after, "comfy_jobs_succeeded_total", workflow="storydiffusion") == 2
    assert value(after, "comfy_jobs_failed_total", workflow="storydiffusion", source="comfyui",
                 code="execution_error") == 1
    assert value(after, "comfy_job_run_seconds_count", workflow="storydiffusion") == 2
    assert value(after, "comfy_job_end_to_end_seconds_count", workflow="storydiffusion") == 3
    assert value(after, "comfy_job_overhead_seconds_bucket", workflow="storydiffusion", le="+Inf") == 2
    assert value(after, "comfy_queue_depth", queue="gpu.test.0") == 0
    assert value(after, "comfy_comfyui_up", queue="gpu.test.0", url=sim.url) == 1
    totals = {k: v for k, v in after.items() if k[0] == "comfy_gpu_memory_total_bytes"}
    assert list(totals.values()) == [16 * 1024**3]
    assert value(after, "comfy_last_success_timestamp_seconds") > 0
    # Figures live in Redis: every gunicorn process and replica serves the same numbers.
    for _ in range(4):
        again = scrape(fleet.url)
        assert all(again[key] == after[key] for key in after if key[0].startswith("comfy_jobs_"))


def test_flower_sees_the_workers_and_readable_jobs(fleet_factory):
    fleet = fleet_factory()
    fleet.add_worker(fleet.add_sim("--step-seconds", "0.02"))
    fleet.wait_workers()
    fleet.start_api()
    port = free_port()
    flower = Proc("flower", [sys.executable, "-m", "deploy.flower"],
                  {**fleet.env(), "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": "ops:s3cret",
                   "FLOWER_DB": str(fleet.workdir / "flower.db")}, fleet.workdir / "flower.log").start()
    fleet.workers.append(flower)  # stopped with the fleet
    base, auth = f"http://127.0.0.1:{port}", ("ops", "s3cret")
    wait_until(lambda: requests.get(base + "/healthcheck", timeout=1).status_code == 200, 30, what="Flower")
    assert requests.get(base + "/api/workers", timeout=5).status_code == 401  # basic auth is on

    workers = wait_until(lambda: requests.get(base + "/api/workers?refresh=1", auth=auth, timeout=10).json(), 20,
                         what="Flower's worker list")
    assert any(name.startswith("gpu.test.0@") for name in workers)
    # Flower follows the event stream once a worker's events reached it.
    wait_until(lambda: requests.get(base + "/api/workers?status=1", auth=auth, timeout=10).json(), 20,
               what="worker events in Flower")

    task = submit(fleet.url, story())
    assert wait_status(fleet.url, task["task_id"])["status"] == "succeeded"

    def seen():
        tasks = requests.get(base + "/api/tasks", auth=auth, timeout=5).json()
        return tasks.get(task["task_id"]) if tasks.get(task["task_id"], {}).get("state") == "SUCCESS" else None
    entry = wait_until(seen, 20, what="the job in Flower's task list")
    assert entry["name"] == "comfy.run_workflow"
    assert entry["args"] == f"['{task['task_id']}']" and "storydiffusion" in entry["kwargs"]
    assert len(entry["args"]) + len(entry["kwargs"]) < 300  # a summary, not the graph
