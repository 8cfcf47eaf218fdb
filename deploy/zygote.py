"""A fork server ("zygote") for the local autoscaler's ComfyUI-simulator + worker pairs.

A pair's two Python processes spend most of their start importing (Celery, kombu, redis,
pydantic, aiohttp: about a CPU-second a pair), and a burst starts up to AUTOSCALE_MAX pairs at
once on a few cores, so the imports, not the simulated cold start, set how soon the new GPUs
take jobs. The zygote imports those modules once and forks each new process from itself: a
child starts with them loaded and runs `python -m <module> <args>` as a fresh process would
(own session, own environment, stdin from /dev/null, stdout and stderr to its log, normal
interpreter exit), in milliseconds of CPU.

What it preloads holds no per-process state: no thread, socket or Redis connection exists in
the zygote when it forks, nothing reads the settings (`get_settings`) there, so a child's
configuration comes from its own environment, and gevent is not imported (it refuses to start
if a thread, the settings or gevent are there; tests/test_zygote.py checks for sockets too).
Modules that build state at import (the Celery app, `workers.celery_app`) are imported by each
child. Every fork reseeds `random`, and `logging` resets its locks (CPython's at-fork hooks).

Protocol, one JSON object a line: the parent writes {"id", "module", "args", "env", "cwd",
"log"} on the zygote's stdin; the zygote answers {"id", "pid"} (or {"id", "error"}) on its
stdout, and {"exited": pid, "code": c} when it reaps a child (code as Popen's returncode:
negative for a signal). `Zygote` is the parent's side; `Forked` is a child's handle with the
part of `subprocess.Popen`'s interface that devstack and the benchmark use.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# The libraries and service modules a worker and a simulator import, none of which reads the
# settings or starts anything at import (see the module's text).
PRELOAD = (
    "celery.apps.worker", "celery.worker.consumer", "celery.concurrency.thread", "celery.bin.celery",
    "kombu.transport.redis", "redis", "requests", "psutil", "loguru", "pydantic_settings",
    "common.settings", "common.producer", "common.task_store", "common.logs", "common.storage", "common.jobs",
    "common.webhooks", "workers.comfy_client", "workers.gpu_probe", "workers.joblogs", "workers.progress",
    "workers.pool", "workers.monitor",
    "aiohttp.web", "comfyui_sim.server", "comfyui_sim.config",
)
# Linux: fork without exec is safe there for these libraries (macOS's system frameworks are not),
# and a child names itself in /proc (`ps -C comfyui_sim`). Elsewhere pairs are started as before.
SUPPORTED = sys.platform.startswith("linux")
UNKNOWN_EXIT = 255  # a child whose zygote died before reaping it: its exit status is lost


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


# -- the zygote process -------------------------------------------------------------------------
def _preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    from common.settings import get_settings

    threads = threading.enumerate()
    if len(threads) != 1 or get_settings.cache_info().currsize or "gevent" in sys.modules:
        raise SystemExit(f"zygote: preloading started threads ({threads}), read the settings or imported gevent: "
                         "it would leak into every child")


def _child(request: dict, keep: tuple[int, ...]) -> dict:
    """In the fork: become the process the request asks for (runs it once `serve` returns)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)  # was the request pipe
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in {null, log, *keep} - {0, 1, 2}:
        os.close(fd)
    try:  # its name in ps and top: the module it runs (the command line stays the zygote's)
        Path("/proc/self/comm").write_text(request["module"][:15])
    except OSError:
        pass
    os.chdir(request.get("cwd") or REPO)
    os.environ.clear()
    os.environ.update(request["env"])
    return request


