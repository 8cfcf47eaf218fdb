"""The GPU job: run one rendered workflow on this worker's ComfyUI and record the outcome.

The task renders nothing. It takes the job (`hand`: the record's transition returns the
graphs the API rendered), submits them, and moves the record as ComfyUI moves the prompt:
`start` on ComfyUI's execution_start (until then the job is `queued`, waiting inside ComfyUI),
`progress` (throttled), one `output` per stored file, then `succeed`, `fail` or `cancel_run`
(common/lifecycle.py declares each). The task record and its event log are the one home of
a job's state; Flower sees Celery's own task events. A ComfyUI lost mid-job sends the job to
another GPU.
"""
from __future__ import annotations

import io
import logging
import time
import uuid
from types import SimpleNamespace

import redis

from celery import signals
from celery.exceptions import Ignore
from loguru import logger

from common import keys, metrics
from common.jobs import requeue
from common.lifecycle import State
from common.logs import setup_logging
from common.settings import get_settings
from common.storage import make_key
from common.task_store import now_iso
from common.task_view import image_url
from workers.celery_app import RUN_WORKFLOW, app
from workers.comfy_client import (
    Cached, ComfyClient, ComfyError, ComfyWaitTimeout, Executing, Failed, Interrupted, Progress, Started, Succeeded,
)
from workers.joblogs import get_job_logs
from workers.progress import ProgressTracker
from workers.runtime import get_runtime

log = logging.getLogger("comfy.worker")


