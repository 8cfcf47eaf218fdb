"""GET /api/v1/tasks/{id}/events: a job's life as Server-Sent Events.

The stream replays the job's event log (common/events.py) from the start, or from after
Last-Event-ID, then follows it live: queued (with the queue position, re-sent without an id
whenever it changes), started, progress, output, and one final succeeded / failed / cancelled
event carrying the whole task document, after which the stream ends. A client that already
saw the final event and reconnects gets 204, which tells an EventSource to stop.

Each open stream waits in Redis (XREAD BLOCK), and the API runs gunicorn's gevent workers, so
a stream costs a greenlet and, while it waits, one Redis connection, not a worker thread.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import redis
from flask import Blueprint, Response, current_app, request

from app.errors import ServiceError
from app.security import load_task
from common import events
from common import keys
from common.task_store import QUEUED, TERMINAL
from common.task_view import task_document

blueprint = Blueprint("events", __name__)
log = logging.getLogger("comfy.api")

RETRY_MS = 2000  # how long an EventSource waits before reconnecting
BLOCK_MS = 1000  # one wait in Redis; between waits the stream checks status and queue position


def frame(kind: str, data: dict, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _last_event_id() -> str | None:
    value = request.headers.get("Last-Event-ID")
    if value is None:
        value = request.args.get("last_event_id")
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not events.valid_id(value):
        raise ServiceError(400, "invalid_last_event_id",
                           "Last-Event-ID must be an id this stream sent (<milliseconds>-<sequence>)",
                           {"last_event_id": value[:64]})
    return value


def _event_data(svc, task_id: str, event: events.Event) -> dict:
    if event.type == events.QUEUED:
        queue = event.data.get("queue")
        return {"task_id": task_id, "status": "queued", "queue_position": svc.store.queue_position(queue, task_id),
                "gpu": event.data.get("gpu")}
    if event.type == events.STARTED:
        return {"task_id": task_id, "status": "running", "gpu": event.data.get("queue")}
    return {"task_id": task_id, **event.data}


def _final(svc, task_id: str) -> dict | None:
    record = svc.store.get(task_id)
    return None if record is None else task_document(record, None, svc.settings.public_url)


class _Streams:
    """Streams open in this process, against SSE_MAX_STREAMS (the size of their Redis pool)."""

    def __init__(self):
        self.open = 0
        self.lock = threading.Lock()

    def admit(self, limit: int) -> bool:
        with self.lock:
            if self.open >= limit:
                return False
            self.open += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.open -= 1


STREAMS = _Streams()


def _stream(svc, task_id: str, after: str, first: events.Event | None = None):
    try:
        yield from _follow(svc, task_id, after, first)
    except redis.RedisError as exc:
        # Too late for an error document: end the stream; the client's reconnect gets the 503.
        log.warning("event stream of task %s ended: Redis unavailable (%s)", task_id, exc)


class _Body:
    """The response body: gives the stream's slot back exactly once when the server closes it,
    whether the stream ran to its end, the client went away, or it never started (HEAD)."""

    def __init__(self, stream):
        self.stream, self.released = stream, False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self.stream)

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            if not self.released:
                self.released = True
                STREAMS.release()


def _follow(svc, task_id: str, after: str, first: events.Event | None = None):
    """`first`: the job's submit event, sent from the record while the job has no log yet."""
    settings = svc.settings
    client = svc.events_redis or svc.redis
    yield f"retry: {RETRY_MS}\n\n"
    deadline = time.monotonic() + settings.sse_max_seconds
    last_write = time.monotonic()
    position: tuple | None = None  # (queue position, gpu) last sent
    if first is not None and events.id_after(first.id, after) and not events.has_log(client, task_id):
        data = _event_data(svc, task_id, first)
        position = (data["queue_position"], data["gpu"])
        yield frame(first.type, data, first.id)
        after = first.id  # the log, once made, starts with this very entry
    while time.monotonic() < deadline:
        batch = events.read(client, task_id, after, block_ms=BLOCK_MS)
        for event in batch:
            after = event.id
            if event.type in events.FINAL:
                document = _final(svc, task_id)
                if document is not None:
                    yield frame(event.type, document, event.id)
                return
            data = _event_data(svc, task_id, event)
            if event.type == events.QUEUED:
                position = (data["queue_position"], data["gpu"])
            yield frame(event.type, data, event.id)
            last_write = time.monotonic()
        if batch:
            continue
        # Nothing new for a second: is the job still there, still waiting, and where?
        pipe = svc.redis.pipeline(transaction=False)
        pipe.hmget(keys.task(task_id), "status", "queue", "final_event", "gpu")
        pipe.exists(keys.events(task_id))
        (status, queue, final_event, gpu), log_exists = pipe.execute()
        if status is None:
            return  # the record expired: a reconnect gets the 404 that says so
        status, queue = json.loads(status), json.loads(queue)
        final_id = json.loads(final_event) if final_event else None
        if status in TERMINAL and final_id and not events.id_after(final_id, after):
            return  # the client resumed from past the end (a made-up Last-Event-ID): nothing will come
        if status in TERMINAL and not log_exists:
            # The log expired (EVENTS_TTL) before this client caught up: the record has the end.
            document = _final(svc, task_id)
            if document is not None and (final_id is None or events.id_after(final_id, after)):
                yield frame(status, document, final_id)
            return
        if status == QUEUED:
            now = (svc.store.queue_position(queue, task_id), json.loads(gpu) if gpu else None)
            if now != position:  # its place in line, or its GPU, changed: said without an id
                position = now
                yield frame(events.QUEUED, {"task_id": task_id, "status": "queued", "queue_position": now[0],
                                            "gpu": now[1]})
                last_write = time.monotonic()
        if time.monotonic() - last_write >= settings.sse_keepalive:
            yield ": keep-alive\n\n"  # also how a dropped client is noticed
            last_write = time.monotonic()


@blueprint.get("/tasks/<task_id>/events")
def task_events(task_id: str):
    svc = current_app.extensions["comfy"]
    task_id, record = load_task(task_id)
    last = _last_event_id()
    if last and record["status"] in TERMINAL:
        final_id = record.get("final_event")
        if final_id and not events.id_after(final_id, last):
            return Response(status=204)  # it saw the end: an EventSource stops reconnecting
    if not STREAMS.admit(svc.settings.sse_max_streams):
        raise ServiceError(503, "too_many_streams", "this API process has SSE_MAX_STREAMS event streams open; "
                           "retry, or poll GET /api/v1/tasks/{id}", {"limit": svc.settings.sse_max_streams},
                           headers={"Retry-After": "5"})
    # The stream needs no request context (it is handed `svc`): the server iterates it after
    # this view returns and closes it when the stream ends or the client goes away.
    first = events.submitted(record) if record["status"] == QUEUED else None
    return Response(_Body(_stream(svc, task_id, last or "0-0", first)), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
