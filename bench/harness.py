"""What every figure shares: a whole service on loopback, job bodies, timing and statistics.

Process management is the test suite's (`tests.support`): the benchmark measures the same
processes the tests start. Settings are the production defaults (heartbeat 2 s, progress
0.2 s), not the tests' fast ones, so the figures describe what `make run` ships.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager

import psutil
import redis
import requests

from common import keys
from common.task_store import read_record

from tests.support.api import story
from tests.support.fleet import Fleet, Proc
from tests.support.procs import RedisServer, SimProcess, free_port, new_workdir, wait_until  # noqa: F401

# Production defaults (common/settings.py), spelled out because tests.support uses test values.
PROD_ENV = {"HEARTBEAT_INTERVAL": "2", "HEARTBEAT_TTL": "10", "PROGRESS_INTERVAL": "0", "LOG_LEVEL": "INFO"}
# Admission limits are raised so they never refuse the benchmark's load; their checks still run.
LIMITS_ENV = {"RATE_LIMIT": "100000000/minute", "RATE_LIMIT_GENERATE": "100000000/minute",
              "MAX_ACTIVE_JOBS_PER_KEY": "100000000", "MAX_ACTIVE_JOBS": "100000000"}
API = "/api/v1"

_live: list["Stack"] = []  # every stack not yet stopped: torn down on exit, SIGTERM or a timeout


class Stack:
    """Redis, simulators, one worker per simulator and the API (gunicorn as `make run` starts it)."""

    def __init__(self, name: str, **env: str):
        self.workdir = new_workdir(f"bench-{name}-")
        self.fleet = Fleet(workdir=self.workdir, redis=RedisServer(port=free_port(), workdir=self.workdir),
                           extra_env={**PROD_ENV, **LIMITS_ENV, "LOG_DIR": str(self.workdir / "logs"), **env})
        self.extra: list[Proc] = []
        _live.append(self)
        self.fleet.redis.start()
        self.redis = redis.Redis.from_url(self.fleet.redis.url)
        self.http = requests.Session()

    # -- processes --------------------------------------------------------------------------
    def sim(self, step: float, speed: float = 1.0, load: float = 0.02, *args: str) -> SimProcess:
        return self.fleet.add_sim("--step-seconds", str(step), "--speed", str(speed), "--load-seconds", str(load),
                                  *args)

    def worker(self, sim_or_url, queue: str | None = None, zygote=None, **env: str) -> Proc:
        if isinstance(sim_or_url, str):  # a worker in front of something else (the progress tap)
            sim_or_url = _Url(sim_or_url)
        return self.fleet.add_worker(sim_or_url, queue=queue, zygote=zygote, **env)

    def api(self, workers: int = 2, connections: int = 1000) -> str:
        """gunicorn with deploy/devstack.py's flags (gevent, 1000 connections, API_WORKERS=2)."""
        fleet = self.fleet
        fleet.api_port = free_port()
        fleet.api = Proc("api", [sys.executable, "-m", "gunicorn", "app.wsgi:app", "-b", f"127.0.0.1:{fleet.api_port}",
                                 "-k", "gevent", "--worker-connections", str(connections), "-w", str(workers),
                                 "--graceful-timeout", "2", "--no-control-socket"],
                         fleet.env(), self.workdir / "api.log").start()

        def up():
            if not fleet.api.alive():
                raise RuntimeError(f"API exited:\n{fleet.api.output()[-3000:]}")
            return requests.get(fleet.url + "/healthz", timeout=1).status_code == 200
        wait_until(up, 30, what="API /healthz")
        return fleet.url

    def spawn(self, name: str, cmd: list[str]) -> Proc:
        proc = Proc(name, cmd, self.fleet.env(), self.workdir / f"{name}.log").start()
        self.extra.append(proc)
        return proc

    def ready(self, count: int | None = None, timeout: float = 60.0) -> None:
        """Every worker's heartbeat is in, and the API (if started) says ready."""
        self.fleet.wait_workers(count, timeout=timeout)
        if self.fleet.api:
            wait_until(lambda: self.http.get(self.url + "/readyz", timeout=2).status_code == 200, timeout,
                       what="API /readyz")

    @property
    def url(self) -> str:
        return self.fleet.url

    def stop(self) -> None:
        for proc in self.extra:
            proc.stop(signal.SIGKILL)
        self.fleet.stop()
        self.http.close()
        self.redis.close()
        if self in _live:
            _live.remove(self)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the API ------------------------------------------------------------------------------
    def submit(self, body: dict) -> dict:
        response = self.http.post(self.url + API + "/generate", json=body, timeout=10)
        if response.status_code != 202:
            raise RuntimeError(f"POST /generate: {response.status_code} {response.text[:300]}")
        return response.json()

    def task(self, task_id: str) -> dict:
        response = self.http.get(f"{self.url}{API}/tasks/{task_id}", timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"GET /tasks/{task_id}: {response.status_code} {response.text[:300]}")
        return response.json()

    def record(self, task_id: str) -> dict:
        """The task record as the service keeps it in Redis (prompt id, queue, timestamps)."""
        return read_record(self.redis, task_id) or {}

    def wait_records(self, task_ids: list[str], statuses=("succeeded", "failed", "cancelled"),
                     timeout: float = 120.0, interval: float = 0.1) -> list[dict]:
        """Wait for many jobs by reading Redis, so waiting puts no load on the API."""
        deadline = time.monotonic() + timeout
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(keys.task(task_id), "status")
            states = [json.loads(s) if s else None for s in pipe.execute()]
            if all(s in statuses for s in states):
                return [self.record(t) for t in task_ids]
            if time.monotonic() > deadline:
                pending = sum(s not in statuses for s in states)
                raise TimeoutError(f"{pending} of {len(task_ids)} jobs unfinished after {timeout}s\n"
                                   + self.fleet.logs()[-3000:])
            time.sleep(interval)


