"""Logs: the shared loguru setup (console, files, logdy over TCP, standard logging routed once,
secrets masked) and the per-run logs a real fleet serves at GET /api/v1/tasks/{id}/logs."""
from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
import uuid

import pytest
import redis
import requests
from loguru import logger

from common.logs import LogdySink, logdy_sink, redact, reset_logging, setup_logging
from common.settings import Settings
from tests.support.api import story, submit, wait_status
from tests.support.fleet import Fleet
from tests.support.procs import RedisServer, free_port, wait_until
from workers.joblogs import Attribution

SECRET = "pw-" + uuid.uuid4().hex[:12]


class LineServer:
    """A stand-in for `logdy socket <port>`: a real TCP listener collecting newline-delimited lines.
    `stop()` closes the listener and every connection; `start()` listens again on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._running = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "LineServer":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        listener.settimeout(0.1)
        self._listener = listener
        self._running.set()
        self._spawn(self._accept_loop, listener)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(0.1)
            self._conns.append(conn)
            self._spawn(self._read_loop, conn)

    def _read_loop(self, conn: socket.socket) -> None:
        buffer = b""
        while self._running.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            with self._lock:
                self.lines.extend(line.decode() for line in complete if line)

    def stop(self) -> None:
        self._running.clear()
        for sock in [self._listener, *self._conns]:
            try:
                sock.close()
            except (OSError, AttributeError):
                pass
        for thread in self._threads:
            thread.join(2)
        self._conns, self._threads = [], []

    def records(self) -> list[dict]:
        with self._lock:
            return [json.loads(line) for line in self.lines]

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


@pytest.fixture
def logging_setup(tmp_path):
    """setup_logging in this process with LOG_DIR under tmp_path; undone afterwards."""

    def configure(service: str = "test", **env: str) -> Settings:
        settings = Settings(LOG_DIR=str(tmp_path / "logs"), LOG_LEVEL="INFO", **env)
        setup_logging(service, settings)
        return settings

    yield configure
    reset_logging()


@pytest.fixture
def capture():
    """Every message loguru's sinks receive (added after setup: shares its level and routing)."""
    lines: list[str] = []
    handler_id = logger.add(lambda message: lines.append(str(message)), format="{message}", level="INFO")
    yield lines
    logger.remove(handler_id)


def job(task_id: str, lines: int = 1, marker: str = "job line") -> float:
    """What a GPU task does: log inside its context. Returns how long the logging took."""
    began = time.perf_counter()
    with logger.contextualize(task_id=task_id, prompt_id="p-" + task_id, queue="gpu.test.0"):
        for index in range(lines):
            logging.getLogger("comfy.worker").info("%s %d of %s", marker, index, task_id)
    return time.perf_counter() - began


# ------------------------------------------------------------------------------------------- logdy
def test_job_lines_reach_logdy_and_survive_its_restart_without_delaying_the_job(logging_setup):
    server = LineServer().start()
    try:
        logging_setup(LOGDY_ADDRESS=server.address)
        job("task-1", marker="before restart")
        wait_until(lambda: "before restart 0 of task-1" in server.text(), 10, what="the first line at the listener")
        line = next(r for r in server.records() if r["message"] == "before restart 0 of task-1")
        assert (line["task_id"], line["prompt_id"], line["queue"]) == ("task-1", "p-task-1", "gpu.test.0")
        assert line["level"] == "INFO" and line["service"] == "test" and line["time"].endswith("Z")

        server.stop()  # logdy goes away: the job must not notice
        elapsed = job("task-2", lines=2000, marker="while down")
        assert elapsed < 2.0, f"2000 lines took {elapsed:.2f}s with logdy down"

        server = LineServer(server.port).start()  # logdy restarts on the same port
        job("task-3", marker="after restart")
        wait_until(lambda: "after restart 0 of task-3" in server.text(), 15, what="a line after the restart")
        # What was logged while logdy was down was queued (within the bound) and sent on reconnect.
        wait_until(lambda: "while down 1999 of task-2" in server.text(), 10, what="the queued lines")
        assert logdy_sink().connects >= 2 and logdy_sink().dropped == 0
    finally:
        server.stop()


