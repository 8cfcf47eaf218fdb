"""`make run`: the whole service on this machine, stopped cleanly by Ctrl-C.

- Redis: REDIS_URL if set, else a private redis-server started here (var/redis).
- ComfyUI: COMFYUI_URLS (comma-separated) if set, else two ComfyUI SIMULATORS (no GPU, no
  models: labelled pictures), on ports 8188 and 8189.
- One Celery worker per ComfyUI, each on its own GPU queue gpu.<host>.<n>, and the webhook
  worker (a secret in var/webhook_secret and callbacks to this machine unless WEBHOOK_* are set).
- The API under gunicorn (gevent workers) on API_HOST:API_PORT (default http://127.0.0.1:8080:
  loopback, because without API keys the API is open; see docs/security.md).
- Flower on http://127.0.0.1:5555.

With AUTOSCALE=true (simulators only), no fixed pair is started: the local autoscaler
(`deploy/autoscale.py`) starts and stops simulator + worker pairs from the fleet's scaling decision
every AUTOSCALE_INTERVAL seconds, between AUTOSCALE_MIN and AUTOSCALE_MAX GPUs, and WAIT_FOR_GPUS
is on so a job submitted at zero GPUs waits for one. A retiring pair is not restarted. Pairs are
forked from a zygote that has their modules imported (deploy/zygote.py): a burst's pairs start
without seconds of imports on the shared cores.

It supervises them: a worker, simulator, webhook worker, Flower or the API that dies is started
again, with a log line, while the rest keep running (a SIGKILLed worker's job finishes on another
GPU meanwhile). One that dies more than RESTART_LIMIT times within RESTART_WINDOW seconds, or the
private Redis, stops the stack. Ctrl-C (or SIGTERM) stops everything.
"""
from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from deploy.zygote import SUPPORTED as FORK_SUPPORTED, Forked, Zygote

REPO = Path(__file__).resolve().parents[1]
VAR = REPO / "var"
BANNER = "=" * 72
RESTART_LIMIT, RESTART_WINDOW = 5, 60.0
# Processes whose death stops the stack instead of a restart (their state is the stack's).
NOT_RESTARTED = ("redis",)


