"""A small typed client for the comfy-service HTTP API.

Scripts and the CLI (`app/cli.py`) use it so that none of them re-implements the error
document, the event stream's resume rules or image downloads. It needs only `requests`,
`sseclient-py` and pydantic. The task's documents (`Task`, `Progress`, `Image`, the events)
are the service's own models from `common/documents.py`, the same classes the OpenAPI
document is generated from; they keep fields they do not know and read statuses as plain
strings, so an older client keeps working against a newer service.

    client = ComfyServiceClient("http://127.0.0.1:8080", api_key=key)
    task = client.generate(characters=[...], scenes=[...], seed=42)
    task = client.wait(task.task_id, on_event=print)   # follows the event stream
    paths = client.download(task, "outputs")

Failures are two exceptions: `ApiError` (the service answered with an error document: 4xx,
5xx) and `ServiceUnreachable` (no answer at all: refused, reset, timed out).
"""
from __future__ import annotations

import email.utils
import json
import mimetypes
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote, urljoin

import requests
import sseclient
from pydantic import BaseModel, ConfigDict, Field

# The task's documents are the service's own definitions (they need only pydantic).
from common.documents import (
    FINAL_STATUSES, SSE_EVENTS, Callback, Document, Fleet, FleetGpu, Image, OutputEvent, Progress, ProgressEvent,
    QueuedEvent, StartedEvent, Task, TaskError, TaskResult,
)

__all__ = [
    "ApiError", "Callback", "ComfyServiceClient", "ComfyServiceError", "Event", "Fleet", "FleetGpu", "GpuInfo",
    "HostInfo", "Image", "LogLine", "OutputEvent", "Progress", "ProgressEvent", "QueuedEvent", "ServiceUnreachable",
    "StartedEvent", "Task", "TaskError", "TaskResult", "WaitTimeout", "Worker", "WorkflowInfo",
]

API = "/api/v1"
DEFAULT_URL = "http://127.0.0.1:8080"
FINAL = FINAL_STATUSES
# A connection that breaks mid-stream raises one of these from the body iterator.
_DROPS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


# -- Typed results --------------------------------------------------------------------------

class _Model(BaseModel):
    # Unknown fields are kept, not refused: the service adds fields without a new API version.
    model_config = ConfigDict(extra="allow")


class GpuInfo(_Model):
    available: bool = False
    source: str | None = None
    name: str | None = None
    utilization: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    temperature_c: float | None = None


class HostInfo(_Model):
    cpu_percent: float | None = None
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    load_avg_1m: float | None = None


class Worker(_Model):
    """One live GPU worker's last heartbeat, plus its queue's backlog."""
    queue: str
    host: str | None = None
    gpu_index: int | None = None
    comfyui_url: str | None = None
    comfyui_ok: bool = False
    comfyui_queue: int | None = None
    running: list[str] = Field(default_factory=list)
    concurrency: int | None = None
    draining: bool = False
    gpu: GpuInfo = Field(default_factory=GpuInfo)
    host_stats: HostInfo = Field(default_factory=HostInfo)
    checkpoint: str | None = None
    waiting: int = 0     # jobs queued for this GPU, not started
    load: float = 0.0    # cost units waiting or running on it
    ts: float | None = None  # heartbeat time (Unix seconds)


class WorkflowInfo(_Model):
    name: str
    title: str = ""
    description: str = ""
    default: bool = False
    parameters: dict[str, Any] = Field(default_factory=dict)  # JSON Schema of the body

    @property
    def required(self) -> list[str]:
        return list(self.parameters.get("required", []))

    @property
    def properties(self) -> dict[str, dict]:
        return dict(self.parameters.get("properties", {}))


class LogLine(_Model):
    t: str | None = None
    source: str | None = None
    m: str | None = None


class Event(_Model):
    """One server-sent event. `id` is None for events the server does not log (queue
    position updates): those are not replayed on resume."""
    id: str | None = None
    type: str
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.type in FINAL

    def task(self) -> Task:
        """The task document a final event carries."""
        return Task.model_validate(self.data)

    def payload(self) -> Document | None:
        """The data as its typed model (QueuedEvent, StartedEvent, ProgressEvent, OutputEvent, or
        the Task of a final event); None for an event type this client does not know."""
        model = SSE_EVENTS.get(self.type)
        return None if model is None else model.model_validate(self.data)


# -- Errors -------------------------------------------------------------------------------

class ComfyServiceError(Exception):
    """Base of this client's errors."""


class ApiError(ComfyServiceError):
    """The service answered with an error: its error document, field by field."""

    def __init__(self, status: int, source: str, code: str, message: str, details: dict | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{source}/{code}: {message}")
        self.status, self.source, self.code, self.message = status, source, code, message
        self.details = details or {}
        self.retry_after = retry_after  # seconds, from Retry-After (503s and 429s)

    @classmethod
    def from_response(cls, response: requests.Response) -> "ApiError":
        retry_after = _retry_after(response.headers.get("Retry-After"))
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["source"]), str(error["code"]), str(error.get("message", "")),
                       error.get("details") or {}, retry_after)
        except (ValueError, KeyError, TypeError):
            # Not the service's document (a proxy's page, say): keep what there is.
            text = response.text[:200].strip() or response.reason or ""
            return cls(response.status_code, "http", f"http_{response.status_code}", text, {}, retry_after)