def test_logdy_queue_is_bounded_drops_the_oldest_and_reports_the_count():
    port = free_port()  # nothing listens yet
    sink = LogdySink(f"127.0.0.1:{port}", "test", max_queue=10, backoff_max=0.2)
    handler_id = logger.add(sink, format="{message}", level="INFO",
                            filter=lambda record: record["extra"].get("bounded_test") is True)
    server = None
    try:
        began = time.perf_counter()
        for index in range(25):
            logger.bind(bounded_test=True).info("line {}", index)
        assert time.perf_counter() - began < 1.0
        assert sink.dropped == 15
        server = LineServer(port).start()
        wait_until(lambda: "line 24" in server.text(), 10, what="the kept lines")
        messages = [r["message"] for r in server.records()]
        assert messages[0] == "logdy sink: 15 line(s) dropped while logdy was unreachable"
        assert messages[1:] == [f"line {i}" for i in range(15, 25)]
    finally:
        logger.remove(handler_id)
        if server:
            server.stop()


# ------------------------------------------------------------------------------ one route, no doubles
def test_standard_logging_lines_appear_once_even_after_setup_twice(logging_setup, capture, capsys, tmp_path):
    settings = logging_setup()
    # Libraries that installed their own console handlers before the setup (gunicorn, Celery do).
    own = logging.getLogger("gunicorn.error")
    own.addHandler(logging.StreamHandler(sys.stderr))
    own.propagate = False
    logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))
    logging_setup()  # the same configuration again: no second sink, and the new handlers are gone
    setup_logging("test", settings)

    logging.getLogger("urllib3.connectionpool").warning("library line %s", "a1")
    logging.getLogger("celery.worker.strategy").info("celery line b2")
    own.info("gunicorn line c3")
    logging.getLogger("werkzeug").info("werkzeug line d4")
    logger.info("loguru line e5")

    stderr = capsys.readouterr().err
    log_file = (tmp_path / "logs" / "comfy-test.log").read_text()
    for text in ("library line a1", "celery line b2", "gunicorn line c3", "werkzeug line d4", "loguru line e5"):
        assert capture.count(text + "\n") == 1, (text, capture)
        assert stderr.count(text) == 1, (text, stderr)
        assert log_file.count(text) == 1, (text, log_file)
    assert "| WARNING  | test | " in stderr  # the human-readable console format


def test_job_fields_are_on_every_line_of_a_job(logging_setup, capsys):
    logging_setup()
    job("t-42")
    logging.getLogger("comfy.api").info("not a job line")
    err = capsys.readouterr().err.splitlines()
    [job_line] = [line for line in err if "job line 0 of t-42" in line]
    assert "task_id=t-42 prompt_id=p-t-42 queue=gpu.test.0 |" in job_line
    [other] = [line for line in err if "not a job line" in line]
    assert "task_id=" not in other


def test_json_lines_on_demand(logging_setup, capsys, tmp_path):
    logging_setup(LOG_JSON="1")
    job("t-json")
    err = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    record = next(r["record"] for r in err if r["record"]["message"] == "job line 0 of t-json")
    assert record["extra"]["task_id"] == "t-json" and record["level"]["name"] == "INFO"
    in_file = [json.loads(line) for line in (tmp_path / "logs" / "comfy-test.log").read_text().splitlines()]
    assert any(r["record"]["extra"].get("task_id") == "t-json" for r in in_file)


# --------------------------------------------------------------------------------------- secrets
def test_secrets_never_reach_any_sink(logging_setup, capture, capsys, tmp_path):
    server = LineServer().start()
    try:
        for json_mode in ("0", "1"):
            logging_setup(LOG_JSON=json_mode, LOGDY_ADDRESS=server.address)
            url = f"redis://:{SECRET}@127.0.0.1:6379/0"
            logging.getLogger("comfy.worker").info("connecting to %s", url)
            logger.bind(broker=f"redis://user:{SECRET}@redis:6379/1").info("bound url")
            logging.getLogger("urllib3").warning("headers {'Authorization': 'Bearer %s'}", SECRET)
            try:
                raise ConnectionError(f"cannot reach {url}")
            except ConnectionError:
                logging.getLogger("comfy.api").exception("internal error")
            expected = int(json_mode) + 1
            wait_until(lambda: server.text().count("internal error") == expected, 10, what="logdy lines")  # noqa: B023
        outputs = {"capture": "".join(capture), "stderr": capsys.readouterr().err,
                   "file": (tmp_path / "logs" / "comfy-test.log").read_text(), "logdy": server.text()}
        for name, text in outputs.items():
            assert SECRET not in text, f"the password leaked into {name}:\n{text}"
        assert "redis://:***@127.0.0.1:6379/0" in outputs["file"] and "Bearer ***" in outputs["file"]
    finally:
        server.stop()