class Job:
    """One job this worker has taken: its record as the hand-over returned it, and every
    transition it makes from here (each one Redis call), with the webhooks the caller asked
    for (progress no more often than WEBHOOK_PROGRESS_INTERVAL)."""

    def __init__(self, runtime, record: dict):
        self.runtime, self.record = runtime, record
        self.task_id, self.callback = record["task_id"], record.get("callback")
        self.last_hook = float("-inf")
        self.started_ms: int | None = None
        self.finished_ms: int | None = None

    def step(self, name: str, *, fields: dict | None = None, event: dict | None = None,
             metric_ops=()) -> tuple[str, str, dict]:
        """One transition of this job, as `TaskStore.apply_in_turn` takes it."""
        return name, self.task_id, dict(queue=self.runtime.queue, owner=self.record.get("owner", "anonymous"),
                                        instance=self.runtime.instance, fields=fields, event=event,
                                        metric_ops=list(metric_ops))

    def apply(self, name: str, *, fields: dict | None = None, event: dict | None = None, metric_ops=()):
        name, task_id, call = self.step(name, fields=fields, event=event, metric_ops=metric_ops)
        return self.runtime.store.apply(name, task_id, **call)

    def start(self, comfy_ms: int | None = None):
        self.started_ms = int(time.time() * 1000)
        return self.apply("start", fields={"started_at": now_iso(), "comfy_started_ms": comfy_ms or self.started_ms},
                          event={"queue": self.runtime.queue, "gpu": self.runtime.queue})

    def progress(self, progress: dict) -> None:
        try:  # progress is not worth waiting for Redis: the next update replaces it
            done = self.runtime.store.apply(
                "progress", self.task_id, queue=self.runtime.queue, owner=self.record.get("owner", "anonymous"),
                instance=self.runtime.instance, fields={"progress": progress}, event=progress, wait_out_outage=False)
        except redis.RedisError as exc:
            log.warning("task %s: progress not recorded (Redis: %s)", self.task_id, exc)
            return
        now = time.monotonic()
        if done and self.callback and now - self.last_hook >= self.runtime.settings.webhook_progress_interval:
            self.last_hook = now
            self._hook("progress", {"task_id": self.task_id, **progress}, done.event_id)

    def output(self, index: int, item: dict, result: dict) -> bool:
        step, data = self._output_step(index, item, result)
        return self._output_recorded(self.runtime.store.apply(step[0], step[1], **step[2]), data)

    def output_and_succeed(self, index: int, item: dict, so_far: dict, **fields) -> tuple[bool, object]:
        """The last output (`so_far`: the result so far), then `succeed` with `fields`, in one
        round trip; each applies as on its own: the output refused means the job is not ours,
        and then `succeed` is refused as well."""
        step, data = self._output_step(index, item, so_far)
        stored, done = self.runtime.store.apply_in_turn(
            [step, self._finish_step("succeed", "succeeded", **fields)],
            then=lambda i, outcome: i == 0 and self._output_recorded(outcome, data))  # its webhook first
        return stored.applied, done

    def _output_step(self, index: int, item: dict, result: dict) -> tuple[tuple, dict]:
        data = {"index": index, "url": image_url(self.task_id, index, self.runtime.settings.public_url),
                "content_type": item["content_type"], "width": item.get("width"), "height": item.get("height"),
                "size": item["size"]}
        # Stored first: servable now, so the output event's URL works before the job's final event.
        return self.step("output", fields={"result": result}, event=data), data

    def _output_recorded(self, done, data: dict) -> bool:
        if done:
            self._hook("output", {"task_id": self.task_id, **data}, done.event_id)
        return done.applied

    def finish(self, name: str, status: str, error: dict | None = None, **fields):
        name, task_id, call = self._finish_step(name, status, error, **fields)
        return self.runtime.store.apply(name, task_id, **call)

    def _finish_step(self, name: str, status: str, error: dict | None = None, **fields) -> tuple[str, str, dict]:
        ops = metrics.finished_ops(self.record, status, error, started_ms=self.started_ms,
                                   finished_ms=self.finished_ms)
        fields = {"finished_at": now_iso(), **({"error": error} if error else {}), **fields}
        if self.finished_ms:
            fields["comfy_finished_ms"] = self.finished_ms
        return self.step(name, fields=fields, event={"queue": self.runtime.queue}, metric_ops=ops)

    def _hook(self, kind: str, data: dict, event_id: str | None) -> None:
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
    # First heartbeat as the consumer starts, with ComfyUI asked first (it says whether this GPU
    # can take jobs): before it, dispatch does not know this GPU; a job started just before it is
    # covered by the monitor's grace period.
    runtime.probe_comfyui()
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
    # The queue this message came from: our own, or another GPU's that an operator told this
    # worker to consume (`celery control add_consumer`) to drain it.
    source = (self.request.delivery_info or {}).get("routing_key") or runtime.queue
    prompt_id = str(uuid.uuid4())  # chosen here, so the record names the prompt before ComfyUI has it
    runtime.job_started(task_id)
    try:
        taken = runtime.store.apply(
            "hand", task_id, queue=source, to_queue=runtime.queue, instance=runtime.instance, fields={
                "gpu": runtime.queue, "comfyui": runtime.settings.comfyui_url, "worker": runtime.instance,
                "prompt_id": prompt_id, "handed_at": now_iso(), "progress": None, "waiting_reason": None},
            event={"queue": runtime.queue, "gpu": runtime.queue},
            metric_ops=[("hincrby", keys.task(task_id), "attempts", 1)], want_record=True)
        if not taken:
            # Cancelled while waiting in Celery (it never reaches a GPU), moved to another GPU,
            # taken by another worker (a redelivery), or done: nothing to do.
            log.info("task %s not taken here: %s", task_id, taken.before or "no record")
            raise Ignore()
        job = Job(runtime, taken.record)
        log.info("task %s handed to %s (attempt %d)", task_id, runtime.queue, int(taken.record.get("attempts", 1)))
        if taken.payload is None:
            return _finish_failed(job, _error("service", "payload_missing",
                                              "the job's workflow expired from Redis before it ran"))
        with logger.contextualize(prompt_id=prompt_id):
            return _run_prompt(runtime, job, taken.payload, prompt_id)
    finally:
        get_job_logs().run_ended(task_id)
        runtime.job_ended(task_id)


