"""The OpenAPI 3.2 document served at /openapi.json (request schemas come from the workflows)."""
from __future__ import annotations

from app.openapi_security import secure_document
from common.documents import CALLBACK_EVENTS, EVENT_ID_PATTERN, FINAL_STATUSES, SSE_EVENTS, Task, component_schemas
from workflows.catalog import Workflow

REF = "#/components/schemas/{model}"


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _task_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Task"}}}}


NULLABLE_STR = {"type": ["string", "null"]}

# The task's documents come from their models (common/documents.py); the fleet's are described here.
SCHEMAS = {
    "Worker": {
        "type": "object", "required": ["queue"],
        "description": "A live GPU worker's last heartbeat (every HEARTBEAT_INTERVAL s) plus its queue's backlog.",
        "properties": {
            "queue": {"type": "string", "description": "Its Celery queue, gpu.<host>.<index>: what `gpu` pins."},
            "host": {"type": "string"}, "gpu_index": {"type": "integer"}, "instance": {"type": "string"},
            "pid": {"type": "integer"}, "comfyui_url": {"type": "string"}, "comfyui_ok": {"type": "boolean"},
            "comfyui_queue": {"type": ["integer", "null"], "description": "Prompts in its ComfyUI's queue."},
            "running": {"type": "array", "items": {"type": "string"}, "description": "Task ids it runs now."},
            "concurrency": {"type": "integer"},
            "draining": {"type": "boolean", "description": "Finishing what it has, taking nothing new."},
            "gpu": {"type": "object", "description": "available, source (nvml, gputil, comfyui, none), name, "
                                                     "utilization, memory_used_mb, memory_total_mb, temperature_c."},
            "host_stats": {"type": "object", "description": "cpu_percent, ram_used_mb, ram_total_mb, load_avg_1m."},
            "checkpoint": NULLABLE_STR,
            "checkpoints": {"type": ["array", "null"], "items": {"type": "string"},
                            "description": "The checkpoints its ComfyUI offers (null until read)."},
            "rates": {"type": "object", "description": "Measured seconds per cost unit "
                                                                                  "by workflow."},
            "started_at": {"type": "string"},
            "cold_start_seconds": {"type": ["number", "null"], "description": (
                "Its measured start: process start → its ComfyUI answered, plus its first model load (null "
                "until both are known).")},
            "checkpoint_load_seconds": {"type": ["number", "null"], "description": (
                "Its measured first model load: what dispatch adds for a job whose checkpoint it does not hold "
                "(null until measured: 15 s is assumed).")},
            "waiting": {"type": "integer", "minimum": 0, "description": "Jobs queued for it, not started."},
            "load": {"type": "number", "minimum": 0, "description": "Cost units waiting or running on it."},
        },
    },
    "WorkflowInfo": {
        "type": "object", "required": ["name", "title", "description", "default", "parameters"],
        "properties": {"name": {"type": "string"}, "title": {"type": "string"}, "description": {"type": "string"},
                       "default": {"type": "boolean", "description": "Used when the body names no workflow."},
                       "parameters": {"type": "object", "description": "JSON Schema of its request body."}},
    },
}

# Service fields of every generate body, beside the workflow's own parameters.
CALLBACK_FIELDS = {
    "callback_url": {
        "type": "string", "format": "uri", "maxLength": 2048, "pattern": "^https?://[!-\\[\\]-~]+$",
        "description": ("POST the final task document here, signed per Standard Webhooks (see `webhooks`). The "
                        "host must be on the service's WEBHOOK_ALLOWED_HOSTS (else 422 callback_not_allowed)."),
    },
    "callback_events": {
        "type": "array", "uniqueItems": True, "maxItems": len(CALLBACK_EVENTS),
        "items": {"enum": list(CALLBACK_EVENTS)},
        "description": "Also POST these events (the final document is always sent). Needs callback_url.",
    },
}
CALLBACK_NEEDS_URL = {"callback_events": ["callback_url"]}
SSE_DESCRIPTION = """\
Server-Sent Events. The stream starts with `retry: 2000`, replays the job's events from the start (or after
Last-Event-ID) and follows it live:

- `queued` (QueuedEvent), `started` (StartedEvent), `progress` (ProgressEvent), `output` (OutputEvent), each
  with an `id:`; `queued` is sent again without an id whenever the queue position or GPU changes;
- one final `succeeded` | `failed` | `cancelled` whose data is the Task document (with that status); then the
  stream ends.

Each event's `data:` is one line of JSON. Comment lines (`: keep-alive`) every SSE_KEEPALIVE seconds while idle.
Reconnect with the last `id:` seen as `Last-Event-ID` to resume without losing or repeating an event. A stream
open SSE_MAX_SECONDS ends without a final event: reconnect the same way."""