@pytest.mark.parametrize("text, expected", [
    ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:hunter2@h/0 and amqp://u:p@q//", "rediss://user:***@h/0 and amqp://u:***@q//"),
    ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
    ('{"authorization": "Basic Zm9vOmJhcg=="}', '{"authorization": "Basic ***"}'),
    ("password=hunter2&x=1", "password=***&x=1"),
    ("redis://127.0.0.1:6379/0 http://host:8188/prompt", "redis://127.0.0.1:6379/0 http://host:8188/prompt"),
])
def test_redact(text, expected):
    assert redact(text) == expected


# --------------------------------------------------------------------------------- attribution
def test_attribution_with_a_running_and_a_prequeued_prompt():
    now = [0.0]
    a = Attribution(grace=0.5, clock=lambda: now[0])
    a.submitting("A", "pa")
    a.submitting("B", "pb")  # pre-queued inside ComfyUI while A runs
    assert a.assign("got prompt\n") == "A"
    a.started("A")
    assert a.assign("got prompt\n") == "B"
    assert a.assign("step 3/20\n") == "A"
    a.finished("A")
    a.started("B")  # B starts at once; A's last lines are still on their way
    now[0] = 0.3
    assert a.assign("Prompt executed in 1.00 seconds\n") == "A"
    assert a.assign("loading B's model\n") == "B"
    a.finished("B")
    now[0] = 0.6
    assert a.assign("Prompt executed in 2.00 seconds\n") == "B"
    assert a.assign("a line after B's run\n") is None  # B's run closed: nobody's
    now[0] = 2.0
    assert a.tracked() == []


def test_attribution_without_a_started_event_uses_the_time_window():
    now = [0.0]
    a = Attribution(grace=0.5, clock=lambda: now[0])
    a.submitting("A", "pa")
    assert a.assign("got prompt\n") == "A"
    assert a.assign("!!! Exception during processing !!! boom\n") == "A"  # Started missed (reconnect)
    a.finished("A")
    now[0] = 0.4
    assert a.assign("Traceback (most recent call last):\n") == "A"  # within the grace
    now[0] = 1.0
    assert a.assign("late line\n") is None


# ------------------------------------------------------------------------------------- the fleet
@pytest.fixture
def secured_fleet(tmp_path, request):
    """A fleet whose Redis has a password (the URL every process gets carries it)."""
    fleet = Fleet(workdir=tmp_path / "fleet",
                  redis=RedisServer(port=free_port(), workdir=tmp_path, password=SECRET).start())
    fleet.workdir.mkdir(parents=True, exist_ok=True)
    yield fleet
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.__stderr__.write(f"\n---- fleet logs of {request.node.nodeid}\n{fleet.logs()}\n")
    fleet.stop()


