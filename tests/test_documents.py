"""The public documents (common/documents.py): what the service builds is exactly what the models
and the OpenAPI document say, and the SSE part of the document is checked the way schemathesis
checks a served stream. Pure: no Redis, no processes."""
from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from pydantic import BaseModel

from common.documents import (
    CALLBACK_EVENTS, FINAL_STATUSES, SSE_EVENTS, STATUSES, Document, OutputEvent, ProgressEvent, QueuedEvent,
    StartedEvent, Task,
)

TASK_ID = "0b6c5f0e-2f0a-4c53-9d55-6a1f3c1e7a10"
CREATED, STARTED, FINISHED = "2026-11-30T05:00:00.000Z", "2026-11-30T05:00:01.500Z", "2026-11-30T05:00:09.250Z"
PARAMS = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "steps": 2, "seed": 7}
PROGRESS = {"percent": 42.5, "node": "3", "step": 5, "max": 12}
CALLBACK = {"url": "https://hooks.example.com/comfy", "events": ["progress", "output"]}


def _record(status: str, **fields) -> dict:
    return {"task_id": TASK_ID, "status": status, "workflow": "sdxl", "queue": "gpu.a.0", "params": PARAMS,
            "owner": "alice", "created_at": CREATED, "cancel_requested": False, **fields}


# (record, queue position) as the routes hand them to task_document (progress lives in the record).
RECORDS = {
    "queued in Celery": (_record("queued"), 2),
    "queued in ComfyUI behind another": (_record("queued", gpu="gpu.a.0"), 1),
    "running": (_record("running", gpu="gpu.a.0", started_at=STARTED, progress=PROGRESS), None),
    "running, no progress yet": (_record("running", gpu="gpu.a.0", started_at=STARTED), None),
    "succeeded with images": (_record(
        "succeeded", gpu="gpu.a.0", started_at=STARTED, finished_at=FINISHED,
        progress={"percent": 100.0, "node": None, "step": 12, "max": 12},
        result={"images": [{"content_type": "image/png", "width": 256, "height": 256, "size": 91234, "path": "x"},
                           {"content_type": "image/png", "size": 9}]}), None),
    "failed in ComfyUI": (_record(
        "failed", gpu="gpu.a.0", started_at=STARTED, finished_at=FINISHED, progress=PROGRESS,
        error={"source": "comfyui", "code": "execution_error", "message": "CUDA out of memory",
               "details": {"node_id": "3", "node_type": "KSampler", "exception_type": "torch.OutOfMemoryError",
                           "exception_message": "CUDA out of memory", "traceback": ["..."]}}), None),
    "failed before it ran": (_record(
        "failed", finished_at=FINISHED,
        error={"source": "service", "code": "no_worker", "message": "no GPU took it", "details": {}}), None),
    "cancelled while queued": (_record("cancelled", finished_at=FINISHED, cancel_requested=True), None),
    "cancelled while running": (_record(
        "cancelled", gpu="gpu.a.0", started_at=STARTED, finished_at=FINISHED, cancel_requested=True,
        progress=PROGRESS), None),
    "with a callback, not delivered yet": (_record("queued", callback=CALLBACK), 0),
    "with a callback, delivered": (_record(
        "succeeded", gpu="gpu.a.0", started_at=STARTED, finished_at=FINISHED, result={"images": []},
        callback=CALLBACK, webhook={"state": "delivered", "attempts": 2, "last_status": 200,
                                    "delivered_at": FINISHED}), None),
}


@pytest.fixture(scope="module")
def document():
    from app.openapi import openapi_document
    from workflows.catalog import load_catalog

    return openapi_document(load_catalog())


