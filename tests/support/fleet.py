"""A whole comfy-service on loopback for tests: Redis, simulators, one worker each, the API.

Everything is a real process; the API runs under gunicorn like in production.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.support.procs import REPO, RedisServer, SimProcess, free_port, wait_until


@dataclass
class Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    zygote: object | None = None  # a deploy.zygote.Zygote to fork it from (cmd: python -m module ...)

    def start(self) -> "Proc":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if self.zygote is not None:
            assert self.cmd[1] == "-m", self.cmd
            self.proc = self.zygote.spawn(self.cmd[2], self.cmd[3:], env, self.log_path)
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def send(self, sig: int) -> None:
        """Send a signal to the process group without waiting (SIGSTOP/SIGCONT: freeze and thaw)."""
        os.killpg(self.proc.pid, sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Fleet:
    workdir: Path
    redis: RedisServer
    sims: list[SimProcess] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    api: Proc | None = None
    api_port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis.url, "STORAGE_DIR": str(self.workdir / "outputs"),
                "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "3", "PROGRESS_INTERVAL": "0.05",
                "LOG_LEVEL": "INFO", "LOG_DIR": str(self.workdir / "logs"),
                # Tests poll task documents at ~50 Hz and queue many jobs as one anonymous caller:
                # no rate limit or per-key cap unless a test sets one (tests/test_security.py does).
                "RATE_LIMIT": "off", "RATE_LIMIT_GENERATE": "off", "MAX_ACTIVE_JOBS_PER_KEY": "0",
                **self.extra_env}

    def add_sim(self, *args: str) -> SimProcess:
        sim = SimProcess(port=free_port(), args=list(args), workdir=self.workdir).start()
        self.sims.append(sim)
        return sim

    def add_worker(self, sim: SimProcess, queue: str | None = None, zygote=None, **env: str) -> Proc:
        index = len(self.workers)
        queue = queue or f"gpu.test.{index}"
        worker = Proc(f"worker-{index}", [sys.executable, "-m", "workers"],
                      {**self.env(), "COMFYUI_URL": sim.url, "GPU_QUEUE": queue, "GPU_INDEX": str(index), **env},
                      self.workdir / f"worker-{index}.log", zygote=zygote).start()
        worker.queue = queue
        self.workers.append(worker)
        return worker

    def add_webhook_worker(self, **env: str) -> Proc:
        """The webhook worker (`python -m workers webhooks`), on this fleet's Redis."""
        worker = Proc("webhooks", [sys.executable, "-m", "workers", "webhooks"], {**self.env(), **env},
                      self.workdir / "webhooks.log").start()
        self.extra_procs.append(worker)
        return worker

    def wait_workers(self, count: int | None = None, timeout: float = 30.0) -> None:
        count = len(self.workers) if count is None else count
        client = self.redis.client()

        def ready():
            for w in self.workers:
                if not w.alive():
                    raise RuntimeError(f"{w.name} exited:\n{w.output()[-3000:]}")
            return len(client.zrangebyscore("cs:workers", "-inf", "+inf")) >= count
        wait_until(ready, timeout, what=f"{count} worker heartbeats")

    def start_gpus(self, count: int, *sim_args: str) -> tuple[list[SimProcess], list[Proc]]:
        """`count` simulators with a worker each, all registered, and the API: a ready fleet."""
        sims = [self.add_sim(*sim_args) for _ in range(count)]
        workers = [self.add_worker(sim) for sim in sims]
        self.wait_workers()
        self.start_api()
        return sims, workers

    def start_api(self, processes: int = 1) -> Proc:
        self.api_port = self.api_port or free_port()
        self.api = Proc("api", [sys.executable, "-m", "gunicorn", "app.wsgi:app", "-b", f"127.0.0.1:{self.api_port}",
                                "-k", "gevent", "--worker-connections", "200", "-w", str(processes),
                                "--graceful-timeout", "2", "--no-control-socket"],
                        self.env(), self.workdir / "api.log").start()

        def up():
            if not self.api.alive():
                raise RuntimeError(f"API exited:\n{self.api.output()[-3000:]}")
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        wait_until(up, 20, what="API /healthz")
        return self.api

    def stop(self) -> None:
        if self.api:
            self.api.stop()
        for worker in [*self.workers, *self.extra_procs]:
            worker.stop(signal.SIGKILL)
        for sim in self.sims:
            sim.kill()
        self.redis.stop()

    def logs(self) -> str:
        procs = [*self.workers, *self.extra_procs, *([self.api] if self.api else [])]
        parts = [f"==== {p.name}\n{p.output()[-4000:]}" for p in procs]
        parts += [f"==== sim {s.port}\n{s.output()[-2000:]}" for s in self.sims]
        return "\n".join(parts)


def one_gpu_fleet(tmp_path_factory, name: str, *sim_args: str, **env: str) -> Fleet:
    """One simulator with its worker and the API, for a test module to share (`fleet.stop()` it)."""
    workdir = tmp_path_factory.mktemp(name)
    fleet = Fleet(workdir=workdir, redis=RedisServer(port=free_port(), workdir=workdir).start(), extra_env=env)
    fleet.start_gpus(1, *sim_args)
    return fleet
