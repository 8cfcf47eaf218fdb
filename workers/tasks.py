"""The GPU job: run one rendered workflow on this worker's ComfyUI and record the outcome.

The task renders nothing: it loads the graphs the API rendered (the job's payload), submits
them, turns ComfyUI's events into throttled progress, stores every output file, and writes
the final record. The task record in Redis is the truth callers see; the Celery state
mirrors it for Flower. A ComfyUI that is lost mid-job sends the job to another GPU.
"""
from __future__ import annotations

import io
import logging
import time
import uuid

from celery import signals
from celery.exceptions import Ignore
from loguru import logger

from common import events
from common.jobs import requeue
from common.logs import setup_logging
from common.settings import get_settings
from common.storage import make_key
from common.task_view import image_url
from common.task_store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, now_iso
from workers.celery_app import RUN_WORKFLOW, app
from workers.comfy_client import (
    Cached, ComfyError, ComfyWaitTimeout, Executing, Failed, Interrupted, Progress, Started, Succeeded,
)
from workers.joblogs import get_job_logs
from workers.progress import ProgressTracker
from workers.runtime import get_runtime

log = logging.getLogger("comfy.worker")


class JobEvents:
    """One job's progress and output events: into its event log (SSE), and to its webhook when
    the caller asked for that kind (no more often than WEBHOOK_PROGRESS_INTERVAL for progress)."""

    def __init__(self, runtime, task_id: str, callback: dict | None):
        self.runtime, self.task_id, self.callback = runtime, task_id, callback
        self.last_hook = float("-inf")

    def progress(self, progress: dict) -> None:
        event_id = events.append(self.runtime.redis, self.task_id, events.PROGRESS, progress)
        now = time.monotonic()
        if self.callback and now - self.last_hook >= self.runtime.settings.webhook_progress_interval:
            self.last_hook = now
            self._hook(events.PROGRESS, {"task_id": self.task_id, **progress}, event_id)

    def output(self, index: int, item: dict) -> None:
        data = {"index": index, "url": image_url(self.task_id, index, self.runtime.settings.public_url),
                "content_type": item["content_type"], "width": item.get("width"), "height": item.get("height"),
                "size": item["size"]}
        event_id = events.append(self.runtime.redis, self.task_id, events.OUTPUT, data)
        self._hook(events.OUTPUT, {"task_id": self.task_id, **data}, event_id)

    def _hook(self, kind: str, data: dict, event_id: str) -> None:
        try:
            self.runtime.notifier.on_event(self.task_id, self.callback, kind, data, event_id)
        except Exception:  # noqa: BLE001 - a webhook never fails a job
            log.exception("task %s: %s webhook not queued", self.task_id, kind)


class JobFailed(Exception):
    """Raised after a failed job is recorded, so Celery and Flower show it as a failure."""


@signals.setup_logging.connect
def _setup_logging(**_):
    # Connected: Celery configures no logging of its own (no second handler, no stdout hijack).
    setup_logging(f"worker-{get_settings().queue_name}")


@signals.worker_ready.connect
def _start_background(sender=None, **_):
    runtime = get_runtime()
    get_job_logs().install(runtime.client)  # ComfyUI's log lines and ours, per job, into Redis
    consumer = getattr(sender, "task_consumer", None)
    consumed = [q.name for q in consumer.queues] if consumer is not None else []
    gpu_queues = [q for q in consumed if q.startswith("gpu.")]
    if gpu_queues and not runtime.settings.gpu_queue:
        runtime.queue = gpu_queues[0]
    # First heartbeat as the consumer starts: before it, dispatch does not know this GPU; a job
    # started just before it is covered by the monitor's grace period.
    runtime.publish_heartbeat()
    runtime.start_background(app)
    log.info("worker ready: queue %s, ComfyUI %s, Redis %s", runtime.queue, runtime.settings.comfyui_url,
             runtime.settings.redis_url)  # the logging setup masks a password in the URL


@signals.worker_shutting_down.connect
def _drain(**_):
    # Warm shutdown: finish what runs, take nothing new; the monitor moves what waits here.
    runtime = get_runtime()
    runtime.draining = True
    try:
        runtime.publish_heartbeat()
    except Exception:  # noqa: BLE001
        log.exception("draining heartbeat failed")


@signals.worker_shutdown.connect
def _stop_background(**_):
    get_job_logs().stop()
    get_runtime().stop()


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width, image.height
    except (UnidentifiedImageError, OSError):
        return None, None


def _error(source: str, code: str, message: str, details: dict | None = None) -> dict:
    return {"source": source, "code": code, "message": message, "details": details or {}}


@app.task(bind=True, name=RUN_WORKFLOW)
def run_workflow(self, task_id: str) -> dict:
    # Every line logged while the job runs carries its task id and GPU queue (and prompt id, below).
    with logger.contextualize(task_id=task_id, queue=get_runtime().queue):
        return _run_workflow(self, task_id)


