"""Per-run logs: each job's ComfyUI log lines and the worker's own lines, kept in Redis.

Served by ``GET /api/v1/tasks/{id}/logs``. Stored per job as a capped Redis list
``cs:logs:<task_id>`` (the last `JOB_LOG_MAX_LINES` lines, TTL ``RESULT_TTL`` like the task
record) of JSON ``{"t", "source": "comfyui" | "worker", "m"}``; ``t`` is a fixed-width UTC time.

Where the lines come from
  * ``worker``: every loguru record (standard logging included) that carries a ``task_id`` in its
    extra: the GPU task runs inside ``logger.contextualize(task_id=…, prompt_id=…, queue=…)``.
  * ``comfyui``: the worker's one `ComfyClient` subscribes to ComfyUI's log stream once, at worker
    start (``PATCH /internal/logs/subscribe``; re-subscribed by the client after every reconnect,
    retried here until the first subscription succeeds).

Attributing ComfyUI's lines to jobs (`Attribution`)
  ComfyUI's lines carry no prompt id, so attribution is a best guess from what this worker knows,
  judged when each line *arrives*:

  1. A job is tracked from just before its ``POST /prompt`` until it finished plus `GRACE_SECONDS`
     (ComfyUI flushes its log in batches; a run's last line can come a few hundred ms after the
     run ended).
  2. ``got prompt`` (printed when ComfyUI accepts a ``POST /prompt``) goes to the oldest job whose
     submit has not been matched with its ``got prompt`` yet.
  3. Any other line goes to the job whose prompt RUNS: the worker learns that from the prompt's
     ``execution_start`` (the `Started` event). With two prompts inside ComfyUI (one running, the
     next queued) the lines go to the running one. Runs are kept in start order and a run ends
     at its ``Prompt executed in …`` line, so the last lines of a run that arrive after the next
     prompt already started still go to the run they close.
  4. With no run of ours known to be running (a `Started` event missed across a reconnect,
     lines between runs): the earliest submitted job still in flight, else the job that finished
     last, within the grace period. Otherwise the line is not stored.

  So: lines from prompts other clients put on the same ComfyUI while one of ours runs, validation
  messages of a rejected submit while another of our prompts runs, and lines delayed by more than
  the grace period can land on the wrong job or on none. Exact attribution is impossible while
  ComfyUI does not tag its lines.

Writing never blocks a job on Redis: lines go into a bounded in-memory queue (oldest dropped and
counted when full) and a background thread writes them every `FLUSH_INTERVAL` seconds, one
pipeline per batch (RPUSH + LTRIM + EXPIRE per job).

Once a job's run ended here (plus the grace period, its last lines flushed), the same thread
moves its list out of Redis into the output storage (`common/storage.py` `log_key`, JSON lines,
the last `JOB_LOG_MAX_LINES`, appended to what an earlier run of the job left there): a finished
job kept for RESULT_TTL holds no log list in Redis. The API serves both (app/task_logs.py).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Callable, Optional

import redis
from loguru import logger

from common import redis_conn
from common.logs import JOB_LOG_MAX_LINES, format_exception, iso_utc, job_log_key
from common.storage import LOG_CONTENT_TYPE, Storage, log_key
from workers.comfy_client import ComfyError, LogEntry

log = logging.getLogger("comfy.worker.logs")

GRACE_SECONDS = 1.0     # a finished job keeps receiving ComfyUI lines this long (see rule 1)
FLUSH_INTERVAL = 0.2    # seconds between two Redis writes
MAX_PENDING = 20000     # lines waiting for Redis before the oldest are dropped
SUBSCRIBE_RETRY_MAX = 30.0
GOT_PROMPT = "got prompt"
RUN_END = "Prompt executed in"


@dataclass
class _Job:
    task_id: str
    prompt_id: str
    submitted_at: float
    finished_at: Optional[float] = None
    closed: bool = False  # its run's "Prompt executed in" line was seen


class Attribution:
    """Which job an (untagged) ComfyUI log line belongs to; the rules are in the module docs.
    Thread-safe: the task threads report submit/start/finish, the client's reader thread asks."""

    def __init__(self, grace: float = GRACE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.grace = grace
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._awaiting_got_prompt: deque[str] = deque()
        self._running: list[str] = []  # started, run not yet closed; in start order

    def submitting(self, task_id: str, prompt_id: str) -> None:
        """Call just BEFORE ``POST /prompt``: ComfyUI prints ``got prompt`` before it answers."""
        with self._lock:
            self._drop(task_id)
            self._jobs[task_id] = _Job(task_id, prompt_id, self.clock())
            self._awaiting_got_prompt.append(task_id)

    def started(self, task_id: str) -> None:
        with self._lock:
            job = self._jobs.get(task_id)
            if job is not None and not job.closed and task_id not in self._running:
                self._running.append(task_id)

    def finished(self, task_id: str) -> None:
        with self._lock:
            job = self._jobs.get(task_id)
            if job is not None and job.finished_at is None:
                job.finished_at = self.clock()

    def tracked(self) -> list[str]:
        with self._lock:
            self._expire(self.clock())
            return list(self._jobs)

    def assign(self, line: str) -> Optional[str]:
        text = line.lstrip()
        with self._lock:
            self._expire(self.clock())
            if text.startswith(GOT_PROMPT) and self._awaiting_got_prompt:
                return self._awaiting_got_prompt.popleft()
            if self._running:
                task_id = self._running[0]
                if text.startswith(RUN_END):
                    self._running.pop(0)
                    self._jobs[task_id].closed = True
                return task_id
            open_jobs = [j for j in self._jobs.values() if not j.closed]
            in_flight = [j for j in open_jobs if j.finished_at is None]
            if in_flight:
                job = min(in_flight, key=lambda j: j.submitted_at)
            elif open_jobs:
                job = max(open_jobs, key=lambda j: j.finished_at)
            else:
                return None
            if text.startswith(RUN_END):
                job.closed = True
            return job.task_id

    def _expire(self, now: float) -> None:
        for job in [j for j in self._jobs.values() if j.finished_at is not None and now - j.finished_at > self.grace]:
            self._drop(job.task_id)

    def _drop(self, task_id: str) -> None:
        if self._jobs.pop(task_id, None) is None:
            return
        if task_id in self._running:
            self._running.remove(task_id)
        try:
            self._awaiting_got_prompt.remove(task_id)
        except ValueError:
            pass


# KEYS[1] a job's log list. ARGV: [1] lines kept, [2] TTL s, then the lines. One command per job
# per batch (append, cap, expire).
_APPEND = """
redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class JobLogWriter:
    """Appends lines to the per-job Redis lists from a background thread, in batches; with a
    `storage`, moves a list there once its job's run ended here (`archive`)."""

    def __init__(self, client: redis.Redis, ttl: int, max_lines: int = JOB_LOG_MAX_LINES,
                 max_pending: int = MAX_PENDING, interval: float = FLUSH_INTERVAL, storage: Storage | None = None,
                 archive_delay: float = GRACE_SECONDS + FLUSH_INTERVAL):
        self.redis = client
        self.storage = storage
        self.archive_delay = archive_delay
        self._archive_at: dict[str, float] = {}  # task id → when its list leaves Redis
        self.ttl = int(ttl)
        self.max_lines = max_lines
        self.interval = interval
        self.dropped = 0
        self.written = 0
        self._pending: deque[tuple[str, str]] = deque()
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failing_since: Optional[float] = None
        self._append = client.register_script(_APPEND)

    def append(self, task_id: str, line: dict) -> None:
        """Never blocks on Redis: a deque append (the oldest line goes when the queue is full)."""
        data = json.dumps(line, ensure_ascii=False)
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append((task_id, data))

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="job-logs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.flush():
            with self._lock:
                self._archive_at = dict.fromkeys(self._archive_at, 0.0)  # what ended moves now
            self._archive_due()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.flush():
                self._archive_due()

    def archive(self, task_id: str) -> None:
        """The job's run ended here: move its list to storage once its last lines are in."""
        if self.storage is not None:
            with self._lock:
                self._archive_at[task_id] = time.monotonic() + self.archive_delay

    def _archive_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [t for t, at in self._archive_at.items() if at <= now]
        for task_id in due:
            try:
                self.move_to_storage(task_id)
            except Exception as exc:  # noqa: BLE001 - the list stays in Redis (it expires with the record)
                log.warning("job logs of %s not moved to storage: %s", task_id, exc)
            with self._lock:
                self._archive_at.pop(task_id, None)

    def move_to_storage(self, task_id: str) -> int:
        """Append the job's Redis list to its log in storage, then drop what was moved from the
        list (lines appended meanwhile stay). Returns the lines moved."""
        key = job_log_key(task_id)
        lines = self.redis.lrange(key, 0, -1)
        if not lines:
            return 0
        old = self.storage.get(log_key(task_id)) or b""
        kept = [*old.splitlines(), *lines][-self.max_lines:]
        self.storage.put(log_key(task_id), b"\n".join(kept) + b"\n", LOG_CONTENT_TYPE)
        # Another run of the job (failover) may have appended since: those lines stay. (Past the
        # cap, its appends also cut the list's head, and as many of its lines would go here.)
        self.redis.ltrim(key, len(lines), -1)
        return len(lines)

    def flush(self) -> bool:
        """Write what is pending now; False (lines kept for the next round) when Redis failed."""
        with self._lock:
            if not self._pending:
                return True
            batch = list(self._pending)
            self._pending.clear()
        per_task: dict[str, list[str]] = {}
        for task_id, data in batch:
            per_task.setdefault(task_id, []).append(data)
        pipe = self.redis.pipeline(transaction=False)
        for task_id, lines in per_task.items():
            self._append(keys=[job_log_key(task_id)], args=[self.max_lines, self.ttl, *lines], client=pipe)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            with self._lock:  # back in front, within the bound
                for item in reversed(batch):
                    if len(self._pending) >= self._max_pending:
                        self.dropped += 1
                        continue
                    self._pending.appendleft(item)
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                log.warning("job logs: Redis write failed (%s); keeping lines and retrying", exc)
            return False
        if self._failing_since is not None:
            log.info("job logs: Redis writes work again")
            self._failing_since = None
        self.written += len(batch)
        return True


def comfy_time(t: str) -> str:
    """ComfyUI's ISO time (naive = that server's local time, taken as ours) as `iso_utc`."""
    try:
        dt = datetime.fromisoformat(t)
    except (TypeError, ValueError):
        dt = datetime.now()
    return iso_utc(dt if dt.tzinfo is not None else dt.astimezone())


class JobLogs:
    """The worker's per-run log collection: attribution + the Redis writer + the loguru sink."""

    def __init__(self, client: redis.Redis, ttl: int, level: str = "INFO", grace: float = GRACE_SECONDS,
                 storage: Storage | None = None):
        self.attribution = Attribution(grace)
        self.writer = JobLogWriter(client, ttl, storage=storage, archive_delay=grace + FLUSH_INTERVAL)
        self.level = level
        self.unattributed = 0
        self._sink_id: Optional[int] = None
        self._comfy = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # The GPU task reports its prompt's life -----------------------------------------------
    def submitting(self, task_id: str, prompt_id: str) -> None:
        self.attribution.submitting(task_id, prompt_id)

    def started(self, task_id: str) -> None:
        self.attribution.started(task_id)

    def finished(self, task_id: str) -> None:
        self.attribution.finished(task_id)

    def run_ended(self, task_id: str) -> None:
        """The job's task returned here: its list leaves Redis after the grace period."""
        self.attribution.finished(task_id)
        self.writer.archive(task_id)

    # Lines in ----------------------------------------------------------------------------------
    def on_comfy_log(self, entry: LogEntry) -> None:
        """The client's ``on_log`` callback (its reader thread): attribute and queue, no I/O."""
        task_id = self.attribution.assign(entry.m)
        if task_id is None:
            self.unattributed += 1
            return
        message = entry.m.removesuffix("\n")
        self.writer.append(task_id, {"t": comfy_time(entry.t), "source": "comfyui", "m": message})

    def _sink(self, message) -> None:
        """loguru sink for records that carry a task_id (called under loguru's lock: no I/O)."""
        record = message.record
        text = f"{record['level'].name} {record['name']}: {record['message']}"
        if record["exception"] is not None:
            text += "\n" + format_exception(record).rstrip("\n")
        self.writer.append(str(record["extra"]["task_id"]), {"t": iso_utc(record["time"]), "source": "worker",
                                                              "m": text})

    # Life of the collection ---------------------------------------------------------------------
    def install(self, comfy) -> None:
        """At worker start: the Redis writer, the loguru sink, and ComfyUI's log subscription."""
        with self._lock:
            if self._sink_id is not None:
                return
            self.writer.start()
            self._sink_id = logger.add(self._sink, level=self.level, format="{message}", backtrace=False, diagnose=False,
                                       filter=lambda record: record["extra"].get("task_id") is not None)
            self._comfy = comfy
        if not self._subscribe():
            threading.Thread(target=self._subscribe_later, name="comfy-log-subscribe", daemon=True).start()

    def _subscribe(self) -> bool:
        try:
            if not self._comfy.subscribe_logs(True, on_log=self.on_comfy_log):
                log.warning("this ComfyUI offers no log streaming: task logs will hold the worker's lines only")
            return True
        except ComfyError as exc:
            log.warning("subscribing to ComfyUI's log failed (%s); retrying in the background", exc)
            return False

    def _subscribe_later(self) -> None:
        delay = 1.0
        while not self._stop.wait(delay):
            try:
                self._comfy.subscribe_logs(True, on_log=self.on_comfy_log)
                log.info("subscribed to ComfyUI's log")
                return
            except ComfyError:
                delay = min(delay * 2, SUBSCRIBE_RETRY_MAX)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._sink_id is not None:
                try:
                    logger.remove(self._sink_id)
                except ValueError:
                    pass
                self._sink_id = None
        self.writer.stop()


@cache
def get_job_logs() -> JobLogs:
    """This worker process's collection (its Redis client has short timeouts: never a long wait)."""
    from workers.runtime import get_runtime

    settings = get_runtime().settings
    client = redis_conn.connect(settings, socket_timeout=3, socket_connect_timeout=2, health_check_interval=30,
                                client_name="comfy-worker-logs")
    return JobLogs(client, settings.result_ttl, level=(settings.log_level or "INFO").upper(),
                   storage=get_runtime().storage)