class _Url:
    """Stands in for a SimProcess where a worker drives another URL (Fleet.add_worker reads .url)."""

    def __init__(self, url: str):
        self.url = url


@contextmanager
def stack(name: str, **env: str):
    s = Stack(name, **env)
    try:
        yield s
    finally:
        s.stop()


def stop_all() -> None:
    for s in list(_live):
        try:
            s.stop()
        except Exception as exc:  # noqa: BLE001 - tear down the rest anyway
            print(f"bench: stopping {s.workdir}: {exc}", file=sys.stderr)


# -- jobs -------------------------------------------------------------------------------------
def short_job(steps: int = 2, scenes: int = 1, **fields) -> dict:
    """The default workflow (StoryDiffusion), scenes of 256²; one scene of 2 steps is the smallest real job."""
    return story(scenes=[f"[Lena] reads letter {n}" for n in range(scenes)], steps=steps, **fields)


@functools.cache
def _catalog() -> dict:
    from workflows.catalog import load_catalog

    return load_catalog()


def rendered(body: dict, prefix: str):
    """The graphs the API would send for `body`, rendered by the service's own code."""
    from workflows.render import render, resolve_seed

    body = dict(body)
    workflow = _catalog()[body.pop("workflow", "storydiffusion")]
    return render(workflow, resolve_seed(workflow.parse(body)), output_prefix=prefix)


def busy_by_prompt(record: dict) -> dict[str, dict]:
    return {b["prompt_id"]: b for b in record["busy"]}


# -- the simulator's broadcasts ---------------------------------------------------------------
class StatusListener:
    """Our own websocket on a simulator: ComfyUI broadcasts `status` (queue size) to every
    socket whenever its queue changes, so a deletion is seen as it happens."""

    def __init__(self, sim_url: str):
        import uuid

        import websocket

        self.events: list[tuple[float, int]] = []
        self.ws = websocket.create_connection(sim_url.replace("http", "ws", 1) + f"/ws?clientId={uuid.uuid4().hex}",
                                              timeout=5)
        self.ws.settimeout(0.5)
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True, name="status-listener")
        self.thread.start()

    def _read(self) -> None:
        import websocket

        while not self._stop:
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # noqa: BLE001 - closed
                return
            now = time.time()
            if isinstance(frame, str) and frame:
                msg = json.loads(frame)
                if msg.get("type") == "status":
                    self.events.append((now, msg["data"]["status"]["exec_info"]["queue_remaining"]))

    def first_after(self, t0: float, timeout: float = 5.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, _ in list(self.events):
                if t >= t0:
                    return t
            time.sleep(0.005)
        return None

    def close(self) -> None:
        self._stop = True
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


# -- statistics -------------------------------------------------------------------------------
def pct(values, q: float) -> float | None:
    """The q-th percentile (0-100), linear between order statistics; None for no data."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    k = (len(data) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summary(values, scale: float = 1000.0, digits: int = 2) -> dict:
    """p50/p95/p99/max/mean of seconds, in ms by default."""
    vals = [v for v in values if v is not None]
    out = {"n": len(vals)}
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        v = pct(vals, q)
        out[name] = None if v is None else round(v * scale, digits)
    out["max"] = round(max(vals) * scale, digits) if vals else None
    out["mean"] = round(sum(vals) / len(vals) * scale, digits) if vals else None
    return out


class ForeignCpu:
    """Samples, once a second, the CPU used by processes that are not this run's (other users'
    tests, say): on a shared 2-core machine that is part of every figure, so it is reported."""

    def __init__(self):
        import psutil

        self.psutil, self.samples, self._stop = psutil, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="foreign-cpu")

    def _times(self) -> dict:
        mine = {os.getpid()} | {c.pid for c in self.psutil.Process().children(recursive=True)}
        out = {}
        for p in self.psutil.process_iter(["pid", "create_time", "cpu_times"]):
            if p.info["pid"] not in mine and p.info["cpu_times"] is not None:
                out[(p.info["pid"], p.info["create_time"])] = p.info["cpu_times"].user + p.info["cpu_times"].system
        return out

    def _run(self) -> None:
        before, t0 = self._times(), time.monotonic()
        while not self._stop.wait(1.0):
            after, t1 = self._times(), time.monotonic()
            self.samples.append(sum(v - before.get(k, v) for k, v in after.items()) / (t1 - t0))
            before, t0 = after, t1

    def __enter__(self) -> "ForeignCpu":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(3)

    def cores(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 2) if self.samples else None


def host_info() -> dict:
    import platform

    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


def cpu_seconds(procs) -> float:
    """User + system CPU of these processes so far (processes that are gone count nothing)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total
