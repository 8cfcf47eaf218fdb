"""One error shape for every failure: {"error": {"source", "code", "message", "details"}}."""
from __future__ import annotations

import logging
import uuid

from flask import Flask, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger("comfy.api")


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None,
                 source: str = "service", headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.source, self.headers = details or {}, source, headers or {}

    def body(self) -> dict:
        return {"error": {"source": self.source, "code": self.code, "message": self.message, "details": self.details}}


def error_response(status: int, code: str, message: str, details: dict | None = None, source: str = "service"):
    response = jsonify(ServiceError(status, code, message, details, source).body())
    response.status_code = status
    return response


def field_errors(exc: ValidationError, prefix: str = "") -> list[dict]:
    """pydantic's errors as [{field, message}] with dotted field paths (scenes.2, characters.0.name)."""
    out = []
    for item in exc.errors(include_url=False, include_input=False):
        path = ".".join(str(p)[:64] for p in item["loc"])  # a caller's 10 kB field name is not echoed whole
        message = item["msg"].removeprefix("Value error, ")
        out.append({"field": prefix + path if path else prefix.rstrip("."), "message": message, "type": item["type"]})
    return out


def install(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        response = jsonify(exc.body())
        response.status_code = exc.status
        for name, value in exc.headers.items():
            response.headers[name] = value
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
        response = error_response(exc.code or 500, codes.get(exc.code, "http_error"), exc.description or exc.name)
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _internal(exc: Exception):
        trace_id = uuid.uuid4().hex
        log.exception("internal error trace_id=%s", trace_id)
        return error_response(500, "internal", "internal error; the service logged it with this trace id",
                              {"trace_id": trace_id})
