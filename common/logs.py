"""One logging setup for the API and the workers, on loguru: `setup_logging(service)`.

What it installs (settings in `common/settings.py`, listed in the README):

* **Console** (stderr): one human-readable line per record —
  ``time | level | service | module:line | task_id=… prompt_id=… queue=… | message`` — the job
  fields appear whenever the record carries them (the GPU task runs inside
  ``logger.contextualize(task_id=…, queue=…, prompt_id=…)``). ``LOG_JSON=1``: loguru's JSON
  (``serialize``) instead, one object per line, the job fields under ``record.extra``.
* **Files**: ``LOG_DIR/comfy-<service>.log`` (``LOG_DIR`` empty: no files), rotated at
  ``LOG_FILE_ROTATION`` and keeping ``LOG_FILE_RETENTION`` files (a count) or a duration
  (``"7 days"``); JSON like the console with ``LOG_JSON=1``. The ``comfy-`` prefix keeps them
  apart from the stdout captures ``make run`` writes beside them (``var/logs/<name>.log``). Several
  processes of one service (gunicorn workers) share a file: whichever crosses the size rotates it
  and the others reopen it (loguru's ``watch``).
* **logdy** (``LOGDY_ADDRESS=host:port``, e.g. ``logdy socket 8233``): newline-delimited JSON over
  TCP. Records go into a bounded in-memory queue and a background thread sends them, so a slow
  or dead logdy never blocks a job; when the queue is full the oldest lines are dropped and
  counted (`LogdySink.dropped`; a notice line reports them once logdy is back). The thread
  reconnects with exponential backoff when logdy restarts.
* **Standard logging** (Celery, kombu, Flask/werkzeug, gunicorn, requests/urllib3 and the project's
  own ``logging.getLogger("comfy.…")`` loggers) is routed into loguru once: one `InterceptHandler`
  on the root logger, console handlers that others installed are removed, so no line is printed
  twice. Celery: the worker connects Celery's ``setup_logging`` signal (``workers/tasks.py``), so
  Celery configures no logging of its own. gunicorn: ``gunicorn --logger-class
  common.logs.GunicornLogger`` routes the master's error log and the access log (when enabled
  with ``--access-logfile -``) the same way; without it the API's workers still take over
  ``gunicorn.error`` in `create_app`, and only the master's few lines keep gunicorn's format.
* **Secrets**: every record's message, extra fields and exception text are passed through
  `redact` (passwords in URLs such as ``redis://:pw@host``, ``Authorization`` headers,
  ``password=``/``token=``-style pairs); loguru's ``diagnose`` (variable values in tracebacks)
  is off everywhere.

Calling `setup_logging` again with the same configuration changes nothing (no doubled sinks);
with another configuration it replaces what it installed before. `reset_logging` removes it.

The per-job log lists in Redis (``cs:logs:<task_id>``, written by `workers.joblogs`, read by the
API's ``GET /api/v1/tasks/{id}/logs``) share their key and size here.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import select
import socket
import sys
import threading
import traceback
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from common import keys

# Fields of a record that tie it to a job; shown on every line that has them.
CONTEXT_KEYS = ("task_id", "prompt_id", "queue")

# Per-job log lines in Redis (see workers/joblogs.py): a capped list per task, same TTL as the record.
JOB_LOG_PREFIX = keys.logs("")
JOB_LOG_MAX_LINES = 2000


def job_log_key(task_id: str) -> str:
    return JOB_LOG_PREFIX + task_id


def iso_utc(dt) -> str:
    """A fixed-width UTC time (``2026-11-30T01:29:41.919515Z``): sorts as text in time order."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------- redaction
_URL_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<secret>[^@\s/]+)@")
_AUTH_HEADER = re.compile(
    r"(?i)(?P<head>\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?)"
    r"(?P<secret>[^\s\"',;}]+)")
_SECRET_PAIR = re.compile(
    r"(?i)(?P<head>\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|token)\b"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<secret>[^\s\"',;&}]+)")
MASK = "***"


def redact(text: str) -> str:
    """Mask secrets in a log text: URL passwords, Authorization headers, password=/token= pairs."""
    if not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: m["head"] + MASK if m["secret"] != MASK else m[0], text)
    return _SECRET_PAIR.sub(lambda m: m["head"] + MASK if m["secret"] != MASK else m[0], text)


def _redacted_value(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (dict, list, tuple)):
        cleaned = redact(str(value))
        return value if cleaned == str(value) else cleaned
    return value


def _patch(record) -> None:
    """loguru patcher (runs once per record, before any sink): redact message, extra, exception."""
    record["message"] = redact(record["message"])
    extra = record["extra"]
    for key, value in list(extra.items()):
        if isinstance(value, (str, dict, list, tuple)):
            extra[key] = _redacted_value(value)
    exc = record["exception"]
    if exc is not None and exc.value is not None:
        text = str(exc.value)
        if redact(text) != text:
            try:  # same type, masked arguments: sinks render the traceback from this copy
                clean = copy.copy(exc.value)
                clean.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.value.args)
                if redact(str(clean)) != str(clean):
                    raise ValueError
            except Exception:  # noqa: BLE001 - an exception that does not copy cleanly
                clean = RuntimeError(redact(f"{type(exc.value).__name__}: {text}"))
            record["exception"] = exc._replace(value=clean)


