"""The service end to end: gunicorn API, real Celery workers, a private Redis, simulators."""
from __future__ import annotations

import io
import json
import signal

import pytest
import redis
import requests
from PIL import Image

from common.task_store import read_record

from tests.support.api import story, submit, wait_status
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fleet(fleet_factory):
    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.02")
    yield fleet


@pytest.fixture(scope="module")
def quiet_fleet(tmp_path_factory):
    """One fleet shared by the tests that only read or get refused: nothing they do changes it."""
    from tests.support.fleet import one_gpu_fleet

    fleet = one_gpu_fleet(tmp_path_factory, "quiet-fleet", "--step-seconds", "0.02")
    yield fleet
    fleet.stop()


def task_record(fleet, task_id: str) -> dict:
    return read_record(redis.Redis.from_url(fleet.redis.url), task_id) or {}


def test_generate_runs_storydiffusion_and_serves_its_images(fleet):
    accepted = requests.post(fleet.url + "/api/v1/generate", json=story(seed=42, steps=30), timeout=10)
    assert accepted.status_code == 202
    task = accepted.json()
    assert task["status"] == "queued" and task["params"]["seed"] == 42
    assert accepted.headers["Location"] == f"/api/v1/tasks/{task['task_id']}"

    percents = []
    done = wait_status(fleet.url, task["task_id"], on_poll=lambda d: d["status"] == "running" and percents.append(
        d["progress"]["percent"]))
    assert done["status"] == "succeeded", done
    assert len(set(percents)) >= 2 and percents == sorted(percents), percents  # progress moved, never back
    assert done["gpu"] == "gpu.test.0" and done["started_at"] and done["finished_at"]
    images = done["result"]["images"]
    assert len(images) == 2  # one per scene
    for image in images:
        assert (image["content_type"], image["width"], image["height"]) == ("image/png", 256, 256)
        body = requests.get(fleet.url + image["url"], timeout=5)
        assert body.status_code == 200 and body.headers["Content-Type"] == "image/png"
        png = Image.open(io.BytesIO(body.content))
        assert png.size == (256, 256)
        # The editor graph rides along, as ComfyUI embeds it: the PNG opens in ComfyUI with its graph.
        assert json.loads(png.info["workflow"])["nodes"]


def test_images_stored_in_s3_are_served_by_the_api(fleet_factory, s3_endpoint):
    import boto3

    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="comfy-outputs")
    fleet = fleet_factory(STORAGE_BACKEND="s3", S3_BUCKET="comfy-outputs", S3_ENDPOINT_URL=s3_endpoint, **creds)
    fleet.add_worker(fleet.add_sim("--step-seconds", "0.02"))
    fleet.wait_workers()
    fleet.start_api()
    done = wait_status(fleet.url, submit(fleet.url, story())["task_id"])
    assert done["status"] == "succeeded", done
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")

    def stored() -> list[str]:
        return [item["Key"] for item in s3.list_objects_v2(Bucket="comfy-outputs").get("Contents", [])]

    assert len([key for key in stored() if key.endswith(".png")]) == 2 and not (fleet.workdir / "outputs").exists()
    image = requests.get(fleet.url + done["result"]["images"][1]["url"], timeout=5)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # Its log lines leave Redis for the bucket once the run ended, and are served from there.
    client = redis.Redis.from_url(fleet.redis.url)
    moved = f"{done['task_id']}/log.jsonl"
    wait_until(lambda: any(key.endswith(moved) for key in stored()) and not client.exists(f"cs:logs:{done['task_id']}"),
               15, what="the job's log to move from Redis to the bucket")
    lines = requests.get(f"{fleet.url}/api/v1/tasks/{done['task_id']}/logs", timeout=5).json()["lines"]
    assert any(f"task {done['task_id']} succeeded" in line["m"] for line in lines), lines


def test_sdxl_workflow_and_random_seed_reported(fleet):
    task = submit(fleet.url, {"workflow": "sdxl", "prompt": "a lighthouse at dusk", "width": 512, "height": 256})
    assert 0 <= task["params"]["seed"] <= 2**31 - 1
    done = wait_status(fleet.url, task["task_id"])
    assert done["status"] == "succeeded", done
    assert [(i["width"], i["height"]) for i in done["result"]["images"]] == [(512, 256)]


def test_comfyui_validation_error_keeps_node_errors(fleet):
    # The model file was deleted after the worker last listed its ComfyUI's checkpoints
    # (CHECKPOINTS_REFRESH): the service still offers it, ComfyUI's own validation refuses it.
    fleet.sims[0].faults(remove_checkpoint="juggernautXL_v8Rundiffusion.safetensors")
    try:
        task = submit(fleet.url, story())
        done = wait_status(fleet.url, task["task_id"])
    finally:
        fleet.sims[0].faults(reset=True)
    assert done["status"] == "failed"
    error = done["error"]
    assert error["source"] == "comfyui"
    node = error["details"]["node_errors"]["84"]
    assert node["class_type"] == "CheckpointLoaderSimple"
    assert node["errors"][0]["type"] == "value_not_in_list"


