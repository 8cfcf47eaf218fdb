"""The security side of the OpenAPI document, applied over what `app/openapi.py` builds.

Every /api/v1 operation gets the bearer scheme and its 401/403/429/503 answers (routes added
later get them too); POST /generate gets the Idempotency-Key header, the raw-workflow request
variant and its own refusals; the open routes (/healthz, /readyz, /metrics, /openapi.json)
are marked as needing nothing.
"""
from __future__ import annotations

import copy

from workflows import raw

API_PREFIX = "/api/v1/"
ERROR_REF = {"$ref": "#/components/schemas/Error"}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
LINK = {"type": "array", "prefixItems": [{"type": "string", "maxLength": 64, "pattern": raw.NODE_ID.pattern},
                                         {"type": "integer", "minimum": 0, "maximum": raw.MAX_OUTPUT_INDEX}],
        "minItems": 2, "maxItems": 2, "description": "A link: [source node id, output index]."}


def _error(description: str, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}
    if headers:
        response["headers"] = headers
    return response


def _describe(response: dict, extra: str) -> None:
    response["description"] = f"{response.get('description', '').rstrip()} {extra}".strip()


RAW_NODE = {
    "type": "object", "required": ["class_type", "inputs"], "additionalProperties": False,
    "properties": {
        "class_type": {"type": "string", "minLength": 1, "maxLength": raw.MAX_CLASS_TYPE,
                       "description": "A node class on the service's RAW_NODE_ALLOWLIST."},
        "inputs": {"type": "object", "maxProperties": raw.MAX_INPUTS, "additionalProperties": {"anyOf": [
            {"type": "string", "maxLength": raw.MAX_STRING}, {"type": "number"}, {"type": "boolean"}, LINK]}},
        "_meta": {"type": "object", "additionalProperties": False,
                  "properties": {"title": {"type": "string", "maxLength": 200}}},
    },
}
GENERATE_RAW = {
    "title": "Generate_raw", "type": "object", "required": ["workflow", "graph"], "additionalProperties": False,
    "description": (
        "A full ComfyUI API-format graph instead of a named workflow. Off unless the operator sets "
        "ALLOW_RAW_WORKFLOWS=true (else 403 raw_workflows_disabled); node classes must be on RAW_NODE_ALLOWLIST "
        "(else 422 node_not_allowed); every filename_prefix is replaced by the service's; no seed is added."),
    "properties": {
        "workflow": {"const": raw.NAME},
        "gpu": {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9_.\\-]{1,128}$"},
        "host": {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9_.\\-]{1,128}$"},
        "graph": {"type": "object", "minProperties": 1, "maxProperties": raw.MAX_NODES,
                  "propertyNames": {"pattern": raw.NODE_ID.pattern},
                  "additionalProperties": {"$ref": "#/components/schemas/RawNode"}},
    },
}
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": ("Makes a retry safe: the same key (per API key, for 24 h) with the same body answers 202 with "
                    "the FIRST task and `Idempotent-Replayed: true`, queueing nothing; with another body 422 "
                    "idempotency_key_reused."),
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~][ -~]*$"},
}
OPEN_ROUTES = {
    "/metrics": {"get": {"summary": "Prometheus metrics (no secrets, no task data)", "operationId": "metrics",
                         "responses": {"200": {"description": "Prometheus text format.",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}},
                                       "503": _error("Redis is down.")}}},
    "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                              "responses": {"200": {"description": "OpenAPI 3.2.",
                                                    "content": {"application/json": {"schema": {"type": "object"}}}}}}},
}


def secure_document(document: dict) -> dict:
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http", "scheme": "bearer",
        "description": ("An API key of this service (`python -m app.keys add NAME`, or API_KEYS). Required on every "
                        "/api/v1 route once any key is configured; without keys the API is open (loopback only)."),
    }
    schemas = components.setdefault("schemas", {})
    schemas["RawNode"], schemas["Generate_raw"] = RAW_NODE, GENERATE_RAW
    if "params" in schemas.get("Task", {}).get("properties", {}):
        schemas["Task"] = task = copy.deepcopy(schemas["Task"])  # the module's own stays untouched
        params = task["properties"]["params"]
        params["description"] = (params.get("description", "") + " A raw workflow's: nodes, class_types, "
                                 "steps (its graph runs as sent).").strip()
    paths = document.setdefault("paths", {})
    for path, item in OPEN_ROUTES.items():
        paths.setdefault(path, item)
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if not path.startswith(API_PREFIX):
                operation["security"] = []
                continue
            operation["security"] = [{"bearerAuth": []}]
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", _error(
                "No API key, or not one of this service's (missing_api_key, invalid_api_key).",
                {"WWW-Authenticate": {"schema": {"type": "string"}}}))
            responses.setdefault("403", _error("The API key is disabled (api_key_disabled)."))
            responses.setdefault("429", _error("Too many requests for this key (rate_limited).", RETRY_AFTER))
            responses.setdefault("503", _error("Redis is down (broker_unavailable).", RETRY_AFTER))
    generate = paths.get(f"{API_PREFIX}generate", {}).get("post")
    if generate is not None:
        generate.setdefault("parameters", []).append(IDEMPOTENCY_PARAMETER)
        body = generate["requestBody"]["content"]["application/json"]["schema"]
        body.setdefault("anyOf", []).append({"$ref": "#/components/schemas/Generate_raw"})
        responses = generate["responses"]
        accepted = responses["202"]
        accepted.setdefault("headers", {})["Idempotent-Replayed"] = {
            "description": "`true` when this answers a retry with the same Idempotency-Key (nothing queued).",
            "schema": {"const": "true"}}
        responses.setdefault("400", _error("The body is not a JSON object."))
        _describe(responses["400"], "Strict JSON: no NaN/Infinity, no duplicate keys, UTF-8, nesting ≤ 32 "
                                    "(invalid_json, invalid_body); a malformed Idempotency-Key "
                                    "(invalid_idempotency_key).")
        _describe(responses["403"], "Raw workflows are disabled here (raw_workflows_disabled).")
        responses.setdefault("422", _error("Invalid parameters."))
        _describe(responses["422"], "The Idempotency-Key was used with another body (idempotency_key_reused); "
                                    "a raw graph uses a node class not allowed here (node_not_allowed).")
        _describe(responses["503"], "Rarely: an expired Idempotency-Key changing hands (idempotency_busy).")
        _describe(responses["429"], "Or too many unfinished jobs for this key or the service (too_many_jobs): "
                                    "nothing was queued.")
    return document