class ServiceUnreachable(ComfyServiceError):
    """No answer from the service: connection refused or reset, DNS, timeout."""
    source, code = "client", "unreachable"

    def __init__(self, url: str, reason: object):
        super().__init__(f"cannot reach {url}: {reason}")
        self.url, self.reason = url, reason
        self.message = str(self)


class WaitTimeout(ComfyServiceError, TimeoutError):
    """wait() gave up before the task ended (the task goes on)."""


def _cause(exc: Exception) -> str:
    """The useful end of a requests error ("[Errno 111] Connection refused", "Read timed out"),
    not urllib3's pool and retry wrapping."""
    reason = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", None) or reason  # MaxRetryError wraps the cause
    return str(reason).split("): ", 1)[-1]


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# -- The event stream's body ------------------------------------------------------------------

class _Body:
    """The stream's bytes as they arrive, for sseclient. It remembers whether the body ended on
    an event boundary: sseclient dispatches a trailing half event, which SSE says to drop."""

    def __init__(self, response: requests.Response, deadline: float | None):
        self.response, self.deadline = response, deadline
        self.tail, self.ended = b"", False

    def __iter__(self) -> Iterator[bytes]:
        # Chunked bodies (gunicorn, any HTTP/1.1 proxy) arrive chunk by chunk with chunk_size=None;
        # a close-delimited body would be read to its end that way, so it goes byte by byte.
        chunked = "chunked" in self.response.headers.get("Transfer-Encoding", "").lower()
        for chunk in self.response.iter_content(chunk_size=None if chunked else 1):
            _check_deadline(self.deadline)  # keep-alive comments land here too: idle waits still time out
            if chunk:
                self.tail = (self.tail + chunk)[-4:]
                yield chunk
        self.ended = True

    @property
    def cut(self) -> bool:
        return self.ended and bool(self.tail) and not self.tail.endswith((b"\n\n", b"\r\r", b"\r\n\r\n"))


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise WaitTimeout("the task did not end in time")


def _event(raw) -> Event:
    try:
        data = json.loads(raw.data)
    except ValueError:
        data = {"text": raw.data}
    return Event(id=raw.id or None, type=raw.event, data=data if isinstance(data, dict) else {"value": data})


# -- The client ---------------------------------------------------------------------------------