def format_exception(record) -> str:
    exc = record["exception"]
    if exc is None:
        return ""
    return redact("".join(traceback.format_exception(exc.type, exc.value, exc.traceback)))


# --------------------------------------------------------------------------------- standard logging → loguru
class InterceptHandler(logging.Handler):
    """Hands every standard `logging` record to loguru, keeping the caller's module and line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad %-format in some library
            self.handleError(record)
            return
        frame, depth = logging.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        bound = {key: getattr(record, key) for key in CONTEXT_KEYS if getattr(record, key, None) is not None}
        target = logger.bind(**bound) if bound else logger
        target.opt(depth=depth, exception=record.exc_info).log(level, message)


_INTERCEPT = InterceptHandler()


def _is_console_handler(handler: logging.Handler) -> bool:
    consoles = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and id(getattr(handler, "stream", None)) in consoles)


# Loggers whose own handlers or propagate=False would keep their lines away from the root handler.
TAKEN_OVER = ("gunicorn.error", "gunicorn.access", "werkzeug", "celery", "celery.task", "celery.redirected")


def route_standard_logging(level: int | str = logging.INFO) -> None:
    """Route the `logging` module into loguru, once: the root logger gets our one handler, and
    console handlers other libraries installed are removed (they would print every line again)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, InterceptHandler) or _is_console_handler(handler):
            root.removeHandler(handler)
    root.addHandler(_INTERCEPT)
    root.setLevel(level)
    for name, item in list(logging.root.manager.loggerDict.items()):
        if not isinstance(item, logging.Logger):
            continue
        removed = [h for h in item.handlers if isinstance(h, InterceptHandler) or _is_console_handler(h)]
        for handler in removed:
            item.removeHandler(handler)
        if removed or name in TAKEN_OVER:
            item.propagate = True


# --------------------------------------------------------------------------------------------- sinks
class _Stderr:
    """The console sink: looks `sys.stderr` up on every write, so a swapped stream (pytest's capture,
    a daemon redirect) never receives writes after it was closed."""

    def write(self, text: str) -> None:
        stream = sys.stderr or sys.__stderr__
        if stream is not None:
            stream.write(text)

    def flush(self) -> None:
        stream = sys.stderr or sys.__stderr__
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


_TEMPLATES: dict[tuple, str] = {}


def _text_format(service: str):
    head = ("<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
            + service + " | <cyan>{name}</cyan>:<cyan>{line}</cyan> | ")

    def fmt(record) -> str:
        keys = tuple(k for k in CONTEXT_KEYS if k in record["extra"])
        template = _TEMPLATES.get((service, keys))
        if template is None:
            context = " ".join(f"{k}={{extra[{k}]}}" for k in keys)
            template = head + (f"<magenta>{context}</magenta> | " if context else "") + "<level>{message}</level>\n{exception}"
            _TEMPLATES[(service, keys)] = template
        return template

    return fmt