def _below_2_64() -> str:
    """A regex for the decimal numbers Redis takes as a stream id part (0 … 2^64-1, 1–20 digits):
    what the service accepts as Last-Event-ID, so the document and the 400 agree."""
    limit = str(2**64 - 1)
    branches = ["[0-9]{1,19}", "0[0-9]{19}"]
    for index, digit in enumerate(limit):  # same prefix, a smaller digit here, anything after
        if digit != "0":
            low = "0" if index else "1"
            branches.append(f"{limit[:index]}[{low}-{int(digit) - 1}][0-9]{{{len(limit) - index - 1}}}"
                            if int(digit) - 1 >= int(low) else None)
    branches.append(limit)
    return "(?:" + "|".join(b for b in branches if b) + ")"


LAST_EVENT_ID_PATTERN = f"^{_below_2_64()}-{_below_2_64()}$"


def _sse_event(name: str, model: type) -> dict:
    """One event as OpenAPI 3.2 describes a text/event-stream item: its fields as strings, `data`
    holding JSON that matches the event's model."""
    data = {"$ref": REF.format(model=model.__name__)}
    if model is Task:  # a final event is named for the status its document has
        data = {"allOf": [data, {"properties": {"status": {"const": name}}}]}
    return {
        "type": "object", "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
            "id": {"type": "string", "pattern": EVENT_ID_PATTERN,
                   "description": "Resume after this event with Last-Event-ID."},
            "retry": {"type": "integer", "minimum": 0},
        }}


SSE_CONTENT = {
    # Each event (an EventSource's view: event, data, id, retry)...
    "itemSchema": {"oneOf": [_sse_event(name, model) for name, model in SSE_EVENTS.items()]},
    # ...and the stream as a whole: at most one final event.
    "schema": {"type": "array", "description": "The events in order; at most one final event, the last.",
               "contains": {"type": "object", "required": ["event"],
                            "properties": {"event": {"enum": list(FINAL_STATUSES)}}},
               "minContains": 0, "maxContains": 1},
}


