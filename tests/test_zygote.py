"""deploy/zygote.py, the fork server of the local autoscaler's pairs: a forked process runs as
`python -m module` would and inherits nothing of the zygote's (no pipe, socket or thread, no
settings, its own session, environment and log); exits are reported with Popen's codes; a
child outlives a zygote that dies; and devstack restarts a forked process that dies, forked again.

Real processes throughout (the zygote, simulators, a worker on a private Redis)."""
from __future__ import annotations

import json
import os
import signal
import sys

import psutil
import pytest
import requests

from common.registry import Registry
from deploy import devstack
from deploy.zygote import REPO, UNKNOWN_EXIT, Zygote
from tests.support.procs import free_port, wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote is Linux's")]
PROBE = "tests.support.zygote_probe"


@pytest.fixture
def zygote(tmp_path):
    z = Zygote(tmp_path / "zygote.log").start()
    yield z
    z.stop()


def _probe(z: Zygote, tmp_path, name: str, *args: str, **env: str) -> tuple[int, dict]:
    log = tmp_path / f"{name}.log"
    code = z.spawn(PROBE, list(args), {**os.environ, **env}, log).wait(60)
    return code, json.loads(log.read_text().splitlines()[-1])


def _sim(z: Zygote, tmp_path, *args: str):
    port = free_port()
    child = z.spawn("comfyui_sim", ["--port", str(port), "--output-dir", str(tmp_path / f"out-{port}"), *args],
                    dict(os.environ), tmp_path / f"sim-{port}.log")
    url = f"http://127.0.0.1:{port}/system_stats"
    wait_until(lambda: requests.get(url, timeout=1).ok, 30, interval=0.1, what="the forked simulator answering")
    return child, url


def test_a_forked_process_runs_as_python_m_would_and_inherits_nothing(zygote, tmp_path):
    code_a, a = _probe(zygote, tmp_path, "a", "3", GPU_QUEUE="gpu.z.0", ONLY_A="1")
    code_b, b = _probe(zygote, tmp_path, "b", GPU_QUEUE="gpu.z.1")
    assert (code_a, code_b) == (3, 0)  # its exit status, as Popen's returncode
    assert a["argv"] == ["3"] and a["cwd"] == str(REPO)
    assert a["env"]["ONLY_A"] == "1" and "ONLY_A" not in b["env"]  # exactly its own environment
    assert (a["queue"], b["queue"]) == ("gpu.z.0", "gpu.z.1")  # settings read in the child, from it
    assert a["pid"] == a["pgid"] == a["sid"]  # its own session: os.killpg(pid) reaches it and its own
    assert a["fds"]["0"] == os.devnull and a["fds"]["1"] == a["fds"]["2"] == str(tmp_path / "a.log")
    leaked = {fd: target for fd, target in a["fds"].items() if target.startswith(("pipe:", "socket:"))}
    assert not leaked  # neither the zygote's request and reply pipes nor its wakeup pipe
    assert a["threads"] == 1
    assert a["random"] != b["random"]  # reseeded at fork
    assert a["comm"] == PROBE[:15]  # named after its module in ps


def test_the_zygote_holds_no_thread_socket_or_settings(zygote, tmp_path):
    assert _probe(zygote, tmp_path, "warm")[0] == 0  # preloaded by now
    proc = psutil.Process(zygote.proc.pid)
    assert proc.num_threads() == 1
    assert proc.net_connections(kind="all") == []


def test_signals_and_a_workers_warm_shutdown(zygote, tmp_path, redis_server):
    sim, _ = _sim(zygote, tmp_path)
    os.killpg(sim.pid, signal.SIGKILL)
    assert sim.wait(30) == -signal.SIGKILL
    sim, url = _sim(zygote, tmp_path)
    log = tmp_path / "worker.log"
    worker = zygote.spawn("workers", [], {**os.environ, "REDIS_URL": redis_server.url, "GPU_QUEUE": "gpu.z.0",
                                          "COMFYUI_URL": url.rsplit("/", 1)[0], "STORAGE_DIR": str(tmp_path / "o"),
                                          "LOG_DIR": str(tmp_path / "logs"), "HEARTBEAT_INTERVAL": "0.5"}, log)
    registry = Registry(redis_server.client(), 10)
    beat = wait_until(lambda: [w for w in registry.alive() if w.get("comfyui_ok")], 60, interval=0.1,
                      what="the forked worker's heartbeat")[0]
    assert beat["queue"] == "gpu.z.0" and beat["pid"] == worker.pid
    os.killpg(worker.pid, signal.SIGTERM)  # the autoscaler's retire
    assert worker.wait(60) == 0
    assert "Warm shutdown" in log.read_text()
    sim.terminate()
    assert sim.wait(30) == -signal.SIGTERM


def test_a_child_outlives_a_zygote_that_dies_and_the_next_spawn_starts_a_new_one(zygote, tmp_path):
    sim, url = _sim(zygote, tmp_path)
    first = zygote.proc.pid
    os.kill(first, signal.SIGKILL)
    zygote.proc.wait(10)
    assert sim.poll() is None and requests.get(url, timeout=5).ok
    assert _probe(zygote, tmp_path, "after")[0] == 0
    assert zygote.proc.pid != first
    sim.kill()  # orphaned: its end is seen, its status is not
    assert sim.wait(30) == UNKNOWN_EXIT


def test_devstack_restarts_a_forked_process_that_dies_forked_again(tmp_path, monkeypatch):
    monkeypatch.setattr(devstack, "VAR", tmp_path)
    stack = devstack.Stack()
    port = free_port()
    try:
        proc = stack.spawn("comfyui-sim-0", [sys.executable, "-m", "comfyui_sim", "--port", str(port),
                                             "--output-dir", str(tmp_path / "out")], forked=True)
        url = f"http://127.0.0.1:{port}/system_stats"
        wait_until(lambda: requests.get(url, timeout=1).ok, 30, interval=0.1, what="the simulator answering")
        assert psutil.Process(proc.pid).name() == "comfyui_sim"
        os.killpg(proc.pid, signal.SIGKILL)
        wait_until(lambda: stack.supervise() is None and any(p.pid != proc.pid for _, p in stack.procs),
                   30, interval=0.1, what="the simulator started again")
        again = stack.procs[-1][1]
        assert psutil.Process(again.pid).ppid() == stack.zygote().proc.pid  # forked again, not exec'd
        wait_until(lambda: requests.get(url, timeout=1).ok, 30, interval=0.1, what="the simulator answering again")
        assert "comfyui-sim-0.log" in os.listdir(tmp_path / "logs")
    finally:
        stack.stop()
    assert again.poll() is not None and not stack._zygote.alive()