def serve(requests_fd: int, replies_fd: int) -> dict | None:
    """The zygote's loop: fork on each request, reap and report children. Returns the request
    in a forked child; None in the zygote when its parent has gone (stdin closed)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd is what matters
    pending = b""

    def reply(message: dict) -> None:
        os.write(replies_fd, json.dumps(message).encode() + b"\n")  # a pipe takes a short line whole

    while True:
        while True:  # reap first: a child that exited before the last request is reported too
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply({"exited": pid, "code": _exit_code(status)})
        try:
            ready, _, _ = select.select([requests_fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        if requests_fd not in ready:
            continue
        chunk = os.read(requests_fd, 65536)
        if not chunk:
            return None
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:
                reply({"id": request["id"], "error": str(exc)})
                continue
            if pid == 0:
                return _child(request, (requests_fd, replies_fd, wake_r, wake_w))
            reply({"id": request["id"], "pid": pid})


def main() -> None:
    # Replies go on a private copy of stdout; the zygote's own output (errors) goes to stderr.
    replies_fd = os.dup(1)
    os.dup2(2, 1)
    _preload()
    request = serve(0, replies_fd)
    if request is None:
        return
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


# -- the parent's side ----------------------------------------------------------------------------
class Forked:
    """A process the zygote forked: `poll`, `wait`, `send_signal`, `terminate`, `kill`, `pid`,
    `returncode` as on a `subprocess.Popen` (its session is its own: `os.killpg(pid)` works)."""

    def __init__(self, zygote: "Zygote", pid: int, args: list[str]):
        self.zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.zygote.wait_for_news(0.05 if deadline is None else min(0.05, max(deadline - time.monotonic(), 0)))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The parent's side: starts `python -m deploy.zygote` and asks it for processes. Safe to
    use from several threads (the benchmark's autoscaler ticks in one)."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None):
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.exits: dict[int, int] = {}
        self.children: set[int] = set()  # forked by the running zygote, not yet reaped
        self.orphans: set[int] = set()  # forked by a zygote that died: reparented, still alive
        self._lock = threading.RLock()
        self._buffer = b""
        self._next = 0

    def start(self) -> "Zygote":
        if self.proc is not None:  # a zygote that died: its pipes go with it
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            self._buffer = b""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.zygote"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})})
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, module: str, args: list[str], env: dict[str, str], log_path: Path,
              timeout: float = 30.0) -> Forked:
        """`python -m module *args` with exactly `env` as its environment, output to `log_path`."""
        with self._lock:
            if not self.alive():  # never started, or died: its children are orphans now
                if self.proc is not None:
                    self._read(0)
                    self._orphan_all()
                self.start()
            self._next += 1
            ident = self._next
            request = {"id": ident, "module": module, "args": args, "env": env, "cwd": str(REPO),
                       "log": str(log_path)}
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                for message in self._read(max(deadline - time.monotonic(), 0)):
                    if message.get("id") == ident:
                        if "error" in message:
                            raise OSError(f"zygote could not fork {module}: {message['error']}")
                        self.children.add(message["pid"])
                        return Forked(self, message["pid"], [module, *args])
                if time.monotonic() >= deadline or not self.alive():
                    raise RuntimeError(f"zygote did not fork {module} (see {self.log_path})")

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            if self.proc is not None:
                self._read(0)
            if pid in self.children and not self.alive():
                self._read(0)  # the zygote's last words
                self._orphan_all()
            if pid in self.exits:
                return self.exits[pid]
            if pid in self.orphans:  # its zygote died (see _orphan_all)
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:  # reaped by its new parent or not
                        return None
                except psutil.NoSuchProcess:
                    pass
                self.orphans.discard(pid)
                self.exits[pid] = UNKNOWN_EXIT
                return UNKNOWN_EXIT
            return None if pid in self.children else UNKNOWN_EXIT

    def wait_for_news(self, timeout: float) -> None:
        with self._lock:
            if self.proc is not None and self.alive():
                self._read(timeout)
                return
        time.sleep(timeout)

    def _orphan_all(self) -> None:
        """The zygote died: its children live on, reparented; one still alive is not ours to
        reap any more, so its end is seen by probing (and its exit status is lost)."""
        self.orphans |= self.children
        self.children.clear()

    def _read(self, timeout: float) -> list[dict]:
        """Messages the zygote wrote, waiting up to `timeout` for the first; exits are recorded."""
        out = self.proc.stdout
        fd = out.fileno()
        messages = []
        ready, _, _ = select.select([fd], [], [], timeout)
        while ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buffer += chunk
            ready, _, _ = select.select([fd], [], [], 0)
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exited" in message:
                self.exits[message["exited"]] = message["code"]
                self.children.discard(message["exited"])
            messages.append(message)
        return messages

    def stop(self) -> None:
        """Stop the zygote (its children are the caller's to stop)."""
        if self.alive():
            self.proc.stdin.close()  # it returns from its loop and exits
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


if __name__ == "__main__":
    main()
