"""Honest job states over HTTP against simulated GPUs: a job waiting inside ComfyUI is queued
(with its GPU and place in line), it turns running when ComfyUI starts it, and the same is
true in GET, the event stream, webhooks and metrics. A Celery revoke (CLI or Flower's way)
cancels like DELETE. /readyz is ready only while a worker takes jobs."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
import requests
import sseclient

from common.producer import make_celery
from common.settings import Settings
from tests.support.api import story, submit, wait_status
from tests.support.procs import REPO, wait_until
from tests.test_events import SECRET, Receiver

pytestmark = pytest.mark.timeout(180)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def follow(base: str, task_id: str, out: list) -> threading.Thread:
    """Read a job's event stream in the background: (event, data, arrival time, id) each; the id
    is None on a queued frame that only says the job's place in line changed."""
    def read():
        response = requests.get(f"{base}/api/v1/tasks/{task_id}/events", stream=True, timeout=60)
        for event in sseclient.SSEClient(response).events():
            out.append((event.event, json.loads(event.data), time.time(), event.id or None))
        response.close()
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def docs(base: str, tasks: list[dict]) -> list[dict]:
    return [requests.get(f"{base}/api/v1/tasks/{t['task_id']}", timeout=5).json() for t in tasks]


def test_two_gpus_four_long_jobs_two_run_and_two_wait_inside_comfyui(fleet_factory):
    receiver = Receiver()
    fleet = fleet_factory(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}")
    sims, workers = fleet.start_gpus(2, "--step-seconds", "0.05")
    fleet.add_webhook_worker()
    try:
        # Two long jobs (~120 s each, one per GPU: dispatch spreads equal work) run until this test
        # cancels them, so "two run, two wait" holds for as long as the checks below take however
        # loaded the host; the two short ones wait behind them inside ComfyUI, then run to the end.
        def body(i: int, **fields) -> dict:
            return story(callback_url=receiver.url(f"/hooks/{i}"), callback_events=["started"], **fields)
        long = [submit(fleet.url, body(i, scenes=["[Lena] reads a letter"] * 24, steps=100)) for i in range(2)]
        # Each inside its ComfyUI before the short ones come: a worker runs two jobs at once, and a
        # short one arriving while it still prepared the long one could reach ComfyUI first.
        wait_until(lambda: all(d["gpu"] for d in docs(fleet.url, long)), 30, what="the long jobs inside ComfyUI")
        tasks = [*long, *(submit(fleet.url, body(i, steps=30)) for i in range(2, 4))]
        streams = {t["task_id"]: [] for t in tasks}
        readers = [follow(fleet.url, task_id, out) for task_id, out in streams.items()]

        # Each worker runs one prompt and keeps the next inside its ComfyUI: that one is queued.
        def two_and_two():
            seen = docs(fleet.url, tasks)
            return (sorted(d["status"] for d in seen) == ["queued", "queued", "running", "running"]
                    and all(d["gpu"] for d in seen) and seen)
        seen = wait_until(two_and_two, 30, what="two running, two queued inside ComfyUI")
        waiting = [d for d in seen if d["status"] == "queued"]
        running = [d for d in seen if d["status"] == "running"]
        assert {d["task_id"] for d in running} == {t["task_id"] for t in long}
        assert sorted(d["gpu"] for d in waiting) == sorted(d["gpu"] for d in running) == ["gpu.test.0", "gpu.test.1"]
        for doc in waiting:
            assert doc["queue_position"] == 1 and doc["progress"] is None and doc["started_at"] is None, doc
            assert not any(kind == "started" for kind, *_ in streams[doc["task_id"]]), "started before ComfyUI did"
        metrics = requests.get(fleet.url + "/metrics", timeout=5).text
        assert 'comfy_jobs_running{queue="gpu.test.0"} 1.0' in metrics
        assert 'comfy_jobs_running{queue="gpu.test.1"} 1.0' in metrics
        assert 'comfy_queue_depth{queue="gpu.test.0"} 1.0' in metrics

        for task in long:
            requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=10)
        finals = [wait_status(fleet.url, t["task_id"], timeout=60) for t in tasks]
        assert [d["status"] for d in finals] == ["cancelled"] * 2 + ["succeeded"] * 2
        for reader in readers:
            reader.join(10)
        # Every job turned running when its ComfyUI started executing it, not before: the record,
        # the event stream and the webhook all say so after the simulator's own start time.
        started_by_prompt = {b["prompt_id"]: b["start"] for sim in sims for b in sim.record()["busy"]}
        hooks = {}
        for i, task in enumerate(tasks):
            wait_until(lambda i=i: receiver.received(f"/hooks/{i}") and len(receiver.received(f"/hooks/{i}")) >= 2,
                       20, what="started and final webhooks")
            now_mono, now = time.monotonic(), time.time()
            hooks[task["task_id"]] = [
                (json.loads(r["body"])["type"], now - (now_mono - r["at"])) for r in receiver.received(f"/hooks/{i}")]
        for doc in finals:
            record = fleet_record(fleet, doc["task_id"])
            comfy_start = started_by_prompt[record["prompt_id"]]
            assert epoch(doc["started_at"]) >= comfy_start - 0.002, doc
            stream = streams[doc["task_id"]]
            # The job's log: submitted, handed to its GPU, started, ..., its end. Between them the
            # stream may say, without an id, that its place in line changed (a neighbour cancelled
            # ahead of it turns it next before ComfyUI starts it): queued still, never later.
            logged = [(kind, data) for kind, data, _, event_id in stream if event_id]
            kinds = [kind for kind, _ in logged]
            assert kinds[:3] == ["queued", "queued", "started"] and kinds[-1] == doc["status"], (
                doc["task_id"], [t["task_id"] for t in tasks], stream[:5])
            assert logged[1][1]["gpu"] == doc["gpu"]
            first_started = [kind for kind, *_ in stream].index("started")
            assert all(kind == "queued" for kind, *_ in stream[:first_started]), stream[:5]
            assert not any(kind == "queued" for kind, *_ in stream[first_started:]), stream
            started_event = next(at for kind, _, at, _ in stream if kind == "started")
            assert started_event >= comfy_start, (doc["task_id"], started_event, comfy_start)
            started_hook = [at for kind, at in hooks[doc["task_id"]] if kind == "task.started"]
            assert len(started_hook) == 1 and started_hook[0] >= comfy_start - 0.01, hooks[doc["task_id"]]
    finally:
        receiver.close()


