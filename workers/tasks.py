"""The GPU job: run one rendered workflow on this worker's ComfyUI and record the outcome.

The task renders nothing: it receives the API-format graph (and the editor graph to embed
in the PNGs), submits it, turns ComfyUI's events into throttled progress, stores every
output file, and writes the final record. The task record in Redis is the truth callers
see; the Celery state mirrors it for Flower.
"""
from __future__ import annotations

import io
import logging
import time
import uuid

from celery import signals
from celery.exceptions import Ignore

from common.storage import make_key
from common.task_store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, now_iso
from workers.celery_app import RUN_WORKFLOW, app
from workers.comfy_client import (
    Cached, ComfyError, ComfyValidationError, Executing, Failed, Interrupted, Progress, Succeeded,
)
from workers.progress import ProgressTracker
from workers.runtime import get_runtime

log = logging.getLogger("comfy.worker")


class JobFailed(Exception):
    """Raised after a failed job is recorded, so Celery and Flower show it as a failure."""


@signals.worker_ready.connect
def _start_background(sender=None, **_):
    runtime = get_runtime()
    consumed = [q.name for q in getattr(sender, "task_consumer", None).queues] if sender else []
    gpu_queues = [q for q in consumed if q.startswith("gpu.")]
    if gpu_queues and not runtime.settings.gpu_queue:
        runtime.queue = gpu_queues[0]
    runtime.start_background()
    log.info("worker ready: queue %s, ComfyUI %s", runtime.queue, runtime.settings.comfyui_url)


@signals.worker_shutdown.connect
def _stop_background(**_):
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
def run_workflow(self, task_id: str, graph: dict, ui: dict | None = None) -> dict:
    runtime = get_runtime()
    store = runtime.store
    applied, before = store.transition(
        task_id, allowed=(QUEUED,), dequeue=True, queue=runtime.queue,
        status=RUNNING, started_at=now_iso(), gpu=runtime.queue, comfyui=runtime.settings.comfyui_url,
    )
    if not applied:
        # Cancelled while waiting in Celery (it never reaches the GPU), or already done.
        log.info("task %s not started: it is %s", task_id, before)
        raise Ignore()
    runtime.job_started(task_id)
    try:
        return _run(self, runtime, task_id, graph, ui)
    finally:
        runtime.job_ended(task_id)


def _run(task, runtime, task_id: str, graph: dict, ui: dict | None) -> dict:
    store, client, settings = runtime.store, runtime.client, runtime.settings
    prompt_id = str(uuid.uuid4())
    store.update(task_id, prompt_id=prompt_id)
    extra = {"extra_pnginfo": {"workflow": ui}} if ui else None
    try:
        client.submit(graph, prompt_id=prompt_id, extra_data=extra)
    except ComfyValidationError as exc:
        return _finish_failed(task, store, task_id, _error("comfyui", exc.code, exc.message, exc.details))
    except ComfyError as exc:
        return _finish_failed(task, store, task_id, _error("comfyui", exc.code, exc.message, exc.details))
    runtime.job_submitted(task_id, prompt_id)
    record = store.get(task_id) or {}
    if record.get("cancel_requested"):
        runtime.cancel_local(task_id)

    tracker = ProgressTracker(graph)
    last_sent = 0.0
    outcome = None
    try:
        for event in client.events(prompt_id, timeout=settings.job_timeout):
            progress = None
            if isinstance(event, Cached):
                progress = tracker.cached(event.nodes)
            elif isinstance(event, Executing):
                progress = tracker.executing(event.node)
            elif isinstance(event, Progress) and event.node is not None:
                progress = tracker.step(event.node, event.value, event.max)
            elif isinstance(event, (Succeeded, Failed, Interrupted)):
                outcome = event
            if progress is not None and time.monotonic() - last_sent >= settings.progress_interval:
                last_sent = time.monotonic()
                task.update_state(state="PROGRESS", meta={"task_id": task_id, "progress": progress.as_dict()})
    except ComfyError as exc:
        if (store.get(task_id) or {}).get("cancel_requested"):
            return _finish_cancelled(task, store, task_id)  # e.g. deleted from ComfyUI's queue by our cancel
        return _finish_failed(task, store, task_id, _error("comfyui", exc.code, exc.message, exc.details))

    if isinstance(outcome, Succeeded):
        return _finish_succeeded(task, runtime, task_id, prompt_id, tracker)
    if isinstance(outcome, Failed):
        return _finish_failed(task, store, task_id, _error(
            "comfyui", "execution_error",
            f"{outcome.node_type or 'node'} {outcome.node_id}: {outcome.exception_type}: "
            f"{(outcome.exception_message or '').strip()}",
            outcome.payload()))
    # Interrupted: by our own cancel, or by someone else's global interrupt on that ComfyUI.
    record = store.get(task_id) or {}
    if record.get("cancel_requested"):
        return _finish_cancelled(task, store, task_id)
    return _finish_failed(task, store, task_id, _error(
        "comfyui", "interrupted", "ComfyUI interrupted the prompt (not cancelled through this service)",
        {"prompt_id": prompt_id}))


def _finish_succeeded(task, runtime, task_id: str, prompt_id: str, tracker: ProgressTracker) -> dict:
    images, files = [], []
    try:
        outputs = runtime.client.outputs(prompt_id)
    except ComfyError as exc:
        return _finish_failed(task, runtime.store, task_id, _error("comfyui", exc.code, exc.message, exc.details))
    for index, out in enumerate(outputs):
        key = make_key(task_id, index, out.content_type)
        runtime.storage.put(key, out.data, out.content_type)
        item = {"key": key, "content_type": out.content_type, "size": len(out.data), "node": out.node_id,
                "filename": out.filename}
        if out.content_type.startswith("image/"):
            item["width"], item["height"] = _image_size(out.data)
            images.append(item)
        else:
            files.append(item)
    result = {"images": images, "files": files}
    applied, before = runtime.store.transition(
        task_id, allowed=(RUNNING,), status=SUCCEEDED, finished_at=now_iso(), result=result,
        progress=tracker.finished().as_dict())
    if not applied:
        log.warning("task %s finished on ComfyUI but its record is already %s; result kept out", task_id, before)
    return {"task_id": task_id, "status": SUCCEEDED if applied else before, "images": len(images)}


def _finish_failed(task, store, task_id: str, error: dict) -> dict:
    store.transition(task_id, allowed=(RUNNING,), status=FAILED, finished_at=now_iso(), error=error)
    log.warning("task %s failed: %s: %s", task_id, error["code"], error["message"])
    raise JobFailed(f"{error['source']}:{error['code']}: {error['message']}")


def _finish_cancelled(task, store, task_id: str) -> dict:
    store.transition(task_id, allowed=(RUNNING,), status=CANCELLED, finished_at=now_iso())
    task.update_state(state="REVOKED", meta={"task_id": task_id, "reason": "cancelled"})
    raise Ignore()