class LogdySink:
    """loguru sink: newline-delimited JSON to logdy over TCP, never blocking the caller.

    `write` only appends to a bounded deque (the oldest line is dropped and counted when it is
    full); a daemon thread connects, sends in batches, notices a closed peer before sending
    (logdy never writes to us, so a readable socket means it went away) and reconnects with
    exponential backoff. After a fork the child starts its own thread on first use.
    """

    def __init__(self, address: str, service: str, *, max_queue: int = 10000, backoff_initial: float = 0.1,
                 backoff_max: float = 2.0, connect_timeout: float = 1.0, send_timeout: float = 2.0):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"LOGDY_ADDRESS must be host:port, not {address!r}")
        self.address = (host.strip("[]"), int(port))
        self.service = service
        self.max_queue = max_queue
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.connect_timeout, self.send_timeout = connect_timeout, send_timeout
        self.dropped = 0  # lines lost because the queue was full (logdy down or slow)
        self.sent = 0
        self.connects = 0
        self._reported_dropped = 0
        self._sock: socket.socket | None = None
        self._pid: int | None = None
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # Called by loguru under its handler lock: no I/O, no logging here.
    def write(self, message) -> None:
        if self._pid != os.getpid():  # a forked child (gunicorn worker): its own queue and thread
            self._init_process_state()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="logdy-sink", daemon=True)
            self._thread.start()
        self.put(self._line(message.record))

    def put(self, line: str) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(line)
        self._wake.set()

    def _line(self, record) -> str:
        data = {"time": iso_utc(record["time"]), "level": record["level"].name, "service": self.service,
                "logger": record["name"], "message": record["message"]}
        for key, value in record["extra"].items():
            if key not in data:
                data[key] = value
        if record["exception"] is not None:
            data["exception"] = format_exception(record)
        return json.dumps(data, default=str, ensure_ascii=False) + "\n"

    def stop(self) -> None:
        """Flush what is queued (best effort, about a second at most) and stop the thread."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            thread.join(1.5)

    # The background thread -------------------------------------------------------------------
    def _run(self) -> None:
        self._sock = None
        delay = self.backoff_initial
        while True:
            if not self._queue:
                if self._stop.is_set():
                    break
                self._wake.wait(0.5)
                self._wake.clear()
            if self._sock is not None and self._peer_closed(self._sock):
                self._close()
            if not self._queue:
                continue
            if self._sock is None:
                if not self._connect():
                    if self._stop.is_set():
                        break
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                delay = self.backoff_initial
            self._send_batch()
        self._close()

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        except OSError:
            return False
        sock.settimeout(self.send_timeout)
        self._sock = sock
        self.connects += 1
        lost = self.dropped - self._reported_dropped
        if lost:
            self._reported_dropped = self.dropped
            notice = {"time": iso_utc(_now()), "level": "WARNING", "service": self.service, "logger": __name__,
                      "message": f"logdy sink: {lost} line(s) dropped while logdy was unreachable"}
            with self._lock:
                self._queue.appendleft(json.dumps(notice) + "\n")
        return True

    def _send_batch(self) -> None:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
        try:
            self._sock.sendall("".join(batch).encode("utf-8"))
            self.sent += len(batch)
        except OSError:
            self._close()
            with self._lock:  # put them back in front, still within the bound
                for line in reversed(batch):
                    if len(self._queue) >= self.max_queue:
                        self.dropped += 1
                        continue
                    self._queue.appendleft(line)

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(4096) == b""
        except (OSError, ValueError):
            return True

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------------- setup
_lock = threading.RLock()
_state: dict = {"key": None, "ids": [], "logdy": None}


def _retention(value: str):
    value = str(value).strip()
    return int(value) if value.isdigit() else (value or None)


def _service_name(service: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", service) or "service"


def setup_logging(service: str, settings=None) -> None:
    """Configure loguru and route standard logging into it (see the module docs). Idempotent."""
    if settings is None:
        from common.settings import get_settings

        settings = get_settings()
    service = _service_name(service)
    level = (settings.log_level or "INFO").upper()
    try:
        logger.level(level)
    except ValueError:
        level = "INFO"
    key = (service, level, settings.log_dir, bool(settings.log_json), settings.logdy_address,
           settings.log_file_rotation, str(settings.log_file_retention))
    with _lock:
        if _state["key"] == key:
            route_standard_logging(logger.level(level).no)  # a library may have added handlers since
            return
        _remove_installed()
        try:  # loguru's default stderr handler would print every line a second time
            logger.remove(0)
        except ValueError:
            pass
        logger.configure(extra={"service": service}, patcher=_patch)
        fmt = _text_format(service)
        common = {"level": level, "format": fmt, "backtrace": False, "diagnose": False,
                  "serialize": bool(settings.log_json)}
        stderr = sys.stderr or sys.__stderr__
        colorize = bool(not settings.log_json and stderr is not None and hasattr(stderr, "isatty") and stderr.isatty())
        ids = [logger.add(_Stderr(), colorize=colorize, **common)]
        if settings.log_dir:
            path = Path(settings.log_dir) / f"comfy-{service}.log"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                ids.append(logger.add(str(path), rotation=settings.log_file_rotation or None,
                                      retention=_retention(settings.log_file_retention), encoding="utf-8",
                                      watch=True, colorize=False, **common))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("log files disabled: cannot write {} ({})", path, exc)
        logdy = None
        if settings.logdy_address:
            try:
                logdy = LogdySink(settings.logdy_address, service)
                ids.append(logger.add(logdy, level=level, format="{message}", backtrace=False, diagnose=False,
                                      colorize=False))
            except ValueError as exc:
                logger.warning("logdy sink disabled: {}", exc)
        _state.update(key=key, ids=ids, logdy=logdy)
        route_standard_logging(logger.level(level).no)


def _remove_installed() -> None:
    for handler_id in _state["ids"]:
        try:
            logger.remove(handler_id)  # stops the sink (a LogdySink flushes and ends its thread)
        except ValueError:
            pass
    _state.update(key=None, ids=[], logdy=None)


def reset_logging() -> None:
    """Remove what `setup_logging` installed (tests; a process that reconfigures from scratch)."""
    with _lock:
        _remove_installed()
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, InterceptHandler):
                root.removeHandler(handler)


def logdy_sink() -> LogdySink | None:
    """The running logdy sink, if any (its `dropped`, `sent` and `connects` counters)."""
    return _state["logdy"]


# --------------------------------------------------------------------------------------------- gunicorn
try:
    from gunicorn.glogging import Logger as _GunicornLogger
except ImportError:  # pragma: no cover - workers need no gunicorn
    _GunicornLogger = None

if _GunicornLogger is not None:
    class GunicornLogger(_GunicornLogger):
        """``gunicorn --logger-class common.logs.GunicornLogger``: the master's and the workers'
        error log, and the access log when enabled (``--access-logfile -``), go through loguru."""

        def setup(self, cfg):
            super().setup(cfg)
            setup_logging("api")
            for log in (self.error_log, self.access_log):
                for handler in list(log.handlers):
                    if _is_console_handler(handler):
                        log.removeHandler(handler)
                log.propagate = True
