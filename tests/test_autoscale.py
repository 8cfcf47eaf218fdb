"""`make run` with AUTOSCALE=true (deploy/devstack.py, deploy/autoscale.py): the fleet grows from
zero under a burst and drains back to zero when idle, every job running exactly once while GPUs
come and go. And a worker's heartbeat carries its measured cold start, which the decision uses.

Real processes throughout: the devstack with its own simulators and workers, on a private Redis.
How fast GPUs come up is the benchmark's to judge (`python -m bench autoscale`), not this test's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from common import keys
from common.task_store import read_record
from tests.support.api import story, submit, wait_status
from tests.support.procs import RedisServer, free_port, interrupt, wait_until

REPO = Path(__file__).resolve().parents[1]
BURST = 24
MAX_GPUS = 3

pytestmark = pytest.mark.timeout(240)


def _executions(path: Path) -> dict[str, list[dict]]:
    """Every prompt any simulator started, by task (the simulators' shared journal)."""
    prompts: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["e"] == "queued":
            prefix = next((p for p in event.get("prefixes", []) if p.startswith("cs_")), None)
            prompts[event["prompt_id"]] = {"task_id": prefix and prefix[3:], "outcome": "never started"}
        elif event["e"] in ("started", "ended"):
            prompts[event["prompt_id"]]["outcome"] = event.get("outcome", "started, never ended")
    runs: dict[str, list[dict]] = {}
    for prompt_id, prompt in prompts.items():
        if prompt["outcome"] != "never started":
            runs.setdefault(prompt["task_id"], []).append({"prompt_id": prompt_id, **prompt})
    return runs


def records_of(client, tasks: list[str]) -> list[dict]:
    return [read_record(client, t) or {} for t in tasks]


def _sims(stack: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(stack.pid).children(recursive=True):
        try:
            # Forked from the zygote, a simulator names itself (its command line is the zygote's).
            if child.name() == "comfyui_sim" or child.cmdline()[1:3] == ["-m", "comfyui_sim"]:
                out.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_autoscaled_make_run_grows_from_zero_under_a_burst_and_drains_back_to_zero(tmp_path):
    redis_server = RedisServer(port=free_port(), workdir=tmp_path).start()
    api_port, flower_port = free_port(), free_port()
    journal = tmp_path / "sims.jsonl"
    env = {**os.environ, "REDIS_URL": redis_server.url, "API_PORT": str(api_port), "FLOWER_PORT": str(flower_port),
           "FLOWER_DB": str(tmp_path / "flower.db"), "LOG_DIR": str(tmp_path / "logs"),
           "STORAGE_DIR": str(tmp_path / "outputs"), "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "3",
           "AUTOSCALE": "true", "AUTOSCALE_MIN": "0", "AUTOSCALE_MAX": str(MAX_GPUS), "AUTOSCALE_INTERVAL": "0.5",
           "SCALE_TARGET_WAIT": "2", "SCALE_DOWN_DELAY": "3", "SCALE_COLD_START": "5",
           "COMFYUI_SIM_STEP_SECONDS": "0.05", "COMFYUI_SIM_LOAD_SECONDS": "0.5",
           "COMFYUI_SIM_RECORD_FILE": str(journal), "RATE_LIMIT": "off", "RATE_LIMIT_GENERATE": "off"}
    for name in ("COMFYUI_URLS", "API_KEYS", "WAIT_FOR_GPUS"):
        env.pop(name, None)
    out = open(tmp_path / "devstack.log", "wb")
    stack = subprocess.Popen([sys.executable, "-m", "deploy.devstack"], cwd=REPO, env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{api_port}"
    log = lambda: (tmp_path / "devstack.log").read_text(errors="replace")  # noqa: E731
    client = redis_server.client()

    def fleet() -> dict:
        assert stack.poll() is None, log()
        return requests.get(base + "/api/v1/fleet", timeout=5).json()

    try:
        wait_until(lambda: "API     http" in log() or stack.poll() is not None, 90, interval=0.5, what="make run up")
        assert stack.poll() is None, log()
        # A fleet that never had a GPU starts one, so a job can wait for it; idle, it goes again.
        wait_until(lambda: "scale down: gpu." in log() and " stopped after " in log(), 60, interval=0.5,
                   what="the first GPU started and retired")
        assert "WAIT_FOR_GPUS=true" in log()
        wait_until(lambda: fleet()["current"] == 0 and not _sims(stack), 30, interval=0.5, what="zero GPUs")
        assert client.hlen(keys.KNOWN_WORKERS) == 1
        started_before = log().count("scale up: started")

        # A burst at zero GPUs: accepted (202, waiting), not refused.
        tasks = [submit(base, story(scenes=[f"[Lena] scene {i}"], steps=10))["task_id"] for i in range(BURST)]
        first = requests.get(f"{base}/api/v1/tasks/{tasks[0]}", timeout=5).json()
        assert first["status"] == "queued"
        seen = {"gpus": 0, "desired": 0}

        def note(_doc=None):
            now = fleet()
            seen["gpus"] = max(seen["gpus"], now["current"])
            seen["desired"] = max(seen["desired"], now["desired"])
        finals = [wait_status(base, t, timeout=120, on_poll=note) for t in tasks]
        assert [d["status"] for d in finals] == ["succeeded"] * BURST, [d.get("error") for d in finals]
        assert seen["desired"] == MAX_GPUS  # the burst's work asks for more than the cap
        assert seen["gpus"] >= 2, seen
        served = {r["gpu"] for r in records_of(client, tasks)}
        assert len(served) == MAX_GPUS, served  # each GPU it brought up took part of the burst
        assert log().count("scale up: started") - started_before >= MAX_GPUS
        assert "scale up: started" in log() and "desired 3" in log()

        # Idle: every GPU is retired and its simulator stopped; nothing is restarted.
        wait_until(lambda: fleet()["current"] == 0 and not _sims(stack) and
                   not requests.get(base + "/api/v1/workers", timeout=5).json()["workers"], 60, interval=0.5,
                   what="the fleet back at zero")
        assert fleet()["desired"] == 0
        assert "starting it again" not in log()

        # Exactly once: one hand-over each, no move but of a waiting job, one execution each on the GPUs.
        records = records_of(client, tasks)
        assert all(r["attempts"] == 1 for r in records), [r["attempt_log"] for r in records if r["attempts"] != 1]
        moves = [a for r in records for a in r.get("attempt_log") or []]
        assert all(a["code"] in ("gpu_unavailable", "rebalanced") for a in moves), moves
        runs = _executions(journal)
        assert set(runs) == set(tasks)
        assert {t: [r["outcome"] for r in runs[t]] for t in tasks} == {t: ["success"] for t in tasks}
        assert {r["prompt_id"] for r in records} == {runs[t][0]["prompt_id"] for t in tasks}
    finally:
        try:
            code, alive = interrupt(stack)  # Ctrl-C
        finally:
            out.close()
            redis_server.stop()
    assert code == 0, log()
    assert not alive, f"left running after Ctrl-C: {[p.pid for p in alive]}"


def test_a_heartbeat_carries_the_measured_cold_start_and_the_fleet_uses_it(fleet_factory):
    """ComfyUI answering after the worker started, plus the first checkpoint load: at least the
    simulator's load time once a cold and a warm job ran, and the fleet's decision prices with it.
    The load alone is what dispatch charges a job whose checkpoint the GPU does not hold."""
    load = 5.0  # above what the worker's own start takes here, so a cold start without it is too small
    fleet = fleet_factory(SCALE_COLD_START="999")
    sim = fleet.add_sim("--step-seconds", "0.02", "--load-seconds", str(load))
    fleet.add_worker(sim)
    fleet.wait_workers()
    fleet.start_api()
    base = fleet.url

    def beat() -> dict:
        return requests.get(base + "/api/v1/workers", timeout=5).json()["workers"][0]
    wait_until(lambda: beat()["comfyui_ok"], 20, what="ComfyUI answering")
    assert beat()["cold_start_seconds"] is None  # no model loaded yet: not measured
    assert beat()["checkpoint_load_seconds"] is None  # dispatch assumes its default meanwhile
    assert requests.get(base + "/api/v1/fleet", timeout=5).json()["cold_start_seconds"] == 999
    body = {"workflow": "sdxl", "prompt": "a lighthouse", "width": 256, "height": 256, "steps": 4}
    for _ in range(2):  # the cold job (the load), then a warm one (what the job itself takes)
        assert wait_status(base, submit(base, body)["task_id"])["status"] == "succeeded"
    wait_until(lambda: beat()["rates"].get("sdxl"), 10, what="a warm job measured")
    cold = wait_until(lambda: beat()["cold_start_seconds"], 10, what="the cold start reported")
    assert cold >= load
    loaded = beat()["checkpoint_load_seconds"]
    assert load <= loaded < cold  # the load, without the worker's own start
    assert requests.get(base + "/api/v1/fleet", timeout=5).json()["cold_start_seconds"] == pytest.approx(cold)


def test_a_starting_gpu_beats_as_soon_as_its_comfyui_answers(fleet_factory):
    """A worker up before its ComfyUI does not wait for its next HEARTBEAT_INTERVAL to say the GPU
    can take jobs: it asks ComfyUI until it answers and beats then (workers/runtime.py)."""
    from common.registry import Registry
    from tests.support.procs import SimProcess

    fleet = fleet_factory(HEARTBEAT_INTERVAL="120", HEARTBEAT_TTL="300")
    sim = SimProcess(port=free_port(), workdir=fleet.workdir, args=["--slow-start", "3"]).start(wait=False)
    fleet.sims.append(sim)  # the port opens 3 s after the simulator starts, beside its worker
    fleet.add_worker(sim)
    registry = Registry(fleet.redis.client(), 300)
    wait_until(registry.alive, 60, interval=0.1, what="the worker's first heartbeat")
    # The next regular beat is two minutes away: only the start-up probe can make it ready sooner.
    beat = wait_until(lambda: [w for w in registry.alive() if w.get("comfyui_ok")], 60, interval=0.1,
                      what="a heartbeat with ComfyUI answering")[0]
    assert beat["comfyui_ok"] and not beat["draining"]
