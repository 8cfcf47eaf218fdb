"""HTTP routes under /api/v1, plus /healthz and /readyz."""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError

from app.errors import ServiceError, field_errors
from app.security import current_caller, load_task, owns, task_not_found, valid_task_id
from common.task_view import API, task_document
from common.task_store import QUEUED, TERMINAL, is_outage, now_iso
from common.dispatch import JobSpec, choose, healthy, known_checkpoints, waiting_queue
from common import producer
from common import keys, metrics, webhooks
from workflows import raw
from workflows.render import payload_dictionary, render, resolve_seed

api = Blueprint("api", __name__)
probes = Blueprint("probes", __name__)

DEFAULT_WORKFLOW = "storydiffusion"
# Fields of the body that steer the service rather than the workflow.
PIN_FIELDS = ("gpu", "host")
PIN_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
CANCEL_WAIT_SECONDS = 3.0
KNOWN_FLEET_MAX_AGE = 2.0  # seconds a process reuses its reading of the GPUs the fleet has had
# Idempotency-Key: 1-255 printable ASCII characters, remembered per owner for 24 hours.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}$")
IDEMPOTENCY_TTL = 24 * 3600
MAX_JSON_DEPTH = 32
TOO_MANY_JOBS_RETRY_AFTER = "10"


def services():
    return current_app.extensions["comfy"]