def _logs(base: str, task_id: str) -> list[dict]:
    response = requests.get(f"{base}/api/v1/tasks/{task_id}/logs", timeout=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task_id"] == task_id
    return body["lines"]


def _comfy(lines: list[dict], prefix: str) -> list[str]:
    return [line["m"] for line in lines if line["source"] == "comfyui" and line["m"].startswith(prefix)]


def _settled_logs(base: str, task_id: str) -> list[dict]:
    """The logs once the run's last ComfyUI line (flushed after the run) has been stored."""

    def settled():
        lines = _logs(base, task_id)
        return lines if _comfy(lines, "Prompt executed in") else None

    return wait_until(settled, 15, what=f"'Prompt executed in' in the logs of {task_id}")


def test_per_run_logs_through_the_api(secured_fleet):
    fleet = secured_fleet
    logdy = LineServer().start()
    try:
        fleet.extra_env["LOGDY_ADDRESS"] = logdy.address
        sim = fleet.add_sim("--step-seconds", "0.02")
        fleet.add_worker(sim)
        fleet.wait_workers()
        fleet.start_api()
        base = fleet.url

        # Two jobs back to back: the second waits inside ComfyUI while the first runs.
        first = submit(base, story(seed=1))["task_id"]
        second = submit(base, story(seed=2))["task_id"]
        for task_id in (first, second):
            assert wait_status(base, task_id, timeout=60)["status"] == "succeeded"
        for task_id, other in ((first, second), (second, first)):
            lines = _settled_logs(base, task_id)
            assert len(_comfy(lines, "got prompt")) == 1, lines
            assert len(_comfy(lines, "Prompt executed in")) == 1, lines
            worker = [line["m"] for line in lines if line["source"] == "worker"]
            assert any(f"task {task_id} running on gpu.test.0" in m for m in worker), worker
            assert any(f"task {task_id} succeeded" in m for m in worker), worker
            assert not any(other in line["m"] for line in lines), f"{other}'s lines in {task_id}'s logs"
            assert [line["t"] for line in lines] == sorted(line["t"] for line in lines)
            assert {line["source"] for line in lines} == {"comfyui", "worker"}
            # Once the run ended its list leaves Redis for the output storage; served the same.
            client = redis.Redis.from_url(fleet.redis.url)
            wait_until(lambda: not client.exists(f"cs:logs:{task_id}"), 15, what="the log list to leave Redis")
            assert (fleet.workdir / "outputs" / task_id / "log.jsonl").is_file()
            moved = _logs(base, task_id)
            assert all(line in moved for line in lines) and len(moved) == len(set(map(json.dumps, moved)))

        # A failing run carries ComfyUI's exception lines.
        fleet.sims[0].faults(fail_at_step=2)
        failing = submit(base, story(seed=3))["task_id"]
        assert wait_status(base, failing, timeout=60)["status"] == "failed"
        lines = _settled_logs(base, failing)
        assert _comfy(lines, "!!! Exception during processing !!!"), lines
        assert any(f"task {failing} failed: execution_error" in line["m"] for line in lines if line["source"] == "worker")

        # Unknown and invalid ids: the project's 404.
        for bad in (str(uuid.uuid4()), "not-a-task"):
            response = requests.get(f"{base}/api/v1/tasks/{bad}/logs", timeout=5)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "task_not_found"
        spec = requests.get(base + "/openapi.json", timeout=5).json()
        assert {"200", "404"} <= set(spec["paths"]["/api/v1/tasks/{task_id}/logs"]["get"]["responses"])

        # The worker's job lines reached logdy, with their fields.
        wait_until(lambda: any(r.get("task_id") == first for r in logdy.records()), 10, what="job lines at logdy")
        job_line = next(r for r in logdy.records() if r.get("task_id") == first)
        assert job_line["queue"] == "gpu.test.0" and job_line["service"] == "worker-gpu.test.0"
        assert any(r.get("prompt_id") for r in logdy.records() if r.get("task_id") == first)

        # Routed once: each line once in the worker's output; Celery's own lines too.
        worker_out = fleet.workers[0].output()
        assert worker_out.count(f"task {first} running on gpu.test.0") == 1, worker_out[-3000:]
        assert worker_out.count("ready.") == 1  # Celery's "celery@host ready." (its own logger)
        assert "task_id=" + first in worker_out

        # The Redis password is in every process's URL, and in none of their logs.
        assert "redis://:***@127.0.0.1" in worker_out  # the worker logs its Redis URL at start, masked
        texts = {"worker": worker_out, "api": fleet.api.output(), "logdy": logdy.text()}
        texts.update({path.name: path.read_text() for path in (fleet.workdir / "logs").glob("*.log")})
        assert "comfy-api.log" in texts and "comfy-worker-gpu.test.0.log" in texts
        for name, text in texts.items():
            assert SECRET not in text, f"the Redis password leaked into {name}"
        for task_id in (first, second, failing):
            assert SECRET not in json.dumps(_logs(base, task_id))
    finally:
        logdy.stop()