def _run_workflow(self, task_id: str) -> dict:
    runtime = get_runtime()
    store = runtime.store
    record = store.get(task_id)
    # The queue this message came from: our own, or another GPU's that an operator told this
    # worker to consume (`celery control add_consumer`) to drain it.
    source = (self.request.delivery_info or {}).get("routing_key") or runtime.queue
    if record is None or record["status"] != QUEUED or record["queue"] != source:
        # Cancelled while waiting in Celery (it never reaches the GPU), moved to another GPU,
        # already running elsewhere (a redelivery), or done: nothing to do.
        log.info("task %s not started here: %s", task_id,
                 "no record" if record is None else f"{record['status']} on {record['queue']}")
        raise Ignore()
    attempts = int(record.get("attempts", 0)) + 1
    applied, before = store.transition(
        task_id, allowed=(QUEUED,), status=RUNNING, on_queue=source, queue=runtime.queue, started_at=now_iso(),
        gpu=runtime.queue, comfyui=runtime.settings.comfyui_url, worker=runtime.instance, attempts=attempts,
    )
    if not applied:
        log.info("task %s not started here: it became %s", task_id, before)
        raise Ignore()
    runtime.job_started(task_id)
    log.info("task %s running on %s (attempt %d)", task_id, runtime.queue, attempts)
    try:
        payload = store.payload(task_id)
        if payload is None:
            return _finish_failed(store, task_id, _error("service", "payload_missing",
                                                         "the job's workflow expired from Redis before it ran"))
        return _run(self, runtime, {**record, "attempts": attempts, "status": RUNNING}, payload)
    finally:
        get_job_logs().finished(task_id)
        runtime.job_ended(task_id)


def _run(task, runtime, record: dict, payload: dict) -> dict:
    prompt_id = str(uuid.uuid4())
    with logger.contextualize(prompt_id=prompt_id):
        return _run_prompt(task, runtime, record, payload, prompt_id)


def _run_prompt(task, runtime, record: dict, payload: dict, prompt_id: str) -> dict:
    store, client, settings = runtime.store, runtime.client, runtime.settings
    task_id, graph = record["task_id"], payload["graph"]
    job_logs = get_job_logs()
    store.update(task_id, prompt_id=prompt_id)
    extra = {"extra_pnginfo": {"workflow": payload["ui"]}} if payload.get("ui") else None
    tracker = ProgressTracker(graph, payload.get("progress_repeats"))
    notes = JobEvents(runtime, task_id, record.get("callback"))
    last_sent, gpu_started, sampled, outcome = 0.0, None, False, None
    try:
        job_logs.submitting(task_id, prompt_id)  # before the POST: ComfyUI logs "got prompt" before answering
        client.submit(graph, prompt_id=prompt_id, extra_data=extra)
        runtime.job_submitted(task_id, prompt_id)
        if (store.get(task_id) or {}).get("cancel_requested"):
            runtime.cancel_local(task_id)
        for event in client.events(prompt_id, timeout=settings.job_timeout):
            progress = None
            if isinstance(event, Started):
                job_logs.started(task_id)
                gpu_started = time.monotonic()
                store.update(task_id, comfy_started_ms=int(time.time() * 1000))
            elif isinstance(event, Cached):
                progress = tracker.cached(event.nodes)
            elif isinstance(event, Executing):
                progress = tracker.executing(event.node)
            elif isinstance(event, Progress) and event.node is not None:
                sampled = True
                progress = tracker.step(event.node, event.value, event.max)
            elif isinstance(event, (Succeeded, Failed, Interrupted)):
                job_logs.finished(task_id)
                outcome = event
                store.update(task_id, comfy_finished_ms=int(time.time() * 1000))
            if progress is not None and time.monotonic() - last_sent >= settings.progress_interval:
                last_sent = time.monotonic()
                task.update_state(state="PROGRESS", meta={"task_id": task_id, "progress": progress.as_dict()})
                notes.progress(progress.as_dict())
    except ComfyWaitTimeout:
        runtime.cancel_local(task_id)  # do not leave it running on the GPU
        return _finish_failed(store, task_id, _error(
            "service", "job_timeout", f"the job ran longer than JOB_TIMEOUT ({settings.job_timeout:g} s) and was stopped",
            {"prompt_id": prompt_id}))
    except ComfyError as exc:
        if (store.get(task_id) or {}).get("cancel_requested"):
            return _finish_cancelled(task, store, task_id)  # e.g. deleted from ComfyUI's queue by our cancel
        if exc.retryable:
            return _retry_elsewhere(runtime, record, exc)
        return _finish_failed(store, task_id, _error("comfyui", exc.code, exc.message, exc.details))

    if isinstance(outcome, Succeeded):
        if gpu_started is not None and sampled:  # a run served from ComfyUI's cache measures nothing
            runtime.job_measured(record["workflow"], time.monotonic() - gpu_started, float(record.get("cost", 0)),
                                 record.get("checkpoint"))
        return _finish_succeeded(runtime, record, prompt_id, tracker, notes)
    if isinstance(outcome, Failed):
        return _finish_failed(store, task_id, _error(
            "comfyui", "execution_error",
            f"{outcome.node_type or 'node'} {outcome.node_id}: {outcome.exception_type}: "
            f"{(outcome.exception_message or '').strip()}",
            outcome.payload()))
    # Interrupted: by our own cancel, or by someone else's global interrupt on that ComfyUI.
    if (store.get(task_id) or {}).get("cancel_requested"):
        return _finish_cancelled(task, store, task_id)
    return _finish_failed(store, task_id, _error(
        "comfyui", "interrupted", "ComfyUI interrupted the prompt (not cancelled through this service)",
        {"prompt_id": prompt_id}))