def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key[:64]!r}")
        obj[key] = value
    return obj


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _json_body() -> dict:
    """The body as a JSON object: strict JSON (no NaN/Infinity, no duplicate keys, UTF-8,
    nesting bounded), else a 4xx that says why."""
    if request.mimetype != "application/json":
        raise ServiceError(415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)",
                           {"content_type": (request.content_type or "")[:200]})
    try:
        body = json.loads(request.get_data(cache=True).decode("utf-8"), parse_constant=_no_constants,
                          object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON: {reason}") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise ServiceError(400, "invalid_json", f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(body, dict):
        raise ServiceError(400, "invalid_body", "the body must be a JSON object")
    return body


def _document(task_id: str, record: dict | None = None) -> dict:
    svc = services()
    record = record or svc.store.get(task_id)
    if record is None:
        raise task_not_found(task_id)
    position = svc.store.queue_position(record["queue"], task_id) if record["status"] == QUEUED else None
    return task_document(record, position, svc.settings.public_url)


def _accepted(task_id: str, replayed: bool = False, document: dict | None = None):
    response = jsonify(document or _document(task_id))
    response.status_code = 202
    response.headers["Location"] = f"{API}/tasks/{task_id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _idempotency_key(owner: str) -> str | None:
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    if not IDEMPOTENCY_PATTERN.match(value) or not value.strip():
        raise ServiceError(400, "invalid_idempotency_key",
                           f"{IDEMPOTENCY_HEADER} must be 1 … 255 printable ASCII characters",
                           {"field": IDEMPOTENCY_HEADER})
    return keys.idempotency(owner, hashlib.sha256(value.encode()).hexdigest())


def _replay(stored: str | bytes, fingerprint: str):
    """The first task of an Idempotency-Key (None when it expired), or 422 for another body."""
    first = json.loads(stored)
    if first.get("fingerprint") != fingerprint:
        raise ServiceError(422, "idempotency_key_reused",
                           f"this {IDEMPOTENCY_HEADER} was used for a different request body",
                           {"field": IDEMPOTENCY_HEADER, "task_id": first.get("task_id")})
    if services().store.get(first["task_id"]) is None:
        return None
    return _accepted(first["task_id"], replayed=True)


def _render_raw(body: dict, task_id: str):
    settings = services().settings
    if not settings.allow_raw_workflows:
        raise ServiceError(403, "raw_workflows_disabled",
                           "raw workflows are disabled on this service; use a named workflow",
                           {"field": "workflow", "available": sorted(services().catalog)})
    unknown = sorted(set(body) - {"graph"})
    if unknown or "graph" not in body:
        field, message = (unknown[0][:64], "unknown field") if unknown else ("graph", "required")
        raise ServiceError(422, "invalid_parameters", f"{field}: {message}", {
            "workflow": raw.NAME, "errors": [{"field": field, "message": message, "type": "extra" if unknown
                                              else "missing"}]})
    try:
        graph = raw.validate(body["graph"], raw.parse_allowlist(settings.raw_node_allowlist))
    except raw.GraphError as exc:
        first = exc.errors[0]
        raise ServiceError(422, exc.code, f"{first['field']}: {first['message']}",
                           {"workflow": raw.NAME, "errors": exc.errors[:50]}) from None
    return raw.render_raw(graph, output_prefix=f"cs_{task_id}")


def _callback(url, events) -> dict | None:
    """The job's webhook, if it asked for one the service may call (common/webhooks.py)."""
    if url is None:
        if events is not None:
            raise ServiceError(422, "invalid_parameters", "callback_events: needs callback_url", {
                "errors": [{"field": "callback_events", "message": "needs callback_url", "type": "dependency"}]})
        return None
    settings = services().settings
    try:
        checked = webhooks.check_callback(url, webhooks.parse_allowlist(settings.webhook_allowed_hosts),
                                          bool(settings.webhook_secret.get_secret_value().strip()))
        chosen = webhooks.check_events([] if events is None else events)
    except webhooks.CallbackRejected as exc:
        field = "callback_events" if exc.code == "invalid_callback_events" else "callback_url"
        raise ServiceError(422, exc.code, f"{field}: {exc.message}", {"field": field}) from None
    return {"url": checked, "events": chosen}


@api.post("/generate")
def generate():
    svc = services()
    owner = current_caller().name
    body = _json_body()
    idem_key = _idempotency_key(owner)
    fingerprint = None
    if idem_key:  # the body's digest tells a replay from another request with the same key
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        stored = svc.redis.get(idem_key)
        replay = _replay(stored, fingerprint) if stored else None
        if replay is not None:
            return replay
    name = body.pop("workflow", DEFAULT_WORKFLOW)
    pin = {key: body.pop(key) for key in PIN_FIELDS if key in body}
    callback = _callback(body.pop("callback_url", None), body.pop("callback_events", None))
    if not isinstance(name, str) or (name not in svc.catalog and name != raw.NAME):
        shown = name[:64] if isinstance(name, str) else type(name).__name__
        raise ServiceError(422, "unknown_workflow", f"no workflow named {shown!r}",
                           {"field": "workflow", "available": sorted(svc.catalog)})
    for key, value in pin.items():
        if not isinstance(value, str) or not PIN_PATTERN.match(value):
            raise ServiceError(422, "invalid_parameters", f"{key}: must be a GPU queue or host name",
                               {"errors": [{"field": key, "message": "must match " + PIN_PATTERN.pattern,
                                            "type": "pattern"}]})
    task_id = str(uuid.uuid4())  # random: task ids cannot be guessed
    dictionary = None
    if name == raw.NAME:
        rendered = _render_raw(body, task_id)
        payload = {"graph": rendered.api, "progress_repeats": {}}  # no editor graph for a raw one
    else:
        workflow = svc.catalog[name]
        try:
            params = resolve_seed(workflow.parse(body))
        except ValidationError as exc:
            errors = field_errors(exc)
            raise ServiceError(422, "invalid_parameters", f"{errors[0]['field']}: {errors[0]['message']}",
                               {"workflow": name, "errors": errors}) from None
        rendered = render(workflow, params, output_prefix=f"cs_{task_id}")
        payload = {"graph": rendered.api, "ui": rendered.ui, "progress_repeats": rendered.progress_repeats}
        dictionary = _dictionary(workflow)

    job = JobSpec(workflow=name, cost=rendered.cost, checkpoint=rendered.checkpoint, **pin)
    known = _check_checkpoint_known(rendered.checkpoint) if rendered.checkpoint else None
    policy = svc.settings.dispatch_policy
    turn = int(svc.redis.incr(keys.DISPATCH_TURN)) if policy == "round_robin" else 0
    queue = choose(svc.registry.alive(), job, policy=policy, turn=turn)
    waiting_reason = None
    if queue is None:
        if pin:
            _check_pin_known(pin)
        if svc.settings.wait_for_gpus:  # GPUs come and go: wait for one that fits
            queue = waiting_queue(known if known is not None else svc.registry.known(), job)
            if queue is not None:
                waiting_reason = (f"no live GPU can run it now ({_needs(job)}); it waits for {queue} or another "
                                  "GPU that fits to come up")
        if queue is None and pin:
            raise ServiceError(503, "gpu_unavailable", f"no healthy GPU matches {pin}", {"workflow": name, **pin},
                               headers={"Retry-After": "5"})
        if queue is None:
            message = (f"no healthy GPU worker with checkpoint {job.checkpoint!r} is available" if job.checkpoint
                       else "no healthy GPU worker is available for this workflow")
            raise ServiceError(503, "no_worker", message, {"workflow": name, "checkpoint": job.checkpoint},
                               headers={"Retry-After": "5"})
    # Fields at their defaults are not stored (every reader defaults them: no cancel requested, no
    # attempt yet, no pin): a finished job's record is kept for RESULT_TTL, so bytes count.
    record = {
        "task_id": task_id, "status": QUEUED, "workflow": name, "queue": queue, "params": rendered.params,
        "owner": owner, "created_at": now_iso(), "created_ms": int(time.time() * 1000),
        "expected_images": rendered.expected_images, "cost": rendered.cost, "checkpoint": rendered.checkpoint,
    }
    if pin:
        record["pin"] = pin
    if callback:
        record["callback"] = callback
    if waiting_reason:
        record["waiting_reason"] = waiting_reason
    idempotency = None
    if idem_key:
        ttl = min(IDEMPOTENCY_TTL, svc.settings.result_ttl)
        idempotency = (idem_key, json.dumps({"fingerprint": fingerprint, "task_id": task_id}), ttl)
    queued_message = producer.message(svc.celery, task_id, queue, record)
    for _ in range(2):
        try:
            created = svc.store.create(record, payload, max_active=svc.settings.max_active_jobs,
                                       max_active_per_owner=svc.settings.max_active_jobs_per_key,
                                       idempotency=idempotency, message=queued_message, dictionary=dictionary)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # The script may have run with its reply lost: the job may be queued, with its message.
            raise _queued_unknown(task_id) from None
        outcome, info = created.outcome, created.info
        if outcome != "replay":
            break
        replay = _replay(info, fingerprint)  # a concurrent request with the same key won the race
        if replay is not None:
            return replay
        svc.redis.delete(idem_key)  # the key's task expired: this request may take the key
    else:
        raise ServiceError(503, "idempotency_busy", "the Idempotency-Key is changing hands; retry",
                           {"field": IDEMPOTENCY_HEADER}, headers={"Retry-After": "1"})
    if outcome == "full":
        whose = "this API key has" if info["scope"] == "key" else "the service has"
        raise ServiceError(429, "too_many_jobs", f"{whose} {info['active']} unfinished jobs (limit {info['limit']}); "
                           "wait for some to finish or cancel some", info,
                           headers={"Retry-After": TOO_MANY_JOBS_RETRY_AFTER})
    try:
        _wait_replicated()
    except Exception as exc:
        if not isinstance(exc, NotReplicated) and not is_outage(exc):
            raise
        # The job and its message are in Redis but may not survive a failover: refuse it, failing
        # it so its message finds a final job (the worker drops it) and the caller's retry queues
        # it afresh, unless a worker has taken it already: then it runs.
        code = "not_replicated" if isinstance(exc, NotReplicated) else "broker_unavailable"
        if not _undo(task_id, queue, owner, record, idem_key, code):
            return _accepted(task_id)
        if isinstance(exc, NotReplicated):
            raise ServiceError(503, "not_replicated", str(exc), {"replicas": exc.args[1:]},
                               headers={"Retry-After": "2"}) from None
        raise
    # The record as stored (JSON values), answered without reading it back.
    stored = json.loads(json.dumps({**record, "state": "waiting", "status": QUEUED}))
    return _accepted(task_id, document=task_document(stored, info, svc.settings.public_url))


def _undo(task_id: str, queue: str, owner: str, record: dict, idem_key: str | None, code: str) -> bool:
    """Fail a job that was created but must not be accepted. False: a worker took it already."""
    svc = services()
    error = {"source": "service", "code": code, "message": "the job could not be queued", "details": {}}
    try:
        undone = svc.store.apply("fail", task_id, queue=queue, owner=owner,
                                 fields={"finished_at": now_iso(), "error": error}, event={"queue": queue},
                                 metric_ops=metrics.finished_ops(record, "failed", error))
        if not undone.applied and undone.before is not None:
            return False
        if idem_key:
            svc.redis.delete(idem_key)
    except Exception:  # noqa: BLE001 - Redis is gone: whether the job stays queued is unknown
        raise _queued_unknown(task_id) from None
    return True


def _queued_unknown(task_id: str) -> ServiceError:
    return ServiceError(503, "broker_unavailable", (
        "Redis failed while the job was being queued, and the service cannot tell whether it was: retry "
        "with the same Idempotency-Key to get exactly this job or a new one, or look it up"),
        {"task_id": task_id, "queued": "unknown"}, headers={"Retry-After": "5"})


_DICTIONARIES: dict[str, bytes] = {}


def _dictionary(workflow) -> bytes:
    """The workflow's payload dictionary, built once per process (its templates are fixed)."""
    if workflow.name not in _DICTIONARIES:
        _DICTIONARIES[workflow.name] = payload_dictionary(workflow)
    return _DICTIONARIES[workflow.name]


class NotReplicated(Exception):
    pass


def _wait_replicated() -> None:
    """With REDIS_MIN_REPLICAS, a job is accepted only once that many replicas hold it, so a
    Sentinel failover cannot lose an accepted job. WAIT covers this connection's writes: a mark
    written after the job and its message (maybe another connection's) orders them before it."""
    settings = services().settings
    if settings.redis_min_replicas <= 0:
        return
    pipe = services().redis.pipeline(transaction=False)
    pipe.incr(keys.REPLICATION_MARK)
    pipe.execute_command("WAIT", settings.redis_min_replicas, int(settings.redis_replica_wait * 1000))
    _, acked = pipe.execute()
    if int(acked) < settings.redis_min_replicas:
        raise NotReplicated(f"the job reached {int(acked)} of the {settings.redis_min_replicas} Redis replicas it must "
                            f"be on within {settings.redis_replica_wait:g} s (a failover may be under way); "
                            "nothing was queued: retry", int(acked), settings.redis_min_replicas)


@api.get("/tasks/<task_id>")
def get_task(task_id: str):
    svc = services()
    task_id = valid_task_id(task_id)
    record = svc.store.get(task_id)  # one round trip (two while it waits: its place in line)
    if not owns(record):
        raise task_not_found(task_id)
    return jsonify(_document(task_id, record))


@api.delete("/tasks/<task_id>")
def cancel_task(task_id: str):
    """Cancel: a job still in Celery ends at once and never reaches a GPU; one its worker has
    is deleted from ComfyUI's queue or interrupted there, and this waits (CANCEL_WAIT_SECONDS
    at most) on the job's event log for the final event: 200 when it came, else 202."""
    svc = services()
    task_id, record = load_task(task_id)
    if record["status"] in TERMINAL:
        raise _finished(task_id, record["status"])
    result = svc.store.cancel(task_id, record)
    if result.outcome == "finished":
        raise _finished(task_id, str(result.state))
    waited = _wait_final(task_id, result.last_event or "0-0", CANCEL_WAIT_SECONDS) \
        if result.outcome == "requested" else None
    document = _document(task_id, waited)
    response = jsonify(document)
    response.status_code = 200 if document["status"] in TERMINAL else 202
    return response


def _finished(task_id: str, status: str) -> ServiceError:
    return ServiceError(409, "task_finished", f"the task already ended: {status}",
                        {"task_id": task_id, "status": status})


def _wait_final(task_id: str, after: str, seconds: float) -> dict | None:
    """Block on the job's event log (XREAD BLOCK) until its final event or the deadline; the
    record as last read with the events (final if the final event came), None if none was."""
    svc = services()
    client = svc.events_redis or svc.redis
    deadline = time.monotonic() + seconds
    record = None
    while (left := deadline - time.monotonic()) > 0:
        found, record = svc.store.events_then_record(client, task_id, after, block_ms=max(int(left * 1000), 1))
        if record is None or record["status"] in TERMINAL:  # read after the events: final with the final one
            return record
        after = found[-1].id if found else after
    return record


def _needs(job: JobSpec) -> str:
    wants = [f"checkpoint {job.checkpoint}"] if job.checkpoint else []
    wants += [f"{k} {v}" for k, v in (("gpu", job.gpu), ("host", job.host)) if v]
    return ", ".join(wants) or "any GPU"


def _check_checkpoint_known(checkpoint: str) -> dict:
    """A checkpoint no GPU of the fleet has ever offered never reaches ComfyUI: 422 listing the
    ones that were. Returns the fleet's known GPUs (their labels) for the caller to reuse."""
    registry = services().registry
    known = registry.known(max_age=KNOWN_FLEET_MAX_AGE)  # not a round trip on every submit
    offered = known_checkpoints(known)
    if offered and checkpoint not in offered:  # a GPU may have joined since: read again first
        known = registry.known()
        offered = known_checkpoints(known)
    if offered and checkpoint not in offered:
        raise ServiceError(422, "unknown_checkpoint",
                           f"checkpoint: no GPU of this fleet has ever offered {checkpoint[:200]!r}",
                           {"field": "checkpoint", "checkpoint": checkpoint, "available": sorted(offered)})
    return known


def _check_pin_known(pin: dict) -> None:
    """A pin naming a GPU or host the fleet has never had is the caller's mistake (422), not a
    GPU that is down now (503)."""
    known = services().registry.known()
    hosts = sorted({str(labels.get("host")) for labels in known.values() if labels.get("host")})
    if "gpu" in pin and pin["gpu"] not in known:
        raise ServiceError(422, "unknown_gpu", f"gpu: no GPU named {pin['gpu']!r} has ever joined this fleet",
                           {"field": "gpu", "gpu": pin["gpu"], "available": {"gpus": sorted(known), "hosts": hosts}})
    if "host" in pin and pin["host"] not in hosts:
        raise ServiceError(422, "unknown_gpu", f"host: no GPU host named {pin['host']!r} has ever joined this fleet",
                           {"field": "host", "host": pin["host"], "available": {"gpus": sorted(known),
                                                                                "hosts": hosts}})


IMAGE_INDEX = re.compile(r"^[0-9]{1,9}$")  # ASCII digits only; anything else names no image


@api.get("/tasks/<task_id>/images/<index>")
def get_image(task_id: str, index: str):
    svc = services()
    task_id, record = load_task(task_id)
    images = (record.get("result") or {}).get("images", [])
    number = int(index) if IMAGE_INDEX.match(index) else -1
    if not 0 <= number < len(images):
        raise ServiceError(404, "image_not_found", f"the task has {len(images)} image(s)",
                           {"task_id": task_id, "status": record["status"], "index": index[:32]})
    image = images[number]
    data = svc.storage.get(image["key"])  # a key the worker made: <task id>/<attempt>_<n>.<ext>
    if data is None:
        raise ServiceError(410, "image_gone", "the image is no longer in storage", {"task_id": task_id})
    return Response(data, mimetype=image["content_type"],
                    headers={"Cache-Control": "private, max-age=86400",
                             "Content-Disposition": f'inline; filename="{task_id}-{number}.png"'})


@api.get("/workflows")
def list_workflows():
    live = services().registry.alive()
    return jsonify({"workflows": [
        {"name": w.name, "title": w.title, "description": w.description, "default": w.name == DEFAULT_WORKFLOW,
         "parameters": w.json_schema()}
        for w in services().catalog.values()
    ], "checkpoints": sorted({c for w in live for c in (w.get("checkpoints") or ())})})


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
    ready = [w for w in workers if healthy(w)]  # alive, ComfyUI answering, not draining: takes jobs
    if not ready:
        if not workers:
            reason = "no worker is alive"
        elif all(w.get("draining") for w in workers):
            reason = "every live worker is draining"
        else:
            reason = "no live worker's ComfyUI answers"
        raise ServiceError(503, "not_ready", reason, {"workers": len(workers), "healthy": 0})
    return jsonify({"status": "ready", "workers": len(workers), "healthy": len(ready)})
