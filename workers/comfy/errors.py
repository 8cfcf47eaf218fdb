"""Errors raised by the ComfyUI client.

Every error carries a stable ``code`` and ``retryable`` flag and renders the service's
error body with :meth:`ComfyError.to_dict`:
``{"source": "comfyui", "code": ..., "message": ..., "details": {...}}``.
"""
from __future__ import annotations

from typing import Any


class ComfyError(Exception):
    """Base class. ``retryable``: submitting the same job again may succeed."""

    code = "comfyui_error"
    retryable = False

    def __init__(self, message: str, *, prompt_id: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.prompt_id = prompt_id
        self._details = dict(details or {})

    @property
    def details(self) -> dict[str, Any]:
        d = dict(self._details)
        if self.prompt_id is not None:
            d.setdefault("prompt_id", self.prompt_id)
        return d

    def to_dict(self) -> dict[str, Any]:
        """The service's error body: ``{"source": "comfyui", "code", "message", "details"}``."""
        return {"source": "comfyui", "code": self.code, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, prompt_id={self.prompt_id!r})"


class ComfyUnreachable(ComfyError):
    """ComfyUI did not answer: connection refused, DNS failure, reset, or it stayed down
    past the client's ``unreachable_deadline``. Retryable."""

    code = "unreachable"
    retryable = True


class ComfyTimeout(ComfyUnreachable, TimeoutError):
    """An HTTP request or the websocket handshake timed out (ComfyUI may be overloaded)."""

    code = "timeout"


class ComfyWaitTimeout(ComfyError, TimeoutError):
    """``events()``/``wait()`` gave up after the caller's ``timeout``; ComfyUI is
    reachable and the prompt may still be pending or running (cancel it if unwanted)."""

    code = "wait_timeout"
    retryable = False


class ComfyProtocolError(ComfyError):
    """ComfyUI answered something this client does not understand (non-JSON body,
    unexpected status, missing fields). 502/503/504 (proxy in front of ComfyUI) are
    retryable; anything else is not."""

    code = "protocol_error"

    def __init__(self, message: str, *, status_code: int | None = None, body: str | None = None,
                 prompt_id: str | None = None, details: dict[str, Any] | None = None):
        d = dict(details or {})
        if status_code is not None:
            d["status_code"] = status_code
        if body is not None:
            d["body"] = body[:4000]
        super().__init__(message, prompt_id=prompt_id, details=d)
        self.status_code = status_code
        self.body = body
        if status_code is not None and status_code >= 500:
            self.code = "server_error"
        self.retryable = status_code in (502, 503, 504)


class ComfyValidationError(ComfyError):
    """``POST /prompt`` answered 400: ComfyUI's ``error`` and ``node_errors`` kept verbatim."""

    code = "validation_error"

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any], *, prompt_id: str | None = None,
                 status_code: int = 400):
        self.error = error
        self.node_errors = node_errors
        self.status_code = status_code
        super().__init__(_validation_message(error, node_errors), prompt_id=prompt_id)

    @property
    def details(self) -> dict[str, Any]:
        d = super().details
        d["error"] = self.error
        d["node_errors"] = self.node_errors
        return d


def _validation_message(error: dict[str, Any], node_errors: dict[str, Any]) -> str:
    head = str(error.get("message") or error.get("type") or "Prompt rejected by ComfyUI")
    if error.get("details"):
        head += f" ({error['details']})"
    parts = []
    for node_id, ne in (node_errors or {}).items():
        if not isinstance(ne, dict):
            continue
        for err in ne.get("errors") or []:
            if not isinstance(err, dict):
                continue
            what = err.get("message") or err.get("type") or "error"
            if err.get("details"):
                what += f": {err['details']}"
            parts.append(f"node {node_id} ({ne.get('class_type', '?')}): {what}")
    return head + ("; " + "; ".join(parts) if parts else "")


class ComfyExecutionError(ComfyError):
    """A node raised while ComfyUI executed the prompt (``execution_error``)."""

    code = "execution_error"

    def __init__(self, *, prompt_id: str, node_id: str | None, node_type: str | None,
                 exception_type: str | None, exception_message: str | None,
                 traceback: list[str] | None = None, executed: list[str] | None = None,
                 current_inputs: dict[str, Any] | None = None):
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = (exception_message or "").rstrip("\n")
        self.traceback = list(traceback or [])
        self.executed = list(executed or [])
        self.current_inputs = current_inputs or {}
        where = f"node {node_id} ({node_type})" if node_id is not None else "ComfyUI"
        msg = f"{where} failed: {exception_type or 'Error'}: {self.exception_message}".rstrip(": ")
        super().__init__(msg, prompt_id=prompt_id)

    @property
    def details(self) -> dict[str, Any]:
        d = super().details
        d.update(node_id=self.node_id, node_type=self.node_type, exception_type=self.exception_type,
                 exception_message=self.exception_message, traceback=self.traceback,
                 executed=self.executed)
        return d


class ComfyInterrupted(ComfyError):
    """The prompt was stopped: interrupted while running (``reason="interrupted"``) or
    removed from the queue before it ran (``reason="deleted"``)."""

    code = "interrupted"

    def __init__(self, *, prompt_id: str, node_id: str | None = None, node_type: str | None = None,
                 executed: list[str] | None = None, reason: str = "interrupted"):
        self.node_id = node_id
        self.node_type = node_type
        self.executed = list(executed or [])
        self.reason = reason
        if reason == "deleted":
            msg = "prompt was removed from the ComfyUI queue before it ran"
        else:
            msg = "prompt was interrupted" + (f" in node {node_id} ({node_type})" if node_id else "")
        super().__init__(msg, prompt_id=prompt_id)

    @property
    def details(self) -> dict[str, Any]:
        d = super().details
        d.update(reason=self.reason, node_id=self.node_id, node_type=self.node_type, executed=self.executed)
        return d


class ComfyPromptLost(ComfyError):
    """ComfyUI no longer knows the prompt (not queued, not running, not in history):
    typically it restarted. Retryable: submit the job again."""

    code = "prompt_lost"
    retryable = True