def _run_prompt(runtime, job: Job, payload: dict, prompt_id: str) -> dict:
    client, settings = runtime.client, runtime.settings
    task_id, graph = job.task_id, payload["graph"]
    job_logs = get_job_logs()
    extra = {"extra_pnginfo": {"workflow": payload["ui"]}} if payload.get("ui") else None
    tracker = ProgressTracker(graph, payload.get("progress_repeats"))
    last_sent, gpu_started, sampled, outcome = 0.0, None, False, None
    try:
        job_logs.submitting(task_id, prompt_id)  # before the POST: ComfyUI logs "got prompt" before answering
        client.submit(graph, prompt_id=prompt_id, extra_data=extra)
        runtime.job_submitted(task_id, prompt_id)  # a cancel that came meanwhile goes to ComfyUI now
        for event in client.events(prompt_id, timeout=settings.job_timeout):
            progress = None
            if isinstance(event, Started):
                job_logs.started(task_id)
                gpu_started = time.monotonic()
                _started(runtime, job)
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
                job.finished_ms = int(time.time() * 1000)
            if progress is not None and job.started_ms and time.monotonic() - last_sent >= settings.progress_interval \
                    and not client.ended(prompt_id):  # the outcome already waits: record it first
                last_sent = time.monotonic()
                job.progress(progress.as_dict())
    except ComfyWaitTimeout:
        runtime.cancel_local(task_id)  # do not leave it running on the GPU
        return _finish_failed(job, _error(
            "service", "job_timeout", f"the job ran longer than JOB_TIMEOUT ({settings.job_timeout:g} s) and was stopped",
            {"prompt_id": prompt_id}))
    except ComfyError as exc:
        if _cancel_asked(runtime, task_id):
            return _finish_cancelled(job)  # e.g. deleted from ComfyUI's queue by our cancel
        if exc.retryable:
            return _retry_elsewhere(runtime, job, exc)
        return _finish_failed(job, _error("comfyui", exc.code, exc.message, exc.details))

    if isinstance(outcome, Succeeded):
        if job.started_ms is None:  # settled from /history after a dropped socket: it did start
            _started(runtime, job)
        if gpu_started is not None and sampled:  # a run served from ComfyUI's cache measures nothing
            runtime.job_measured(job.record["workflow"], time.monotonic() - gpu_started,
                                 float(job.record.get("cost", 0)), job.record.get("checkpoint"))
        return _finish_succeeded(runtime, job, prompt_id, tracker, listed=outcome.outputs)
    if isinstance(outcome, Failed):
        return _finish_failed(job, _error(
            "comfyui", "execution_error",
            f"{outcome.node_type or 'node'} {outcome.node_id}: {outcome.exception_type}: "
            f"{(outcome.exception_message or '').strip()}",
            outcome.payload()))
    # Interrupted: by our own cancel, or by someone else's global interrupt on that ComfyUI.
    if _cancel_asked(runtime, task_id):
        return _finish_cancelled(job)
    return _finish_failed(job, _error(
        "comfyui", "interrupted", "ComfyUI interrupted the prompt (not cancelled through this service)",
        {"prompt_id": prompt_id}))


def _started(runtime, job: Job) -> None:
    """ComfyUI began executing the prompt: the job is `running` from now (not before)."""
    started = job.start()
    if started:
        log.info("task %s running on %s (attempt %d)", job.task_id, runtime.queue, int(job.record.get("attempts", 1)))
    if started.cancel_requested:
        runtime.cancel_local(job.task_id)
    if not started and started.before != State.RUNNING:
        # The job is not ours any more (moved by failover while this worker looked dead, or
        # cancelled): stop the prompt, record nothing.
        runtime.cancel_local(job.task_id)
        log.warning("task %s started in ComfyUI but is %s here; stopped", job.task_id, started.before)
        raise Ignore()


def _cancel_asked(runtime, task_id: str) -> bool:
    return runtime.cancel_was_sent(task_id) or bool((runtime.store.get(task_id) or {}).get("cancel_requested"))


def _retry_elsewhere(runtime, job: Job, exc: ComfyError) -> dict:
    """ComfyUI went away under the job (unreachable, or restarted and lost the prompt)."""
    record = job.record
    entry = {"code": exc.code, "gpu": runtime.queue, "message": exc.message}
    attempts = int(record.get("attempts", 1))
    if attempts >= runtime.settings.max_attempts:
        attempt_log = [*(record.get("attempt_log") or []), {**entry, "at": now_iso()}]
        gpus = ", ".join(f"{a.get('gpu')} ({a.get('code')})" for a in attempt_log)
        return _finish_failed(job, _error(
            "comfyui", exc.code, f"ComfyUI failed the job on each of its {attempts} attempts: {gpus}",
            {"attempts": attempt_log}), attempt_log=attempt_log)
    log.warning("task %s: ComfyUI at %s lost it (%s); moving it", job.task_id, runtime.settings.comfyui_url, exc.code)
    requeue(runtime.store, runtime.registry, app, {**record, "queue": runtime.queue}, reason=entry,
            avoid=runtime.queue, instance=runtime.instance)
    raise Ignore()