def test_comfyui_execution_error_names_the_node(fleet):
    fleet.sims[0].faults(fail_at_step=3)
    task = submit(fleet.url, story())
    done = wait_status(fleet.url, task["task_id"])
    assert done["status"] == "failed"
    error = done["error"]
    assert (error["source"], error["code"]) == ("comfyui", "execution_error")
    assert error["details"]["node_id"] == "352"
    assert error["details"]["node_type"] == "StoryDiffusion_KSampler"
    assert error["details"]["exception_type"]


def test_unknown_and_finished_tasks(fleet):
    missing = requests.get(fleet.url + "/api/v1/tasks/00000000-0000-4000-8000-000000000000", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"
    assert requests.get(fleet.url + "/api/v1/tasks/../../etc/passwd", timeout=5).status_code == 404
    assert requests.delete(fleet.url + "/api/v1/tasks/not-a-uuid", timeout=5).status_code == 404

    task = submit(fleet.url, story())
    wait_status(fleet.url, task["task_id"])
    again = requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5)
    assert again.status_code == 409
    assert again.json()["error"]["details"]["status"] == "succeeded"
    beyond = requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}/images/7", timeout=5)
    assert beyond.status_code == 404 and beyond.json()["error"]["code"] == "image_not_found"


def test_cancel_at_each_stage_touches_only_that_job(fleet_factory):
    fleet = fleet_factory()
    sim = fleet.add_sim("--step-seconds", "0.05")
    fleet.add_worker(sim)  # two prompt slots: one running in ComfyUI, one waiting in its queue
    fleet.wait_workers()
    fleet.start_api()
    long = dict(steps=60, scenes=["[Lena] a long walk"])
    first, second, in_celery, neighbour = (submit(fleet.url, story(**long)) for _ in range(4))

    # The worker's two threads race to submit the first two jobs: ask ComfyUI which one runs.
    def comfy_queue():
        queue = requests.get(sim.url + "/queue", timeout=5).json()
        return queue if len(queue["queue_running"]) == 1 and len(queue["queue_pending"]) == 1 else None
    queue = wait_until(comfy_queue, 15, what="one prompt running and one waiting inside ComfyUI")
    by_prompt = {task_record(fleet, t["task_id"]).get("prompt_id"): t for t in (first, second)}
    running, pending = by_prompt[queue["queue_running"][0][1]], by_prompt[queue["queue_pending"][0][1]]
    assert requests.get(f"{fleet.url}/api/v1/tasks/{in_celery['task_id']}", timeout=5).json()["status"] == "queued"

    # Still in Celery: cancelled at once, and it must never reach ComfyUI.
    gone = requests.delete(f"{fleet.url}/api/v1/tasks/{in_celery['task_id']}", timeout=10)
    assert gone.status_code == 200 and gone.json()["status"] == "cancelled"
    # Waiting in ComfyUI's queue: deleted there.
    deleted = requests.delete(f"{fleet.url}/api/v1/tasks/{pending['task_id']}", timeout=10)
    assert deleted.json()["status"] == "cancelled", deleted.json()
    # Running: interrupted.
    stopped = requests.delete(f"{fleet.url}/api/v1/tasks/{running['task_id']}", timeout=10)
    assert stopped.json()["status"] == "cancelled", stopped.json()

    after = wait_status(fleet.url, neighbour["task_id"], timeout=30)
    assert after["status"] == "succeeded"  # the neighbour ran untouched

    record = sim.record()
    prompt = {name: task_record(fleet, t["task_id"]).get("prompt_id")
              for name, t in (("running", running), ("pending", pending), ("in_celery", in_celery),
                              ("neighbour", neighbour))}
    assert prompt["in_celery"] is None and len(record["submitted"]) == 3
    assert record["deleted"] == [prompt["pending"]]
    outcomes = {b["prompt_id"]: b["outcome"] for b in record["busy"]}
    assert outcomes == {prompt["running"]: "interrupted", prompt["neighbour"]: "success"}
    assert [i["interrupted_prompt_id"] for i in record["interrupts"]] == [prompt["running"]]


def test_a_cancel_comfyui_does_not_act_on_in_time_answers_202_then_ends_cancelled(fleet_factory):
    """DELETE waits CANCEL_WAIT_SECONDS for the final event: a GPU frozen mid-step (deaf to the
    interrupt, as a hung kernel) leaves the job running with its cancel asked (202); once the
    GPU resumes, the interrupt takes effect and the job ends cancelled."""
    fleet = fleet_factory()
    sim = fleet.add_sim("--step-seconds", "0.05")
    fleet.add_worker(sim)
    fleet.wait_workers()
    fleet.start_api()
    task = submit(fleet.url, story(steps=60))
    prompt = wait_until(lambda: task_record(fleet, task["task_id"]).get("prompt_id"), 15, what="submitted")
    wait_until(lambda: (sim.record()["running"] or {}).get("prompt_id") == prompt, 15, what="running in ComfyUI")
    sim.faults(stall=True)
    answer = requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=10)
    assert answer.status_code == 202, answer.text
    assert (answer.json()["status"], answer.json()["cancel_requested"]) == ("running", True)
    sim.faults(stall=False)
    assert wait_status(fleet.url, task["task_id"], timeout=30)["status"] == "cancelled"
    assert [b["outcome"] for b in sim.record()["busy"] if b["prompt_id"] == prompt] == ["interrupted"]


