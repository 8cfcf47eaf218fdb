"""The fleet knows its models: each worker reports the checkpoints its ComfyUI offers, a job
goes only to a GPU that has its checkpoint, one no GPU ever offered is refused before it
reaches ComfyUI, and (WAIT_FOR_GPUS) one offered only by GPUs that are down waits for them."""
from __future__ import annotations

import signal
import time

import pytest
import requests

from common.dispatch import JobSpec, choose, known_checkpoints, waiting_queue
from tests.support.api import submit, wait_status
from tests.support.procs import wait_until
from workers.comfy.models import NodeInfo
from workers.runtime import checkpoint_names

pytestmark = pytest.mark.timeout(150)
A, B = "alpha_v1.safetensors", "beta_v2.safetensors"


def sdxl(checkpoint: str, **fields) -> dict:
    return {"workflow": "sdxl", "prompt": "a lighthouse at dusk", "width": 256, "height": 256, "steps": 3,
            "checkpoint": checkpoint, **fields}


# ---- Pure: the heartbeat's list, dispatch, where a job waits ---------------------------------------

def test_checkpoint_names_read_both_object_info_forms():
    old = {"CheckpointLoaderSimple": NodeInfo.from_raw("CheckpointLoaderSimple", {
        "input": {"required": {"ckpt_name": [[B, A], {"tooltip": "..."}]}}})}
    new = {"CheckpointLoaderSimple": NodeInfo.from_raw("CheckpointLoaderSimple", {
        "input": {"required": {"ckpt_name": ["COMBO", {"options": [A]}]}}})}
    assert checkpoint_names(old) == [A, B] and checkpoint_names(new) == [A] and checkpoint_names({}) is None


def gpu(queue: str, checkpoints, **extra) -> dict:
    return {"queue": queue, "comfyui_ok": True, "checkpoints": checkpoints, "load": 0.0, **extra}


def test_dispatch_sends_a_job_only_where_its_checkpoint_is():
    fleet = [gpu("gpu.a.0", [A]), gpu("gpu.b.0", [B], load=50.0)]
    assert choose(fleet, JobSpec("sdxl", checkpoint=B)) == "gpu.b.0"  # busier, but the only one with it
    assert choose(fleet, JobSpec("sdxl", checkpoint="other.safetensors")) is None
    assert choose([gpu("gpu.c.0", None)], JobSpec("sdxl", checkpoint=B)) == "gpu.c.0"  # not read yet: allowed


def test_a_job_for_a_gpu_that_is_down_waits_on_the_last_one_seen_that_fits():
    known = {"gpu.a.0": {"checkpoints": [A], "last_seen": 10}, "gpu.b.0": {"checkpoints": [B], "last_seen": 5},
             "gpu.b.1": {"checkpoints": [B], "last_seen": 7}}
    assert known_checkpoints(known) == {A, B}
    assert waiting_queue(known, JobSpec("sdxl", checkpoint=B)) == "gpu.b.1"
    assert waiting_queue(known, JobSpec("sdxl", checkpoint="x.safetensors")) is None
    assert waiting_queue(known, JobSpec("sdxl", checkpoint=B, gpu="gpu.b.0")) == "gpu.b.0"


# ---- Over HTTP against two GPUs with different models ------------------------------------------------

@pytest.fixture
def two_models(fleet_factory):
    fleet = fleet_factory(WAIT_FOR_GPUS="true")
    sims = [fleet.add_sim("--step-seconds", "0.02", "--checkpoints", models) for models in (A, B)]
    for sim in sims:
        fleet.add_worker(sim)
    fleet.wait_workers()
    fleet.start_api()
    return fleet, sims


def test_each_job_lands_on_a_gpu_that_has_its_model(two_models):
    fleet, sims = two_models
    listed = requests.get(fleet.url + "/api/v1/workflows", timeout=5).json()
    assert listed["checkpoints"] == [A, B]
    tasks = [submit(fleet.url, sdxl(model)) for model in (A, B, A, B, B)]
    done = [wait_status(fleet.url, t["task_id"], timeout=60) for t in tasks]
    assert [d["status"] for d in done] == ["succeeded"] * 5
    assert [d["gpu"] for d in done] == ["gpu.test.0", "gpu.test.1", "gpu.test.0", "gpu.test.1", "gpu.test.1"]


def test_a_checkpoint_no_gpu_ever_had_never_reaches_comfyui(two_models):
    fleet, sims = two_models
    refused = requests.post(fleet.url + "/api/v1/generate", json=sdxl("gamma.safetensors"), timeout=5)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert (error["source"], error["code"]) == ("service", "unknown_checkpoint")
    assert error["details"]["available"] == [A, B]
    assert [s.record()["submitted"] for s in sims] == [[], []]


def test_a_checkpoint_only_a_down_gpu_has_waits_for_it(two_models):
    fleet, sims = two_models
    fleet.workers[1].stop(signal.SIGTERM)  # GPU 1 (the only one with B) leaves the fleet
    wait_until(lambda: [w["queue"] for w in requests.get(fleet.url + "/api/v1/workers", timeout=5).json()[
        "workers"]] == ["gpu.test.0"], 20, what="GPU 1 gone")
    task = submit(fleet.url, sdxl(B))
    assert task["status"] == "queued" and "waits for gpu.test.1" in task["waiting_reason"], task
    time.sleep(2)  # several monitor rounds: no live GPU fits, so it stays where it waits
    assert requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5).json()["status"] == "queued"
    # An autoscaler (here: the test) brings a GPU with that model back: the job runs there.
    fleet.workers[1].start()
    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded" and done["gpu"] == "gpu.test.1" and done["waiting_reason"] is None
    assert sims[0].record()["submitted"] == []  # GPU 0, without the model, never saw it
