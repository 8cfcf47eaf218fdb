"""The OpenAPI 3.1 document served at /openapi.json (request schemas come from the workflows)."""
from __future__ import annotations

from app.openapi_security import secure_document
from workflows.catalog import Workflow

REF = "#/components/schemas/{model}"


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _task_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Task"}}}}


NULLABLE_STR = {"type": ["string", "null"]}

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["source", "code", "message", "details"],
            "properties": {
                "source": {"enum": ["service", "comfyui"], "description": "Who rejected or failed the request."},
                "code": {"type": "string", "examples": ["invalid_parameters", "execution_error"]},
                "message": {"type": "string"},
                "details": {"type": "object", "description": (
                    "invalid_parameters: errors [{field, message, type}]; ComfyUI validation: its error and "
                    "node_errors as ComfyUI sent them; execution_error: node_id, node_type, exception_type, "
                    "exception_message, traceback")},
            }}},
    },
    "Progress": {
        "type": ["object", "null"],
        "properties": {"percent": {"type": "number", "minimum": 0, "maximum": 100}, "node": NULLABLE_STR,
                       "step": {"type": "integer"}, "max": {"type": "integer"}},
    },
    "Image": {
        "type": "object", "required": ["url", "content_type"],
        "properties": {"url": {"type": "string"}, "content_type": {"type": "string"},
                       "width": {"type": ["integer", "null"]}, "height": {"type": ["integer", "null"]},
                       "size": {"type": ["integer", "null"]}},
    },
    "Task": {
        "type": "object",
        "required": ["task_id", "status", "workflow", "gpu", "queue_position", "progress", "params", "created_at",
                     "started_at", "finished_at", "result", "error"],
        "properties": {
            "task_id": {"type": "string", "format": "uuid"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "workflow": {"type": "string"},
            "gpu": {**NULLABLE_STR, "description": "The GPU queue (one ComfyUI) that runs or ran the job."},
            "queue_position": {"type": ["integer", "null"], "minimum": 1,
                               "description": "1 = the next job its GPU takes; null unless queued."},
            "progress": {"$ref": "#/components/schemas/Progress"},
            "params": {"type": "object", "description": "The parameters as used, the seed included."},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "cancel_requested": {"type": "boolean"},
            "result": {"type": ["object", "null"], "properties": {
                "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}}}},
            "error": {"type": ["object", "null"], "description": "As in Error.error, when failed."},
        },
    },
}


def openapi_document(catalog: dict[str, Workflow]) -> dict:
    schemas = dict(SCHEMAS)
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
            **schema["properties"]}
        if name != "storydiffusion":
            schema.setdefault("required", []).insert(0, "workflow")
        model_name = f"Generate_{name}"
        schema["title"] = model_name
        schemas[model_name] = schema
        variants.append({"$ref": REF.format(model=model_name)})
    task_id = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    not_found = _error_response("No task with this id.")
    return secure_document({
        "openapi": "3.1.0",
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
                    "422": _error_response("Unknown workflow or invalid parameters (details.errors names each field)."),
                    "503": _error_response("Redis is down (broker_unavailable), no healthy GPU worker is available "
                                           "(no_worker), or none matches the pin (gpu_unavailable)."),
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
                    "type": "object", "properties": {"workflows": {"type": "array", "items": {"type": "object"}}}}}}}}}},
            "/api/v1/workers": {"get": {
                "summary": "The live GPU workers (heartbeats)", "operationId": "listWorkers",
                "responses": {"200": {"description": "The fleet.", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"workers": {"type": "array", "items": {"type": "object"}}}}}}},
                              "503": _error_response("Redis is down.")}}},
            "/healthz": {"get": {"summary": "The process answers", "operationId": "healthz",
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Redis answers and a healthy worker is alive", "operationId": "readyz",
                                "responses": {"200": {"description": "Ready."},
                                              "503": _error_response("Not ready (details say why).")}}},
        },
        "components": {"schemas": schemas},
    })
