"""A Redis outage is waited out, not fatal to a job: the prompt keeps running, its result is
recorded once Redis is back (from the worker's own run, or collected from ComfyUI), nothing
runs twice, the API says 503 meanwhile and recovers by itself."""
from __future__ import annotations

import json
import time

import pytest
import redis
import requests

from tests.support.api import story, submit, wait_status
from tests.support.fleet import Fleet
from tests.support.procs import RedisServer, free_port, wait_until
from tests.test_events import SECRET, Receiver

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def outage_fleet(tmp_path):
    # Every write in its append-only file (fsync always), restartable on the same port.
    server, receiver = RedisServer(port=free_port(), workdir=tmp_path, durable=True).start(), Receiver()
    fleet = Fleet(workdir=tmp_path, redis=server, extra_env={
        "REDIS_OUTAGE_TOLERANCE": "60", "RECONCILE_GRACE": "2", "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_ALLOWED_HOSTS": f"127.0.0.1:{receiver.port}", "WEBHOOK_BACKOFF": "0.3"})
    fleet.receiver = receiver
    yield fleet
    fleet.stop()
    receiver.close()


def test_a_prompt_finishing_while_redis_is_down_is_recorded_once_it_is_back(outage_fleet):
    fleet = outage_fleet
    (sim,), (worker,) = fleet.start_gpus(1, "--step-seconds", "0.05")
    fleet.add_webhook_worker()
    task = submit(fleet.url, story(scenes=["[Lena] reads a letter"], steps=50,
                                   callback_url=fleet.receiver.url("/hooks/outage")))
    wait_status(fleet.url, task["task_id"], statuses=("running",), timeout=20)
    prompt_id = redis.Redis.from_url(fleet.redis.url).hget(f"cs:task:{task['task_id']}", "prompt_id").decode()[1:-1]

    fleet.redis.kill()
    refused = requests.post(fleet.url + "/api/v1/generate", json=story(), timeout=15)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["source"] == "service" and "Redis" in error["message"]
    # ComfyUI finishes the prompt while Redis is still away.
    wait_until(lambda: any(b["prompt_id"] == prompt_id for b in sim.record()["busy"]), 30,
               what="ComfyUI to finish the prompt")
    time.sleep(1.0)
    fleet.redis.start()  # the same port, the same data (its AOF)

    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert len(done["result"]["images"]) == 1
    assert requests.get(fleet.url + done["result"]["images"][0]["url"], timeout=5).status_code == 200
    runs = [b for b in sim.record()["busy"] if b["prompt_id"] == prompt_id]
    assert len(runs) == 1 and len(sim.record()["submitted"]) == 1  # ran once, never again
    assert worker.alive(), worker.output()[-3000:]  # the worker rode out the restart
    # The final webhook, owed since the end of the outage, is delivered.
    wait_until(lambda: fleet.receiver.received("/hooks/outage"), 30, what="the final webhook")
    assert json.loads(fleet.receiver.received("/hooks/outage")[0]["body"])["type"] == "task.succeeded"

    # The API recovered by itself: no restart.
    def accepts():
        answer = requests.post(fleet.url + "/api/v1/generate", json=story(scenes=["[Lena] waves"], steps=2), timeout=10)
        return answer.status_code == 202 and answer.json()
    again = wait_until(accepts, 30, what="the API to accept jobs again")
    assert wait_status(fleet.url, again["task_id"], timeout=30)["status"] == "succeeded"
