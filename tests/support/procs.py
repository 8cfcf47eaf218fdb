"""Real processes for tests: ComfyUI simulators and private Redis servers.

Every process gets a free loopback port, is waited for until it answers, and is
killed (with its output kept for the failure report) when the test is done.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


@dataclass
class SimProcess:
    """A `python -m comfyui_sim` process on a free port."""

    port: int
    args: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    zygote: object | None = None  # a deploy.zygote.Zygote to fork it from, as the local autoscaler does

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 15.0) -> "SimProcess":
        self.log_path = self.workdir / f"sim-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--output-dir", str(self.workdir / f"out-{self.port}"),
                *self.args]
        if self.zygote is not None:
            self.proc = self.zygote.spawn("comfyui_sim", args, env, self.log_path)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "comfyui_sim", *args], cwd=REPO, env=env,
                                             stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {self.proc.returncode}:\n{self.output()}")
            return requests.get(self.url + "/system_stats", timeout=1).status_code == 200
        wait_until(up, timeout, what=f"simulator on {self.url}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self, wait: bool = True) -> "SimProcess":
        """Kill and start again on the same port: a ComfyUI restart that forgets its queue."""
        self.kill()
        return self.start(wait=wait)

    # The simulator's control routes (see comfyui_sim/README or the module docs).
    def faults(self, **faults) -> dict:
        r = requests.post(self.url + "/sim/faults", json=faults, timeout=5)
        r.raise_for_status()
        return r.json()

    def record(self) -> dict:
        r = requests.get(self.url + "/sim/record", timeout=5)
        r.raise_for_status()
        return r.json()


@dataclass
class RedisServer:
    """A private redis-server on a free port, with nothing persisted to disk.

    `durable=True`: an append-only file fsynced on every write (`appendonly yes`,
    `appendfsync always`) in `workdir`, so `kill()` (SIGKILL) then `start()` brings the same data
    back on the same port, as an operator's restart would (the chaos run does this)."""

    port: int
    workdir: Path
    password: str | None = None
    durable: bool = False
    args: list[str] = field(default_factory=list)  # more redis-server options (--replicaof ...)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (install Debian's redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir)]
        if self.durable:
            # One AOF directory per port, so two durable servers may share a workdir.
            args += ["--appendonly", "yes", "--appendfsync", "always", "--appenddirname", f"aof-{self.port}"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        # A durable server answers LOADING while it replays its AOF: wait until it is done.
        wait_until(lambda: client.ping() and client.info("persistence").get("loading") == 0, timeout,
                   what=f"redis on port {self.port}")
        client.close()
        return self

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients (a crash or an OOM kill)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def new_workdir(prefix: str = "comfy-test-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def interrupt(stack: subprocess.Popen, timeout: float = 30.0) -> tuple[int, list]:
    """Ctrl-C to a running `make run` (deploy/devstack.py): (its exit code, the processes it had
    started that are still alive 10 s later). A stack that does not stop is killed, and raises."""
    import psutil

    children = psutil.Process(stack.pid).children(recursive=True) if stack.poll() is None else []
    stack.send_signal(signal.SIGINT)
    try:
        code = stack.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(stack.pid, signal.SIGKILL)
        raise
    _, alive = psutil.wait_procs(children, timeout=10)
    return code, alive
