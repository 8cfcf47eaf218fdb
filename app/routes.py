"""HTTP routes under /api/v1, plus /healthz and /readyz."""
from __future__ import annotations

import re
import time
import uuid

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError

from app.errors import ServiceError, field_errors
from app.task_view import API, task_document
from common.task_store import CANCELLED, QUEUED, RUNNING, TERMINAL, now_iso
from common.dispatch import JobSpec, choose
from common.jobs import send
from workflows.render import render, resolve_seed

api = Blueprint("api", __name__)
probes = Blueprint("probes", __name__)

DEFAULT_WORKFLOW = "storydiffusion"
# Fields of the body that steer the service rather than the workflow.
PIN_FIELDS = ("gpu", "host")
PIN_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
CANCEL_WAIT_SECONDS = 3.0


def services():
    return current_app.extensions["comfy"]


def _json_body() -> dict:
    if request.mimetype != "application/json":
        raise ServiceError(415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)",
                           {"content_type": request.content_type})
    body = request.get_json(silent=True)
    if body is None:
        raise ServiceError(400, "invalid_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        raise ServiceError(400, "invalid_body", "the body must be a JSON object")
    return body


def _valid_task_id(task_id: str) -> str:
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise ServiceError(404, "task_not_found", "no task with this id", {"task_id": task_id}) from None


def _document(task_id: str) -> dict:
    svc = services()
    record, progress = svc.read_task(task_id)
    if record is None:
        raise ServiceError(404, "task_not_found", "no task with this id", {"task_id": task_id})
    position = svc.store.queue_position(record["queue"], task_id) if record["status"] == QUEUED else None
    return task_document(record, progress, position, svc.settings.public_url)


@api.post("/generate")
def generate():
    svc = services()
    body = _json_body()
    name = body.pop("workflow", DEFAULT_WORKFLOW)
    pin = {key: body.pop(key) for key in PIN_FIELDS if key in body}
    if not isinstance(name, str) or name not in svc.catalog:
        raise ServiceError(422, "unknown_workflow", f"no workflow named {name!r}",
                           {"field": "workflow", "available": sorted(svc.catalog)})
    for key, value in pin.items():
        if not isinstance(value, str) or not PIN_PATTERN.match(value):
            raise ServiceError(422, "invalid_parameters", f"{key}: must be a GPU queue or host name",
                               {"errors": [{"field": key, "message": "must match " + PIN_PATTERN.pattern,
                                            "type": "pattern"}]})
    workflow = svc.catalog[name]
    try:
        params = resolve_seed(workflow.parse(body))
    except ValidationError as exc:
        errors = field_errors(exc)
        raise ServiceError(422, "invalid_parameters", f"{errors[0]['field']}: {errors[0]['message']}",
                           {"workflow": name, "errors": errors}) from None
    task_id = str(uuid.uuid4())
    rendered = render(workflow, params, output_prefix=f"cs_{task_id}")

    job = JobSpec(workflow=name, cost=rendered.cost, checkpoint=rendered.checkpoint, **pin)
    queue = choose(svc.registry.alive(), job)
    if queue is None:
        code, message = ("gpu_unavailable", f"no healthy GPU matches {pin}") if pin else (
            "no_worker", "no healthy GPU worker is available for this workflow")
        raise ServiceError(503, code, message, {"workflow": name, **pin}, headers={"Retry-After": "5"})
    record = {
        "task_id": task_id, "status": QUEUED, "workflow": name, "queue": queue, "params": rendered.params,
        "created_at": now_iso(), "created_ms": int(time.time() * 1000),
        "expected_images": rendered.expected_images, "cancel_requested": False,
        "cost": rendered.cost, "checkpoint": rendered.checkpoint, "pin": pin, "attempts": 0, "attempt_log": [],
    }
    svc.store.create(record, payload={"graph": rendered.api, "ui": rendered.ui,
                                             "progress_repeats": rendered.progress_repeats})
    send(svc.celery, task_id, queue, record)
    response = jsonify(_document(task_id))
    response.status_code = 202
    response.headers["Location"] = f"{API}/tasks/{task_id}"
    return response


@api.get("/tasks/<task_id>")
def get_task(task_id: str):
    return jsonify(_document(_valid_task_id(task_id)))


@api.delete("/tasks/<task_id>")
def cancel_task(task_id: str):
    svc = services()
    task_id = _valid_task_id(task_id)
    record = svc.store.get(task_id)
    if record is None:
        raise ServiceError(404, "task_not_found", "no task with this id", {"task_id": task_id})
    if record["status"] in TERMINAL:
        raise ServiceError(409, "task_finished", f"the task already ended: {record['status']}",
                           {"task_id": task_id, "status": record["status"]})
    if record["status"] == QUEUED:
        # Still in Celery: mark it cancelled; the worker that takes the message drops it unrun.
        applied, _ = svc.store.transition(task_id, allowed=(QUEUED,), status=CANCELLED, finished_at=now_iso(),
                                          cancel_requested=True)
        if applied:
            return jsonify(_document(task_id))
    # Submitted to ComfyUI: its worker deletes it from ComfyUI's queue or interrupts it.
    svc.store.request_cancel(task_id)
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while time.monotonic() < deadline:
        record = svc.store.get(task_id)
        if record and record["status"] in TERMINAL:
            break
        time.sleep(0.01)
    document = _document(task_id)
    response = jsonify(document)
    response.status_code = 200 if document["status"] in TERMINAL else 202
    return response


@api.get("/tasks/<task_id>/images/<int:index>")
def get_image(task_id: str, index: int):
    svc = services()
    task_id = _valid_task_id(task_id)
    record = svc.store.get(task_id)
    if record is None:
        raise ServiceError(404, "task_not_found", "no task with this id", {"task_id": task_id})
    images = (record.get("result") or {}).get("images", [])
    if not 0 <= index < len(images):
        raise ServiceError(404, "image_not_found", f"the task has {len(images)} image(s)",
                           {"task_id": task_id, "status": record["status"], "index": index})
    image = images[index]
    data = svc.storage.get(image["key"])
    if data is None:
        raise ServiceError(410, "image_gone", "the image is no longer in storage", {"task_id": task_id})
    return Response(data, mimetype=image["content_type"],
                    headers={"Cache-Control": "private, max-age=86400",
                             "Content-Disposition": f'inline; filename="{task_id}-{index}.png"'})


@api.get("/workflows")
def list_workflows():
    return jsonify({"workflows": [
        {"name": w.name, "title": w.title, "description": w.description, "default": w.name == DEFAULT_WORKFLOW,
         "parameters": w.json_schema()}
        for w in services().catalog.values()
    ]})


@api.get("/workers")
def list_workers():
    return jsonify({"workers": sorted(services().registry.alive(), key=lambda w: w["queue"])})


@probes.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@probes.get("/readyz")
def readyz():
    svc = services()
    svc.redis.ping()
    workers = svc.registry.alive()
    healthy = [w for w in workers if w.get("comfyui_ok")]
    if not healthy:
        reason = "no worker is alive" if not workers else "no worker's ComfyUI answers"
        raise ServiceError(503, "not_ready", reason, {"workers": len(workers)})
    return jsonify({"status": "ready", "workers": len(workers), "healthy": len(healthy)})