def fleet_record(fleet, task_id: str) -> dict:
    import redis

    from common.task_store import read_record

    return read_record(redis.Redis.from_url(fleet.redis.url), task_id) or {}


def celery_cli(fleet, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.celery_app", *args], cwd=REPO,
                          env={**fleet.env(), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_celery_revoke_cancels_like_delete_wherever_the_job_is(fleet_factory):
    fleet = fleet_factory()
    (sim,), _ = fleet.start_gpus(1, "--step-seconds", "0.05")
    running, handed, waiting, last = (submit(fleet.url, story(steps=40)) for _ in range(4))
    wait_until(lambda: [d["status"] for d in docs(fleet.url, [running, handed])] == ["running", "queued"]
               and docs(fleet.url, [handed])[0]["gpu"], 30, what="one running, one inside ComfyUI's queue")

    # Waiting in Celery: the operator's revoke (the CLI) ends it at once; it never reaches the GPU.
    assert "revoked" in celery_cli(fleet, "control", "revoke", waiting["task_id"])
    assert wait_status(fleet.url, waiting["task_id"], timeout=10)["status"] == "cancelled"

    # Inside ComfyUI's queue, by Flower's Terminate (a revoke with terminate=True): deleted there.
    flower_like = make_celery(Settings(REDIS_URL=fleet.redis.url))
    flower_like.control.revoke(handed["task_id"], terminate=True, signal="SIGTERM")
    assert wait_status(fleet.url, handed["task_id"], timeout=15)["status"] == "cancelled"

    # Running: the CLI's revoke interrupts that prompt in ComfyUI, and the job ends cancelled.
    progress_before = docs(fleet.url, [running])[0]["progress"]["percent"]
    celery_cli(fleet, "control", "revoke", running["task_id"])
    done = wait_status(fleet.url, running["task_id"], timeout=15)
    assert done["status"] == "cancelled" and done["progress"]["percent"] < 100, (progress_before, done)

    # The neighbour was never touched: it runs and succeeds.
    assert wait_status(fleet.url, last["task_id"], timeout=60)["status"] == "succeeded"
    record = sim.record()
    prompts = {t["task_id"]: fleet_record(fleet, t["task_id"]).get("prompt_id") for t in (running, handed, last)}
    assert prompts[handed["task_id"]] in record["deleted"]
    assert [i["interrupted_prompt_id"] for i in record["interrupts"]] == [prompts[running["task_id"]]]
    assert prompts[last["task_id"]] not in record["deleted"]
    assert fleet_record(fleet, waiting["task_id"]).get("prompt_id") is None  # never handed to a GPU
    assert len(record["submitted"]) == 3


def test_readyz_is_not_ready_while_the_only_worker_drains(fleet_factory):
    fleet = fleet_factory()
    _, (worker,) = fleet.start_gpus(1, "--step-seconds", "0.05")
    assert requests.get(fleet.url + "/readyz", timeout=5).status_code == 200
    task = submit(fleet.url, story(steps=50))
    wait_status(fleet.url, task["task_id"], statuses=("running",), timeout=20)
    worker.send(signal.SIGTERM)  # warm shutdown: finishes the running job, takes nothing new

    def draining():
        answer = requests.get(fleet.url + "/readyz", timeout=5)
        return answer.status_code == 503 and answer.json()
    body = wait_until(draining, 10, what="/readyz to refuse a draining fleet")
    assert body["error"]["code"] == "not_ready" and "draining" in body["error"]["message"]
    refused = requests.post(fleet.url + "/api/v1/generate", json=story(), timeout=5)
    assert refused.status_code == 503  # /readyz and /generate agree
    assert wait_status(fleet.url, task["task_id"], timeout=60)["status"] == "succeeded"