def _validator(document: dict, name: str) -> jsonschema.Draft202012Validator:
    """The named component, validated as the served document states it (its refs, its enums)."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


def _unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    """Fields a document has that its model (or a nested model) does not declare."""
    found = [f"{path}.{name}" for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        values = getattr(model, name)
        for index, value in enumerate(values if isinstance(values, list) else [values]):
            if isinstance(value, BaseModel):
                found += _unknown_fields(value, f"{path}.{name}[{index}]")
    return found


@pytest.mark.parametrize("case", list(RECORDS))
def test_every_task_document_is_exactly_a_task(case, document):
    from common.task_view import task_document

    record, position = RECORDS[case]
    built = task_document(record, position, "")
    assert set(built) == set(Task.model_fields), case
    task = Task.model_validate(built)
    assert _unknown_fields(task) == [], case
    _validator(document, "Task").validate(built)  # every field, enum and format as documented
    assert task.status == record["status"]


def test_the_schema_is_exact_and_the_client_tolerant(document):
    from common.task_view import task_document

    newer = {**task_document(*RECORDS["running"], ""), "status": "paused", "eta_seconds": 12}
    with pytest.raises(jsonschema.ValidationError):
        _validator(document, "Task").validate(newer)  # the service may send only documented statuses
    task = Task.model_validate(newer)  # an older client reads a newer service's document
    assert (task.status, task.model_extra) == ("paused", {"eta_seconds": 12}) and not task.done
    running = task_document(*RECORDS["running"], "")
    _validator(document, "Task").validate(running)
    incomplete = {key: value for key, value in running.items() if key != "queue_position"}
    with pytest.raises(jsonschema.ValidationError, match="queue_position"):
        _validator(document, "Task").validate(incomplete)  # every field is always sent


def test_the_public_names_are_the_services():
    from common import task_store
    from common.webhooks import OPTIONAL_EVENTS

    assert set(STATUSES) == {task_store.QUEUED, task_store.RUNNING, *task_store.TERMINAL}
    assert set(FINAL_STATUSES) == set(task_store.TERMINAL)
    assert tuple(OPTIONAL_EVENTS) == CALLBACK_EVENTS


def test_the_client_reads_the_services_models():
    from app import client

    for name in ("Task", "Progress", "Image", "TaskResult", "TaskError", "Callback"):
        assert issubclass(getattr(client, name), Document), name


# ---- The event stream, as schemathesis validates a served one ---------------------------------

def _frame(kind: str, data: dict, event_id: str | None = None) -> str:
    from app.sse import frame

    return frame(kind, data, event_id)


def _final(status: str) -> dict:
    from common.task_view import task_document

    record = {"succeeded": RECORDS["succeeded with images"], "failed": RECORDS["failed in ComfyUI"],
              "cancelled": RECORDS["cancelled while running"]}[status]
    return task_document(*record, "")


def _stream(*frames: str) -> bytes:
    from app.sse import RETRY_MS

    return (f"retry: {RETRY_MS}\n\n" + "".join(frames)).encode()


QUEUED = {"task_id": TASK_ID, "status": "queued", "queue_position": 1, "gpu": None}
STARTED_EVENT = {"task_id": TASK_ID, "status": "running", "gpu": "gpu.a.0"}
OUTPUT = {"index": 0, "url": f"/api/v1/tasks/{TASK_ID}/images/0", "content_type": "image/png", "width": 256,
          "height": 256, "size": 91234}
GOOD = [
    _frame("queued", QUEUED, "1796014756253-0"),
    _frame("queued", {**QUEUED, "queue_position": 0, "gpu": "gpu.a.0"}),  # a position update has no id
    _frame("started", STARTED_EVENT, "1796014756305-0"),
    ": keep-alive\n\n",
    _frame("progress", {"task_id": TASK_ID, **PROGRESS}, "1796014758587-0"),
    _frame("output", {"task_id": TASK_ID, **OUTPUT}, "1796014758590-0"),
]


def test_each_event_model_reads_its_data():
    assert SSE_EVENTS["queued"].model_validate(QUEUED) == QueuedEvent(**QUEUED)
    assert isinstance(SSE_EVENTS["started"].model_validate(STARTED_EVENT), StartedEvent)
    assert SSE_EVENTS["progress"].model_validate({"task_id": TASK_ID, **PROGRESS}).percent == 42.5
    assert isinstance(SSE_EVENTS["progress"].model_validate({"task_id": TASK_ID, **PROGRESS}), ProgressEvent)
    assert SSE_EVENTS["output"].model_validate({"task_id": TASK_ID, **OUTPUT}) == OutputEvent(task_id=TASK_ID,
                                                                                             **OUTPUT)
    for status in FINAL_STATUSES:
        assert SSE_EVENTS[status] is Task


def _sse_response(body: bytes):
    from schemathesis.core.transport import Response

    url = f"http://127.0.0.1/api/v1/tasks/{TASK_ID}/events"
    return Response(status_code=200, headers={"content-type": ["text/event-stream; charset=utf-8"]}, content=body,
                    request=requests.Request("GET", url).prepare(), elapsed=0.01, message="OK", encoding="utf-8",
                    http_version="1.1", verify=True)


def _validate_stream(body: bytes) -> None:
    import schemathesis
    from schemathesis.specs.openapi.checks import response_schema_conformance

    from app.openapi import openapi_document
    from workflows.catalog import load_catalog

    operation = schemathesis.openapi.from_dict(openapi_document(load_catalog()))["/api/v1/tasks/{task_id}/events"]["GET"]
    case = operation.Case(path_parameters={"task_id": TASK_ID})
    case.validate_response(_sse_response(body), checks=[response_schema_conformance])


@pytest.mark.parametrize("status", FINAL_STATUSES)
def test_a_whole_stream_matches_the_document(status):
    _validate_stream(_stream(*GOOD, _frame(status, _final(status), "1796014759000-0")))


BAD = {
    "progress data off its model": _frame("progress", {"task_id": TASK_ID, **PROGRESS, "percent": "42"}, "1-0"),
    "an event the document does not name": _frame("paused", {"task_id": TASK_ID}, "1-0"),
    "a final event named for another status": _frame("failed", _final("succeeded"), "1-0"),
    "an output without its url": _frame("output", {"task_id": TASK_ID, **OUTPUT, "url": None}, "1-0"),
    "data that is not JSON": "id: 1-0\nevent: progress\ndata: {percent: 1}\n\n",
    "an id no stream sends": _frame("started", STARTED_EVENT, "last"),
    "two final events": _frame("succeeded", _final("succeeded"), "1-0") + _frame("succeeded", _final("succeeded")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_stream_off_the_document_fails_schemathesis(case):
    from schemathesis.core.failures import Failure, FailureGroup

    with pytest.raises((Failure, FailureGroup)):
        _validate_stream(_stream(*GOOD, BAD[case]))


def test_every_event_the_document_names_is_a_model(document):
    content = document["paths"]["/api/v1/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"]
    items = content["text/event-stream"]["itemSchema"]["oneOf"]
    assert [item["properties"]["event"]["const"] for item in items] == list(SSE_EVENTS)
    assert json.loads(json.dumps(document)) == document  # served as JSON, unchanged


@pytest.mark.parametrize("value", [
    "0-0", "1796014756253-0", "18446744073709551615-18446744073709551615", "01844674407370955161-7",
    "18446744073709551616-0", "0-18446744073709551616", "99999999999999999999-1", "18446744073709551620-0",
    "17999999999999999999-0", "18446744073709551599-3", "1-", "-1", "1-2-3", "a-1", "000000000000000000000-0",
])
def test_the_documented_last_event_id_is_what_the_service_accepts(value):
    import re

    from app.openapi import LAST_EVENT_ID_PATTERN
    from common.events import valid_id

    assert bool(re.fullmatch(LAST_EVENT_ID_PATTERN, value)) == valid_id(value)