def _finish_succeeded(runtime, job: Job, prompt_id: str, tracker: ProgressTracker,
                      listed: dict | None = None) -> dict:
    task_id = job.task_id
    images, files = [], []
    try:  # the files the stream listed (no /history round trip), else those in /history
        outputs = runtime.client.outputs(prompt_id, listed=listed)
    except ComfyError as exc:
        if exc.retryable:
            return _retry_elsewhere(runtime, job, exc)
        return _finish_failed(job, _error("comfyui", exc.code, exc.message, exc.details))
    # The last image's `output` goes with `succeed`, in one round trip.
    last_image = max((i for i, out in enumerate(outputs) if out.content_type.startswith("image/")), default=None)
    for index, out in enumerate(outputs):
        key = make_key(task_id, index, out.content_type, attempt=int(job.record.get("attempts", 1)))
        runtime.storage.put(key, out.data, out.content_type)
        item = {"key": key, "content_type": out.content_type, "size": len(out.data), "node": out.node_id,
                "filename": out.filename}
        if out.content_type.startswith("image/"):
            item["width"], item["height"] = _image_size(out.data)
            images.append(item)
            if index != last_image and not job.output(len(images) - 1, item, {"images": images, "files": files}):
                _not_ours(task_id)
        else:
            files.append(item)
    result = {"images": images, "files": files}
    final = {"result": result, "progress": tracker.finished().as_dict()}
    if last_image is None:
        done = job.finish("succeed", "succeeded", **final)
    else:
        stored, done = job.output_and_succeed(len(images) - 1, images[-1], result, **final)
        if not stored:
            _not_ours(task_id)
    if not done:
        # Another run of this job already finished it (at-least-once delivery): one result set.
        log.warning("task %s finished on ComfyUI but its record is already %s; result dropped", task_id, done.before)
    else:
        log.info("task %s succeeded: %d image(s), %d other file(s)", task_id, len(images), len(files))
    return {"task_id": task_id, "status": "succeeded" if done else str(done.before), "images": len(images)}


def _not_ours(task_id: str):
    # Another run of this job owns it now (at-least-once delivery): one result set only.
    log.warning("task %s finished here but is no longer ours; result dropped", task_id)
    raise Ignore()


def _finish_failed(job: Job, error: dict, **fields) -> dict:
    done = job.finish("fail", "failed", error, **fields)
    if not done:  # failover gave the job to another run: its outcome is not ours to write
        log.info("task %s: outcome %s not recorded, the job is %s elsewhere", job.task_id, error["code"], done.before)
        raise Ignore()
    log.warning("task %s failed: %s: %s", job.task_id, error["code"], error["message"])
    raise JobFailed(f"{error['source']}:{error['code']}: {error['message']}")


def _finish_cancelled(job: Job) -> dict:
    job.finish("cancel_run", "cancelled")
    raise Ignore()


def collect(runtime, record: dict) -> str:
    """Finish a job whose prompt ComfyUI completed while no worker followed it (its worker died
    or dropped it; common/reconcile.py): its outputs are collected and stored as the worker would
    have, on behalf of the worker that took it. No second run."""
    with ComfyClient(record["comfyui"], timeout=runtime.settings.comfyui_timeout) as client:
        acting = SimpleNamespace(store=runtime.store, queue=record["queue"], instance=record.get("worker"),
                                 settings=runtime.settings, notifier=runtime.notifier, client=client,
                                 storage=runtime.storage, registry=runtime.registry)
        job = Job(acting, record)
        try:
            if record.get("state") == str(State.HANDED) and not job.start():
                return "not ours"
            result = _finish_succeeded(acting, job, record["prompt_id"], ProgressTracker({}))
        except (Ignore, JobFailed) as exc:
            return f"not collected: {type(exc).__name__}"
    return str(result.get("status"))