class ComfyServiceClient:
    """The comfy-service API over one requests session (keep-alive, the key on every call).

    timeout: seconds for each ordinary request. stream_timeout: longest silence on the event
    stream before it counts as dropped (the server sends keep-alive comments while idle).
    max_reconnects: consecutive failed reconnects of the event stream before giving up;
    reconnect_delay: seconds before each (the server's `retry:` is 2 s).
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0, *,
                 stream_timeout: float = 60.0, max_reconnects: int = 5, reconnect_delay: float = 2.0,
                 session: requests.Session | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the service URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout, self.stream_timeout = timeout, stream_timeout
        self.max_reconnects, self.reconnect_delay = max_reconnects, reconnect_delay
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "comfy-service-client"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "ComfyServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Plumbing
    def _url(self, path: str) -> str:
        return f"{self.base_url}{API}{path}"

    def _task_path(self, task_id: str, suffix: str = "") -> str:
        return f"/tasks/{quote(task_id, safe='')}{suffix}"

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = self._url(path)
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, url, **kwargs)
        except _DROPS as exc:
            raise ServiceUnreachable(url, _cause(exc)) from None
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiError(response.status_code, "http", "invalid_json", "the answer is not JSON") from None

    def url_of(self, image: Image) -> str:
        """An image's absolute URL: result URLs are relative when the service has no PUBLIC_URL."""
        return urljoin(self.base_url + "/", image.url)

    # Jobs
    def generate(self, body: Mapping[str, Any] | None = None, /, *, workflow: str | None = None,
                 idempotency_key: str | None = None, callback_url: str | None = None,
                 callback_events: list[str] | None = None, gpu: str | None = None, host: str | None = None,
                 **params: Any) -> Task:
        """Queue a job: `body` and/or keyword workflow parameters; the service fields are sent only
        when given, so the service's defaults apply otherwise (workflow: its default one)."""
        payload = {**(body or {}), **params}
        service_fields = {"workflow": workflow, "gpu": gpu, "host": host, "callback_url": callback_url,
                          "callback_events": callback_events}
        payload.update({key: value for key, value in service_fields.items() if value is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Task.model_validate(self._json("POST", "/generate", json=payload, headers=headers))

    def get(self, task_id: str) -> Task:
        return Task.model_validate(self._json("GET", self._task_path(task_id)))

    def cancel(self, task_id: str) -> Task:
        """Cancel at any stage. The document may still say running (202): ComfyUI was told to
        stop and the task ends cancelled shortly. ApiError 409 when it had already ended."""
        return Task.model_validate(self._json("DELETE", self._task_path(task_id)))

    def image(self, task_id: str, index: int) -> bytes:
        return self._request("GET", self._task_path(task_id, f"/images/{int(index)}")).content

    def download(self, task: Task | str, directory: str | Path) -> list[Path]:
        """Save a task's images as <directory>/<task id>-<n>.<ext>. They are fetched through this
        client's base URL, whatever host PUBLIC_URL put in the result URLs: the key is never
        sent elsewhere, and a base URL with a path prefix (a proxy) keeps working."""
        task = self.get(task) if isinstance(task, str) else task
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(task.images):
            path = directory / f"{task.task_id}-{index}{_extension(image.content_type)}"
            partial = path.with_name(path.name + ".part")  # an interrupted download never looks complete
            partial.write_bytes(self.image(task.task_id, index))
            partial.replace(path)
            paths.append(path)
        return paths

    def logs(self, task_id: str) -> list[LogLine]:
        return [LogLine.model_validate(line) for line in self._json("GET", self._task_path(task_id, "/logs"))["lines"]]

    # Fleet and catalogue
    def workers(self) -> list[Worker]:
        return [Worker.model_validate(w) for w in self._json("GET", "/workers")["workers"]]

    def fleet(self) -> Fleet:
        """The fleet's size, the size it should have, and why (GET /api/v1/fleet)."""
        return Fleet.model_validate(self._json("GET", "/fleet"))

    def workflows(self) -> list[WorkflowInfo]:
        return [WorkflowInfo.model_validate(w) for w in self._json("GET", "/workflows")["workflows"]]

    # Events
    def events(self, task_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The task's events, oldest first, ending after the final one (succeeded, failed,
        cancelled). A dropped connection is resumed with Last-Event-ID, so no logged event is
        lost or repeated; after max_reconnects failures in a row, ServiceUnreachable. With
        `last_event_id`, starts after that event (nothing at all if it was the final one)."""
        return self._follow(task_id, last_event_id, deadline=None)

    def wait(self, task_id: str, timeout: float | None = None,
             on_event: Callable[[Event], None] | None = None) -> Task:
        """Follow the task until it ends and return its final document (any outcome: look at
        status). WaitTimeout after `timeout` seconds; the task itself goes on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._follow(task_id, None, deadline):
            if on_event is not None:
                on_event(event)
            if event.final:
                return event.task()
        return self.get(task_id)  # only if the server ended the stream with 204 at once

    def _follow(self, task_id: str, last_id: str | None, deadline: float | None) -> Iterator[Event]:
        failures = 0
        while True:
            _check_deadline(deadline)
            try:
                response = self._open_stream(task_id, last_id, deadline)
            except (ServiceUnreachable, ApiError) as exc:
                if not _transient(exc) or failures >= self.max_reconnects:
                    raise
                failures += 1
                self._pause(failures, deadline, exc)
                continue
            if response.status_code == 204:  # the final event was already seen: nothing follows
                response.close()
                return
            body = _Body(response, deadline)
            try:
                for raw in sseclient.SSEClient(body).events():
                    if body.cut:
                        break  # half an event at a broken connection: read it again on resume
                    event = _event(raw)
                    failures = 0
                    if event.id:
                        last_id = event.id
                    yield event
                    if event.final:
                        return
            except _DROPS:
                pass
            finally:
                response.close()
            # Resume after `last_id`, as an EventSource would. A healthy stream the server closed
            # (it bounds a stream's length) is no failure; a broken one counts.
            if body.ended and not body.cut:
                failures = 0
            elif failures >= self.max_reconnects:
                raise ServiceUnreachable(self._url(self._task_path(task_id, "/events")),
                                         f"the event stream broke {failures + 1} times in a row")
            failures += 1
            self._pause(failures, deadline, None)

    def _open_stream(self, task_id: str, last_id: str | None, deadline: float | None) -> requests.Response:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        read_timeout = self.stream_timeout
        if deadline is not None:  # a silent stream must not outlast the caller's deadline by much
            read_timeout = max(0.5, min(read_timeout, deadline - time.monotonic() + 0.5))
        return self._request("GET", self._task_path(task_id, "/events"), headers=headers, stream=True,
                             timeout=(self.timeout, read_timeout))

    def _pause(self, failures: int, deadline: float | None, error: ComfyServiceError | None) -> None:
        delay = self.reconnect_delay * min(failures, 5)  # linear back-off, bounded
        if isinstance(error, ApiError) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - time.monotonic()))
        time.sleep(delay)


def _transient(error: ComfyServiceError) -> bool:
    """Worth retrying: no answer, an overloaded or restarting service, a rate limit."""
    return isinstance(error, ServiceUnreachable) or error.status >= 500 or error.status == 429


def _extension(content_type: str) -> str:
    return mimetypes.guess_extension(content_type.split(";")[0].strip()) or ".bin"
