"""`make run` (deploy/devstack.py) supervises: SIGKILL a worker (and its ComfyUI simulator) in the
middle of a job and the job finishes on the other GPU, both are started again with a log line, the
stack stays up; Ctrl-C stops everything.

(A worker killed alone leaves its job to its ComfyUI, which finishes it; the failover monitor then
collects the outputs on the same GPU: tests/test_fleet.py. Killing the simulator too makes the GPU
lose the job, so it must run again on the other one.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from tests.support.api import LENA
from tests.support.procs import free_port, interrupt, wait_until

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(240)


def _workers(proc: psutil.Process) -> dict[str, psutil.Process]:
    """The devstack's worker processes by GPU queue (the heads of their sessions)."""
    found = {}
    for child in proc.children(recursive=True):
        try:
            if child.cmdline()[1:3] == ["-m", "workers"] and len(child.cmdline()) == 3:
                queue = child.environ().get("GPU_QUEUE")
                if queue and child.pid == os.getpgid(child.pid):
                    found[queue] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return found


def _simulator(proc: psutil.Process, url: str) -> psutil.Process:
    """The devstack's simulator serving `url`."""
    port = url.rsplit(":", 1)[1]
    for child in proc.children(recursive=True):
        try:
            cmd = child.cmdline()
            if cmd[1:3] == ["-m", "comfyui_sim"] and cmd[cmd.index("--port") + 1] == port:
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    raise AssertionError(f"no simulator on {url}")


def test_make_run_restarts_a_killed_worker_and_its_job_finishes_elsewhere(tmp_path):
    api_port, flower_port = free_port(), free_port()
    env = {**os.environ, "API_PORT": str(api_port), "FLOWER_PORT": str(flower_port),
           "FLOWER_DB": str(tmp_path / "flower.db"), "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "3",
           "COMFYUI_SIM_STEP_SECONDS": "0.1", "LOG_DIR": str(tmp_path / "logs")}
    for name in ("REDIS_URL", "COMFYUI_URLS", "API_KEYS"):
        env.pop(name, None)
    out = open(tmp_path / "devstack.log", "wb")
    stack = subprocess.Popen([sys.executable, "-m", "deploy.devstack"], cwd=REPO, env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{api_port}"
    log = lambda: (tmp_path / "devstack.log").read_text(errors="replace")  # noqa: E731
    try:
        def two_workers():
            assert stack.poll() is None, log()
            return len(requests.get(base + "/api/v1/workers", timeout=2).json()["workers"]) == 2
        wait_until(two_workers, 90, interval=0.5, what="make run with two workers")

        body = {"characters": [LENA], "scenes": [f"[Lena] scene {i}" for i in range(3)], "width": 256,
                "height": 256, "steps": 20}
        r = requests.post(base + "/api/v1/generate", json=body, timeout=10)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        doc = wait_until(lambda: (d := requests.get(f"{base}/api/v1/tasks/{task_id}", timeout=5).json())["status"]
                         == "running" and d.get("gpu") and d, 30, interval=0.1, what="the job running")
        gpu = doc["gpu"]
        victim = _workers(psutil.Process(stack.pid))[gpu]
        sim = _simulator(psutil.Process(stack.pid), victim.environ()["COMFYUI_URL"])
        os.killpg(victim.pid, signal.SIGKILL)
        os.killpg(sim.pid, signal.SIGKILL)

        final = wait_until(lambda: (d := requests.get(f"{base}/api/v1/tasks/{task_id}", timeout=5).json())["status"]
                           in ("succeeded", "failed", "cancelled") and d, 90, interval=0.3, what="the job to end")
        assert final["status"] == "succeeded", final
        assert final["gpu"] != gpu
        wait_until(lambda: log().count("starting it again") >= 2, 10, what="both restarts logged")
        assert stack.poll() is None, "the stack stays up"
        # The worker is back (a new process) and both GPUs take jobs again.
        wait_until(lambda: gpu in _workers(psutil.Process(stack.pid)) and
                   _workers(psutil.Process(stack.pid))[gpu].pid != victim.pid, 15, what="the worker restarted")
        wait_until(two_workers, 30, interval=0.5, what="both workers alive again")
    finally:
        try:
            code, alive = interrupt(stack)  # Ctrl-C
        finally:
            out.close()
    assert code == 0, log()
    assert "stopped" in log()
    assert not alive, f"left running after Ctrl-C: {[p.pid for p in alive]}"