def _retry_elsewhere(runtime, record: dict, exc: ComfyError) -> dict:
    """ComfyUI went away under the job (unreachable, or restarted and lost the prompt)."""
    entry = {"code": exc.code, "gpu": runtime.queue, "message": exc.message}
    attempts = int(record["attempts"])
    if attempts >= runtime.settings.max_attempts:
        attempt_log = [*(record.get("attempt_log") or []), {**entry, "at": now_iso()}]
        gpus = ", ".join(f"{a.get('gpu')} ({a.get('code')})" for a in attempt_log)
        return _finish_failed(runtime.store, record["task_id"], _error(
            "comfyui", exc.code, f"ComfyUI failed the job on each of its {attempts} attempts: {gpus}",
            {"attempts": attempt_log}), attempt_log=attempt_log)
    log.warning("task %s: ComfyUI at %s lost it (%s); moving it", record["task_id"], runtime.settings.comfyui_url,
                exc.code)
    requeue(runtime.store, runtime.registry, app, record, from_status=RUNNING, reason=entry, avoid=runtime.queue,
            owner=runtime.instance)
    raise Ignore()


def _finish_succeeded(runtime, record: dict, prompt_id: str, tracker: ProgressTracker, notes: JobEvents) -> dict:
    task_id = record["task_id"]
    images, files = [], []
    try:
        outputs = runtime.client.outputs(prompt_id)
    except ComfyError as exc:
        if exc.retryable:
            return _retry_elsewhere(runtime, record, exc)
        return _finish_failed(runtime.store, task_id, _error("comfyui", exc.code, exc.message, exc.details))
    current = runtime.store.get(task_id) or {}
    if current.get("status") != RUNNING or current.get("worker") != runtime.instance:
        # Another run of this job owns it now (at-least-once delivery): one result set only.
        log.warning("task %s finished here but is %s elsewhere; result dropped", task_id, current.get("status"))
        raise Ignore()
    for index, out in enumerate(outputs):
        key = make_key(task_id, index, out.content_type, attempt=int(record["attempts"]))
        runtime.storage.put(key, out.data, out.content_type)
        item = {"key": key, "content_type": out.content_type, "size": len(out.data), "node": out.node_id,
                "filename": out.filename}
        if out.content_type.startswith("image/"):
            item["width"], item["height"] = _image_size(out.data)
            images.append(item)
            # Stored: servable now, so the output event's URL works before the job's final event.
            runtime.store.transition(task_id, allowed=(RUNNING,), owner=runtime.instance,
                                     result={"images": images, "files": files})
            notes.output(len(images) - 1, item)
        else:
            files.append(item)
    applied, before = runtime.store.transition(
        task_id, allowed=(RUNNING,), status=SUCCEEDED, owner=runtime.instance, finished_at=now_iso(),
        result={"images": images, "files": files}, progress=tracker.finished().as_dict())
    if not applied:
        # Another run of this job already finished it (at-least-once delivery): one result set.
        log.warning("task %s finished on ComfyUI but its record is already %s; result dropped", task_id, before)
    else:
        log.info("task %s succeeded: %d image(s), %d other file(s)", task_id, len(images), len(files))
    return {"task_id": task_id, "status": SUCCEEDED if applied else before, "images": len(images)}


def _finish_failed(store, task_id: str, error: dict, **fields) -> dict:
    applied, before = store.transition(task_id, allowed=(RUNNING,), status=FAILED, owner=get_runtime().instance,
                                       finished_at=now_iso(), error=error, **fields)
    if not applied:  # failover gave the job to another run: its outcome is not ours to write
        log.info("task %s: outcome %s not recorded, the job is %s elsewhere", task_id, error["code"], before)
        raise Ignore()
    log.warning("task %s failed: %s: %s", task_id, error["code"], error["message"])
    raise JobFailed(f"{error['source']}:{error['code']}: {error['message']}")


def _finish_cancelled(task, store, task_id: str) -> dict:
    applied, _ = store.transition(task_id, allowed=(RUNNING,), status=CANCELLED, owner=get_runtime().instance,
                                  finished_at=now_iso())
    if applied:
        task.update_state(state="REVOKED", meta={"task_id": task_id, "reason": "cancelled"})
    raise Ignore()