def openapi_document(catalog: dict[str, Workflow]) -> dict:
    schemas = {**component_schemas(REF), **SCHEMAS}
    variants = []
    for name, workflow in catalog.items():
        schema = workflow.params_model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schema["properties"] = {
            "workflow": {"const": name, "description": "Which workflow to run."},
            "gpu": {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9_.\\-]{1,128}$",
                    "description": "Pin the job to this GPU queue (gpu.<host>.<index>)."},
            "host": {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9_.\\-]{1,128}$",
                     "description": "Pin the job to any GPU of this host."},
            **CALLBACK_FIELDS,
            **schema["properties"]}
        schema["dependentRequired"] = CALLBACK_NEEDS_URL
        if name != "storydiffusion":
            schema.setdefault("required", []).insert(0, "workflow")
        model_name = f"Generate_{name}"
        schema["title"] = model_name
        schemas[model_name] = schema
        variants.append({"$ref": REF.format(model=model_name)})
    task_id = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    not_found = _error_response("No task with this id.")
    document = secure_document({
        "openapi": "3.2.0",
        "info": {"title": "comfy-service", "version": "1.0.0",
                 "description": "Text-to-image jobs on a fleet of ComfyUI GPUs. Every error has the Error shape."},
        "paths": {
            "/api/v1/generate": {"post": {
                "summary": "Queue a job", "operationId": "generate",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": variants}}}},
                "responses": {
                    "202": {**_task_response("Queued."), "headers": {"Location": {"schema": {"type": "string"}}}},
                    "400": _error_response("The body is not a JSON object."),
                    "413": _error_response("The body is too large."),
                    "415": _error_response("The body is not JSON."),
                    "422": _error_response(
                        "Unknown workflow (unknown_workflow) or invalid parameters (invalid_parameters: "
                        "details.errors names each field); a gpu or host pin naming nothing the fleet has ever "
                        "registered (unknown_gpu: details.available lists its GPU queues and hosts); a checkpoint no GPU of the "
                        "fleet has ever offered (unknown_checkpoint: details.available lists those offered); a "
                        "callback the service will not call: webhooks_disabled "
                        "(no WEBHOOK_SECRET / WEBHOOK_ALLOWED_HOSTS here), invalid_callback_url, "
                        "callback_not_allowed (host not allowed), invalid_callback_events."),
                    "503": _error_response("Redis is down (broker_unavailable), or the job did not reach "
                                           "REDIS_MIN_REPLICAS replicas in time (not_replicated: nothing queued), "
                                           "no healthy GPU worker is available "
                                           "(no_worker, also when only GPUs that are down have its checkpoint, unless WAIT_FOR_GPUS), or "
                                           "the pinned GPU or host is known but down (gpu_unavailable)."),
                }}},
            "/api/v1/tasks/{task_id}": {
                "parameters": [task_id],
                "get": {"summary": "A job's state, progress and results", "operationId": "getTask",
                        "responses": {"200": _task_response("The task."), "404": not_found,
                                      "503": _error_response("Redis is down.")}},
                "delete": {"summary": "Cancel a job at whatever stage it is", "operationId": "cancelTask",
                           "responses": {
                               "200": _task_response("Cancelled."),
                               "202": _task_response("ComfyUI was told to stop it; it ends cancelled shortly."),
                               "404": not_found,
                               "409": _error_response("The task already ended (details.status)."),
                               "503": _error_response("Redis is down.")}},
            },
            "/api/v1/tasks/{task_id}/events": {"get": {
                "summary": "The job's progress as Server-Sent Events, resumable", "operationId": "taskEvents",
                "description": SSE_DESCRIPTION,
                "parameters": [task_id, {
                    "name": "Last-Event-ID", "in": "header", "required": False,
                    "description": "Resume after this event (what an EventSource sends when it reconnects).",
                    "schema": {"type": "string", "pattern": LAST_EVENT_ID_PATTERN}}, {
                    "name": "last_event_id", "in": "query", "required": False,
                    "description": "The same, for clients that cannot set headers (the header wins).",
                    "schema": {"type": "string", "pattern": LAST_EVENT_ID_PATTERN}}],
                "responses": {
                    "200": {"description": "The event stream.",
                            "content": {"text/event-stream": SSE_CONTENT}},
                    "204": {"description": "The job ended and Last-Event-ID is its final event: nothing more will "
                                           "come (an EventSource stops reconnecting)."},
                    "400": _error_response("Last-Event-ID is not an id this stream sends (invalid_last_event_id)."),
                    "404": not_found,
                    "503": _error_response("Redis is down (broker_unavailable), or this API process has "
                                           "SSE_MAX_STREAMS streams open (too_many_streams).")}}},
            "/api/v1/tasks/{task_id}/images/{index}": {"get": {
                "summary": "One output image", "operationId": "getImage",
                "parameters": [task_id, {"name": "index", "in": "path", "required": True,
                                         "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": {"description": "The image bytes.",
                                      "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                              "404": _error_response("No such task or image."),
                              "410": _error_response("The image expired from storage.")}}},
            "/api/v1/tasks/{task_id}/logs": {"get": {
                "summary": "One run's log lines: ComfyUI's (attributed by time) and the worker's",
                "operationId": "getTaskLogs", "parameters": [task_id],
                "responses": {"200": {"description": "The lines in time order (the last 2000 kept).",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "required": ["task_id", "lines"],
                                          "properties": {
                                              "task_id": {"type": "string", "format": "uuid"},
                                              "lines": {"type": "array", "items": {
                                                  "type": "object", "required": ["t", "source", "m"],
                                                  "properties": {
                                                      "t": {"type": "string", "format": "date-time"},
                                                      "source": {"enum": ["comfyui", "worker"]},
                                                      "m": {"type": "string"}}}}}}}}},
                              "404": not_found}}},
            "/api/v1/workflows": {"get": {
                "summary": "Workflows and their parameters as JSON Schema", "operationId": "listWorkflows",
                "responses": {"200": {"description": "The workflows.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["workflows", "checkpoints"], "properties": {"workflows": {
                        "type": "array", "items": {"$ref": "#/components/schemas/WorkflowInfo"}},
                        "checkpoints": {"type": "array", "items": {"type": "string"}, "description": (
                            "The checkpoints the live GPUs offer now (a `checkpoint` parameter no GPU ever offered "
                            "is 422 unknown_checkpoint).")}}}}}}}}},
            "/api/v1/workers": {"get": {
                "summary": "The live GPU workers (heartbeats)", "operationId": "listWorkers",
                "responses": {"200": {"description": "The fleet.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["workers"], "properties": {"workers": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Worker"}}}}}}},
                              "503": _error_response("Redis is down.")}}},
            "/api/v1/fleet": {"get": {
                "summary": "The fleet's size, the size it should have, and why (autoscaling)", "operationId": "getFleet",
                "description": ("The same decision as the comfy_fleet_desired_gpus gauge on /metrics, which KEDA scales "
                                "the GPU StatefulSet on: the waiting and running work in predicted GPU seconds against "
                                "SCALE_TARGET_WAIT plus a GPU's cold start, GPUs idle for SCALE_DOWN_DELAY, within "
                                "SCALE_MIN_GPUS … SCALE_MAX_GPUS."),
                "responses": {"200": {"description": "The fleet and its scaling decision.",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/Fleet"}}}},
                              "503": _error_response("Redis is down.")}}},
            "/healthz": {"get": {"summary": "The process answers", "operationId": "healthz",
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Redis answers and a healthy worker is alive", "operationId": "readyz",
                                "responses": {"200": {"description": "Ready."},
                                              "503": _error_response("Not ready (details say why).")}}},
        },
        "webhooks": {"taskEvent": {"post": {
            "summary": "What the service POSTs to a job's callback_url",
            "description": (
                "Signed per the Standard Webhooks spec: `webhook-signature` is `v1,` + base64(HMAC-SHA256(secret, "
                "`<webhook-id>.<webhook-timestamp>.<body>`)), the secret being WEBHOOK_SECRET without its `whsec_` "
                "prefix, base64-decoded (several space-separated signatures while secrets rotate). `webhook-id` is "
                "the same on every retry of one message: deduplicate by it. Any 2xx is success. No answer, 5xx, "
                "3xx (redirects are not followed), 408, 409, 425 and 429 are retried after WEBHOOK_BACKOFF seconds, "
                "doubling up to WEBHOOK_BACKOFF_MAX, WEBHOOK_MAX_ATTEMPTS attempts in all; any other 4xx is final. "
                "task.progress is sent once, never retried."),
            "parameters": [
                {"name": "webhook-id", "in": "header", "required": True, "schema": {"type": "string"}},
                {"name": "webhook-timestamp", "in": "header", "required": True,
                 "description": "Unix seconds of this attempt: reject old ones (replays).",
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                {"name": "webhook-signature", "in": "header", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/WebhookEvent"}}}},
            "responses": {"2XX": {"description": "Delivered."},
                          "default": {"description": "Retried or given up, as described."}}}}},
        "components": {"schemas": schemas},
    })
    # The raw-graph variant (added by secure_document) takes the same service fields.
    raw = document["components"]["schemas"]["Generate_raw"]
    document["components"]["schemas"]["Generate_raw"] = {**raw, "properties": {**raw["properties"], **CALLBACK_FIELDS},
                                                          "dependentRequired": CALLBACK_NEEDS_URL}
    return document