def say(message: str) -> None:
    print(f"[devstack] {message}", flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port_from(start: int) -> int:
    port = start
    while not port_free(port):
        port += 1
    return port


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see its log under var/logs/")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit(f"{what} did not answer on {url} within {timeout:.0f}s")


class Stack:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen | Forked]] = []
        self.specs: dict[str, tuple[list[str], dict[str, str] | None, bool, bool]] = {}
        self._zygote: Zygote | None = None
        self.restarts: dict[str, list[float]] = {}
        self.released: set[str] = set()  # leaving on purpose (a retiring GPU): not started again
        (VAR / "logs").mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, log: bool = True,
              forked: bool = False) -> subprocess.Popen | Forked:
        """`forked`: `cmd` is `[python, -m, module, *args]`, forked from the zygote (its log is its own)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if forked:
            proc = self.zygote().spawn(cmd[2], cmd[3:], full_env, VAR / "logs" / f"{name}.log")
        else:
            out = open(VAR / "logs" / f"{name}.log", "ab") if log else None
            proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT if out else None, start_new_session=True)
            if out is not None:
                out.close()  # the child has its own copy
        self.specs[name] = (cmd, env, log, forked)
        self.released.discard(name)
        self.procs = [(n, p) for n, p in self.procs if n != name] + [(name, proc)]
        return proc

    def zygote(self) -> Zygote:
        """The fork server for autoscaled pairs, started on first use (see deploy/zygote.py)."""
        if self._zygote is None:
            self._zygote = Zygote(VAR / "logs" / "zygote.log").start()
        return self._zygote

    def running(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self.procs)

    def release(self, name: str, sig: int | None = None) -> None:
        """Stop supervising `name` (its exit is not restarted), and send it `sig`."""
        self.released.add(name)
        for n, proc in self.procs:
            if n == name and sig is not None and proc.poll() is None:
                os.killpg(proc.pid, sig)

    def stop_one(self, name: str, timeout: float = 10.0) -> None:
        self.release(name, signal.SIGTERM)
        for n, proc in list(self.procs):
            if n == name:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self._forget(name)

    def _forget(self, name: str) -> None:
        self.procs = [(n, p) for n, p in self.procs if n != name]
        self.specs.pop(name, None)
        self.released.discard(name)

    def supervise(self) -> str | None:
        """Start again whatever died (see the module docs); the reason to stop the stack, if any."""
        for name, proc in list(self.procs):
            code = proc.poll()
            if code is None:
                continue
            try:  # whatever it started in its session goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if name in self.released:
                self._forget(name)
                continue
            if name in NOT_RESTARTED:
                return f"{name} exited with {code}"
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW] + [now]
            self.restarts[name] = recent
            if len(recent) > RESTART_LIMIT:
                return f"{name} exited {len(recent)} times within {RESTART_WINDOW:.0f}s (last code {code})"
            say(f"{name} exited with {code}; starting it again (the rest keep running; log: var/logs/{name}.log)")
            cmd, env, log, forked = self.specs[name]
            self.spawn(name, cmd, env, log, forked)
        return None

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, proc in reversed(self.procs):
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self._zygote is not None:
            self._zygote.stop()
        say("stopped")


def _say_access(api_host: str, redis_url: str) -> None:
    """Who can call the API: keys (API_KEYS or `python -m app.keys`), else loopback only."""
    try:
        from common import keys, redis_conn
        from common.settings import get_settings

        settings = get_settings().model_copy(update={"redis_url": redis_url})
        stored = redis_conn.connect(settings, socket_connect_timeout=2).exists(keys.API_KEYS)
    except Exception:  # noqa: BLE001 - only a hint
        stored = False
    if os.environ.get("API_KEYS") or stored:
        say("API keys required on /api/v1 (Authorization: Bearer <key>); add one: python -m app.keys add NAME")
        return
    print(BANNER, flush=True)
    say("NO API KEYS: /api/v1 is open to whoever reaches it. The API binds to loopback (API_HOST=127.0.0.1)")
    say("by default; before exposing it, add a key: python -m app.keys add NAME (docs/security.md).")
    if api_host not in ("127.0.0.1", "localhost", "::1"):
        say(f"WARNING: API_HOST={api_host} is not loopback and no key is set: anyone on the network can submit jobs.")
    print(BANNER, flush=True)


def _webhook_env() -> dict[str, str]:
    """Webhooks work out of the box here: a secret kept in var/ and callbacks to this machine.
    (A deployment sets both itself; with neither, callback_url is refused.)"""
    env = {}
    if not os.environ.get("WEBHOOK_SECRET"):
        path = VAR / "webhook_secret"
        if not path.exists():
            path.write_text("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            path.chmod(0o600)
        env["WEBHOOK_SECRET"] = path.read_text().strip()
        say(f"webhooks signed with the secret in {path.relative_to(REPO)} (set WEBHOOK_SECRET to choose one)")
    if not os.environ.get("WEBHOOK_ALLOWED_HOSTS"):
        env["WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1,localhost"
        say("callback_url may name 127.0.0.1 or localhost (set WEBHOOK_ALLOWED_HOSTS for others)")
    return env


def _sim_cmd(index: int, port: int) -> list[str]:
    # COMFYUI_SIM_* in the environment reach it: COMFYUI_SIM_SLOW_START and COMFYUI_SIM_LOAD_SECONDS
    # simulate a GPU's cold start (ComfyUI's start, the model load).
    return [sys.executable, "-m", "comfyui_sim", "--port", str(port), "--output-dir", str(VAR / f"sim-{index}"),
            "--gpu-name", f"Simulated GPU {index}"]


class StackPairs:
    """Simulator + worker pairs as supervised processes of the stack (deploy/autoscale.py's Pairs)."""

    def __init__(self, stack: Stack, env: dict[str, str]):
        self.stack, self.env = stack, env
        self.index: dict[str, int] = {}
        self.ports: dict[str, int] = {}  # a simulator just started may not listen yet: its port is taken

    def start(self, index: int, queue: str) -> None:
        # Not waiting for the simulator: the worker comes up beside it, as in a pod, and its
        # heartbeat says "starting" until ComfyUI answers (that wait is part of the cold start).
        port = 8188 + index
        while port in self.ports.values() or not port_free(port):
            port += 1
        self.ports[queue] = port
        # Forked from the zygote, which has their modules imported: a burst starts many pairs at
        # once, and their imports would otherwise take the cores for seconds (deploy/zygote.py).
        self.stack.spawn(f"comfyui-sim-{index}", _sim_cmd(index, port), forked=FORK_SUPPORTED)
        self.stack.spawn(f"worker-{index}", [sys.executable, "-m", "workers"],
                         {**self.env, "COMFYUI_URL": f"http://127.0.0.1:{port}", "GPU_INDEX": str(index),
                          "GPU_QUEUE": queue}, forked=FORK_SUPPORTED)
        self.index[queue] = index

    def retire(self, queue: str) -> None:
        self.stack.release(f"worker-{self.index[queue]}", signal.SIGTERM)  # Celery's warm shutdown

    def worker_exited(self, queue: str) -> bool:
        return not self.stack.running(f"worker-{self.index[queue]}")

    def stop(self, queue: str) -> None:
        self.stack.stop_one(f"comfyui-sim-{self.index.pop(queue)}")
        self.ports.pop(queue, None)


def _autoscaler(stack: Stack, env: dict[str, str], redis_url: str):
    from common import redis_conn
    from common.settings import get_settings
    from deploy.autoscale import Autoscaler

    settings = get_settings().model_copy(update={"redis_url": redis_url, "wait_for_gpus": True})
    say(f"AUTOSCALE: {settings.scale_min_gpus}…{settings.scale_max_gpus} simulated GPUs from the fleet's decision "
        f"(target wait {settings.scale_target_wait:g} s, scale-down delay {settings.scale_down_delay:g} s); "
        "WAIT_FOR_GPUS=true: a job submitted at zero GPUs waits for one")
    client = redis_conn.connect(settings, socket_timeout=5)
    return Autoscaler(StackPairs(stack, env), client, settings, socket.gethostname(), say=say)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored,
    # and SIGTERM (kill, docker stop) must stop the stack as cleanly as Ctrl-C.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    stack = Stack()
    env: dict[str, str] = {}
    try:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            exe = shutil.which("redis-server")
            if exe is None:
                raise SystemExit("REDIS_URL is unset and redis-server is not on PATH: install Redis or set REDIS_URL")
            port = free_port_from(6380)
            (VAR / "redis").mkdir(parents=True, exist_ok=True)
            stack.spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(VAR / "redis"),
                                  "--appendonly", "yes", "--save", ""])
            redis_url = f"redis://127.0.0.1:{port}/0"
            say(f"started a private Redis at {redis_url} (data in var/redis)")
        env["REDIS_URL"] = redis_url

        urls = [u.strip() for u in os.environ.get("COMFYUI_URLS", "").split(",") if u.strip()]
        autoscale = os.environ.get("AUTOSCALE", "").strip().lower() in ("1", "true", "yes", "on")
        if autoscale and urls:
            raise SystemExit("AUTOSCALE=true starts simulators itself; unset COMFYUI_URLS (it cannot start real ComfyUIs)")
        if autoscale:
            env["WAIT_FOR_GPUS"] = "true"
            if FORK_SUPPORTED:
                stack.zygote()  # preloads while the rest starts
        elif not urls:
            print(BANNER, flush=True)
            say("COMFYUI_URLS is unset: starting two ComfyUI SIMULATORS (no GPU, no models, labelled pictures).")
            say("Set COMFYUI_URLS=http://127.0.0.1:8188 to drive a real ComfyUI instead.")
            print(BANNER, flush=True)
            for index in range(2):
                port = free_port_from(8188 + index)
                sim = stack.spawn(f"comfyui-sim-{index}", _sim_cmd(index, port))
                urls.append(f"http://127.0.0.1:{port}")
                wait_http(urls[-1] + "/system_stats", sim, f"simulator {index}")
        env.update(_webhook_env())
        host = socket.gethostname()
        for index, url in enumerate(urls):
            queue = f"gpu.{host}.{index}"
            stack.spawn(f"worker-{index}", [sys.executable, "-m", "workers"],
                        {**env, "COMFYUI_URL": url, "GPU_INDEX": str(index), "GPU_QUEUE": queue})
            say(f"worker {queue} drives ComfyUI at {url}")

        stack.spawn("webhooks", [sys.executable, "-m", "workers", "webhooks"], env)
        api_host, api_port = os.environ.get("API_HOST", "127.0.0.1"), os.environ.get("API_PORT", "8080")
        api = stack.spawn("api", [sys.executable, "-m", "gunicorn", "app.wsgi:app", "-b", f"{api_host}:{api_port}",
                                  "-k", "gevent", "--worker-connections",
                                  os.environ.get("API_WORKER_CONNECTIONS", "1000"),
                                  "-w", os.environ.get("API_WORKERS", "2"),
                                  "--no-control-socket"], env)
        flower_port = os.environ.get("FLOWER_PORT", "5555")
        stack.spawn("flower", [sys.executable, "-m", "deploy.flower"],
                    {**env, "FLOWER_PORT": flower_port, "FLOWER_DB": os.environ.get("FLOWER_DB", str(VAR / "flower.db"))})
        wait_http(f"http://{api_host}:{api_port}/healthz", api, "the API")
        say(f"API     http://{api_host}:{api_port}   (OpenAPI at /openapi.json)")
        _say_access(api_host, redis_url)
        say(f"Flower  http://127.0.0.1:{flower_port}")
        say("logs in var/logs/; a process that dies is started again; Ctrl-C stops everything")
        scaler = _autoscaler(stack, env, redis_url) if autoscale else None
        interval = float(os.environ.get("AUTOSCALE_INTERVAL", "0.5"))
        next_tick = time.monotonic()
        if scaler:
            scaler.bootstrap()
        while (reason := stack.supervise()) is None:
            if scaler and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + interval
                try:
                    scaler.tick()
                except Exception as exc:  # noqa: BLE001 - a Redis hiccup skips one tick, not the stack
                    say(f"autoscaler tick failed: {type(exc).__name__}: {exc}")
            time.sleep(0.5)
        say(f"{reason}; stopping the rest (see var/logs/)")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
