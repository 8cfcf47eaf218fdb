"""The command line (python -m app.cli) as a script sees it: real processes, outputs and exit codes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from app.client import ComfyServiceClient
from tests.support.procs import REPO, free_port, wait_until

pytestmark = pytest.mark.timeout(90)

PNG = b"\x89PNG\r\n\x1a\n"
SIM_ARGS = ("--step-seconds", "0.02", "--load-seconds", "0.2")
STORY = ["--character", "Lena=a young woman with red hair", "--scene", "[Lena] wakes up in a small flat",
         "--scene", "[Lena] walks to the sea", "--width", "256", "--height", "256"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One GPU, shared: each test follows its own jobs only."""
    from tests.support.fleet import one_gpu_fleet

    fleet = one_gpu_fleet(tmp_path_factory, "cli-fleet", *SIM_ARGS)
    yield fleet
    fleet.stop()


def command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "--url", url, *args]


def cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command(url, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_generate(url: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A waiting `generate` in the background, and its task id (its first line on stderr)."""
    proc = subprocess.Popen(command(url, "generate", *args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert first.startswith("task "), first + proc.stderr.read()
    return proc, first.split()[1]


def test_generate_downloads_the_images(fleet, tmp_path):
    done = cli(fleet.url, "generate", *STORY, "--seed", "3", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    paths = [tmp_path / "out" / line.rsplit("/", 1)[-1] for line in done.stdout.split()]
    assert len(paths) == 2 and all(p.read_bytes().startswith(PNG) for p in paths)
    assert "succeeded: 2 image(s)" in done.stderr


def test_generate_json_then_status_json(fleet, tmp_path):
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"workflow": "sdxl", "prompt": "a lighthouse at dusk", "width": 512, "height": 256}))
    done = cli(fleet.url, "generate", "--body", str(body), "--width", "256", "--set", "cfg=6.5", "--json", "--quiet",
               "--out", str(tmp_path))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "succeeded" and len(task["downloaded"]) == 1
    params = task["params"]
    assert [params[k] for k in ("prompt", "width", "height", "cfg")] == ["a lighthouse at dusk", 256, 256, 6.5]
    assert (tmp_path / f"{task['task_id']}-0.png").read_bytes().startswith(PNG)

    status = cli(fleet.url, "status", task["task_id"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["result"] == task["result"]
    human = cli(fleet.url, "status", task["task_id"])
    assert human.returncode == 0 and "succeeded" in human.stdout and "image 0" in human.stdout


def test_no_wait_prints_the_task_id(fleet):
    done = cli(fleet.url, "generate", *STORY, "--no-wait")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    final = ComfyServiceClient(fleet.url).wait(task_id, timeout=30)
    assert final.status == "succeeded"


def test_failed_job_exits_1(fleet):
    fleet.sims[0].faults(fail_at_step=1)  # ComfyUI fails the run
    try:
        done = cli(fleet.url, "generate", *STORY)
    finally:
        fleet.sims[0].faults(reset=True)
    assert done.returncode == 1, done.stderr
    assert "error: comfyui/" in done.stderr and done.stdout == ""


def test_rejected_request_exits_4_and_usage_errors_exit_2(fleet):
    done = cli(fleet.url, "generate", "--character", "Lena=red hair", "--scene", "[Bob] shows up")
    assert done.returncode == 4
    assert "error: service/invalid_parameters: scenes:" in done.stderr and "[Bob]" in done.stderr
    assert cli(fleet.url, "status", "00000000-0000-4000-8000-000000000000").returncode == 4
    bad_pair = cli(fleet.url, "generate", "--character", "no-equals-sign")
    assert bad_pair.returncode == 2 and "--character takes NAME=DESCRIPTION" in bad_pair.stderr
    assert cli(fleet.url, "frobnicate").returncode == 2
    assert cli("127.0.0.1:8080", "workers").returncode == 2  # no scheme


def test_nothing_listening_exits_5():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["workers"], ["generate", *STORY], ["status", "x"]):
        done = cli(url, *args)
        assert done.returncode == 5, (args, done.stderr)
        assert done.stderr.startswith("error: client/unreachable: ")


def test_cancel_from_another_process_exits_3(fleet):
    waiting, task_id = start_generate(fleet.url, *STORY, "--steps", "100")
    cancel = cli(fleet.url, "cancel", task_id)
    assert cancel.returncode == 0 and task_id in cancel.stdout, cancel.stderr
    _, stderr = waiting.communicate(timeout=30)
    assert waiting.returncode == 3 and f"task {task_id} was cancelled" in stderr
    assert cli(fleet.url, "cancel", task_id).returncode == 4  # 409: it already ended


@pytest.mark.parametrize("cancel", [False, True], ids=["job-goes-on", "cancel-on-interrupt"])
def test_interrupt_exits_130(fleet, cancel):
    waiting, task_id = start_generate(fleet.url, *STORY, "--steps", "100", *(["--cancel-on-interrupt"] * cancel))
    client = ComfyServiceClient(fleet.url)
    wait_until(lambda: client.get(task_id).status == "running", 20, what="the job to start")
    waiting.send_signal(signal.SIGINT)
    _, stderr = waiting.communicate(timeout=20)
    assert waiting.returncode == 130, stderr
    if cancel:
        assert f"interrupted: task {task_id} " in stderr and "cancelled" in stderr
        assert client.wait(task_id, timeout=20).status == "cancelled"
    else:  # the job goes on, and the message says how to follow it
        assert f"status {task_id}" in stderr and client.get(task_id).status == "running"
        client.cancel(task_id)


def test_workers_and_workflows_tables(fleet):
    workers = cli(fleet.url, "workers")
    assert workers.returncode == 0, workers.stderr
    header, row = workers.stdout.splitlines()
    assert header.split()[:3] == ["QUEUE", "HOST", "GPU"] and "DRAINING" in header
    assert row.startswith("gpu.test.0") and "NVIDIA GeForce RTX 4090" in row and "/24.0 GiB" in row

    workflows = cli(fleet.url, "workflows")
    assert workflows.returncode == 0, workflows.stderr
    heads = [line for line in workflows.stdout.splitlines() if line and not line.startswith(" ")]
    assert sorted(heads) == ["sdxl: SDXL text to image", "storydiffusion (default): StoryDiffusion"]
    assert any(line.split()[:2] == ["scenes", "array"] and "required" in line for line in workflows.stdout.splitlines())
    as_json = json.loads(cli(fleet.url, "workflows", "--json").stdout)
    assert {w["name"] for w in as_json} == {"storydiffusion", "sdxl"}


def test_fleet_shows_the_scaling_decision(fleet):
    shown = cli(fleet.url, "fleet")
    assert shown.returncode == 0, shown.stderr
    first, header, row = shown.stdout.splitlines()[:3]
    assert first.startswith("GPUs: 1 now, ") and "desired" in first
    assert header.split() == ["QUEUE", "STATE", "WORK", "S", "IDLE", "S", "S/UNIT", "CHECKPOINT"]
    assert row.startswith("gpu.test.0")
    as_json = json.loads(cli(fleet.url, "fleet", "--json").stdout)
    assert as_json["current"] == 1 and [g["queue"] for g in as_json["gpus"]] == ["gpu.test.0"]


def test_api_key_from_option_or_environment(fleet_factory):
    key = "cli-test-key-0123456789"
    keyed = fleet_factory(API_KEYS=f"tester:{key}")
    keyed.start_api()  # the API alone: /workers answers an empty fleet
    refused = cli(keyed.url, "workers")
    assert refused.returncode == 4 and "error: service/missing_api_key: " in refused.stderr
    assert cli(keyed.url, "--api-key", key, "workers", "--json").stdout.strip() == "[]"
    from_env = subprocess.run(command(keyed.url, "workers", "--json"), cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "COMFY_SERVICE_API_KEY": key})
    assert from_env.returncode == 0 and json.loads(from_env.stdout) == []
    keyed.api.stop(signal.SIGKILL)  # nothing to shut down gracefully: spare the teardown's wait


def test_the_installed_comfy_service_command_works_from_any_directory(fleet, tmp_path):
    """`make install` puts `comfy-service` in the venv (pyproject.toml); no PYTHONPATH needed."""
    from pathlib import Path

    command = Path(sys.executable).parent / "comfy-service"
    assert command.exists(), "make install did not install the comfy-service command"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(command), "--url", fleet.url, "workers", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [w["queue"] for w in json.loads(done.stdout)]
    usage = subprocess.run([str(command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: comfy-service")