def test_api_restart_loses_nothing(fleet):
    task = submit(fleet.url, story(steps=40))
    fleet.api.stop(signal.SIGKILL)
    fleet.start_api()
    done = wait_status(fleet.url, task["task_id"])
    assert done["status"] == "succeeded" and done["params"] == task["params"]


def test_readiness_follows_the_workers(fleet_factory):
    fleet = fleet_factory()
    fleet.start_api()
    not_ready = requests.get(fleet.url + "/readyz", timeout=5)
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
    refused = requests.post(fleet.url + "/api/v1/generate", json=story(), timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_worker"
    fleet.add_worker(fleet.add_sim("--step-seconds", "0.02"))
    fleet.wait_workers()
    wait_until(lambda: requests.get(fleet.url + "/readyz", timeout=5).status_code == 200, 10, what="ready")
    assert requests.get(fleet.url + "/healthz", timeout=5).json() == {"status": "ok"}


BAD_INPUTS = [
    ("malformed json", {"data": b'{"scenes": [', "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ("wrong content type", {"data": b"scenes=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     415, "unsupported_media_type"),
    ("not an object", {"json": ["[Lena] x"]}, 400, "invalid_body"),
    ("unknown workflow", {"json": {"workflow": "flux", "prompt": "x"}}, 422, "unknown_workflow"),
    ("workflow not a string", {"json": {"workflow": {"$ne": 1}}}, 422, "unknown_workflow"),
    ("undefined character", {"json": story(scenes=["[Bob] runs away"])}, 422, "invalid_parameters"),
    ("scene without marker", {"json": story(scenes=["a sunny day"])}, 422, "invalid_parameters"),
    ("width out of range", {"json": story(width=4096)}, 422, "invalid_parameters"),
    ("width not multiple of 16", {"json": story(width=500)}, 422, "invalid_parameters"),
    ("negative seed", {"json": story(seed=-5)}, 422, "invalid_parameters"),
    ("seed too large", {"json": story(seed=2**31)}, 422, "invalid_parameters"),
    ("steps as string", {"json": story(steps="20")}, 422, "invalid_parameters"),
    ("unknown field", {"json": story(colour="red")}, 422, "invalid_parameters"),
    ("no characters", {"json": {"scenes": ["[NC] sea"]}}, 422, "invalid_parameters"),
    ("oversized body", {"json": story(negative_prompt="x" * 2_000_000)}, 413, "body_too_large"),
]


@pytest.mark.parametrize("case, request_kwargs, status, code", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx_and_queues_nothing(quiet_fleet, case, request_kwargs, status, code):
    fleet = quiet_fleet
    response = requests.post(fleet.url + "/api/v1/generate", timeout=10, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["source"], error["code"]) == ("service", code)
    assert error["message"]
    if code == "invalid_parameters":
        assert error["details"]["errors"][0]["field"]
    r = redis.Redis.from_url(fleet.redis.url)
    assert r.keys("cs:task:*") == [] and r.llen("gpu.test.0") == 0


def test_workflows_are_listed_with_their_json_schema(quiet_fleet):
    fleet = quiet_fleet
    listing = requests.get(fleet.url + "/api/v1/workflows", timeout=5).json()["workflows"]
    by_name = {w["name"]: w for w in listing}
    assert by_name["storydiffusion"]["default"] is True
    props = by_name["storydiffusion"]["parameters"]["properties"]
    assert props["width"]["minimum"] == 256 and props["width"]["maximum"] == 2048
    assert "prompt" in by_name["sdxl"]["parameters"]["required"]
    spec = requests.get(fleet.url + "/openapi.json", timeout=5).json()
    assert spec["openapi"].startswith("3.") and "/api/v1/tasks/{task_id}" in spec["paths"]


def test_workers_and_workflows_match_their_openapi_schemas(quiet_fleet):
    import jsonschema

    schemas = requests.get(quiet_fleet.url + "/openapi.json", timeout=5).json()["components"]["schemas"]
    workers = requests.get(quiet_fleet.url + "/api/v1/workers", timeout=5).json()["workers"]
    assert workers
    for worker in workers:  # a real worker's heartbeat, as the API serves it
        jsonschema.validate(worker, schemas["Worker"])
    for workflow in requests.get(quiet_fleet.url + "/api/v1/workflows", timeout=5).json()["workflows"]:
        jsonschema.validate(workflow, schemas["WorkflowInfo"])
