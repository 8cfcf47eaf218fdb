"""The Celery side both the API and the workers share: the app's configuration, and putting a
job on a GPU's queue. The API only sends (it imports nothing from `workers/`); workers build
the same app with their tasks included (workers/celery_app.py).

Configured for long GPU jobs on Redis (docs/operations.md says why for each line): late
acknowledgement so a job whose worker dies is delivered again, prefetch of one so a worker
holds only what it can start, a visibility timeout above the longest job so Redis does not
hand a running job to a second worker, task events on for Flower. No result backend: a job's
state, progress and outputs live in its task record and event log (common/task_store.py), and
Flower learns states from task events.
"""
from __future__ import annotations

import base64
import json
import uuid

from celery import Celery
from kombu import serialization

from common import broker, redis_conn
from common.settings import Settings, get_settings

RUN_WORKFLOW = "comfy.run_workflow"
# The GPU worker's thread pool that maps Flower's Terminate onto a cancel (workers/pool.py).
WORKER_POOL = "workers.pool:CancellingThreadPool"


def make_celery(settings: Settings | None = None, include: tuple[str, ...] = ()) -> Celery:
    settings = settings or get_settings()
    broker_url, sentinel_options = redis_conn.celery_broker(settings)  # REDIS_URL in kombu's form
    app = Celery("comfy_service", broker=broker_url)
    broker.install()  # kombu's Redis transports, hardened: a Redis restart or failover stops no worker
    app.conf.update(
        task_serializer="json", accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout, **sentinel_options},
        # A broker reconnect must not leave a late-ack job both running here and redelivered.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # Nothing reads Celery's results: the task record is the one home of a job's state.
        task_ignore_result=True,
        # No task-sent events: publishing them serialises every submit on one per-process lock
        # (half a submit's time in the benchmarks); Flower learns of a job from the worker's
        # task-received event instead.
        task_send_sent_event=False,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        # `celery -A workers.celery_app worker -Q gpu.<host>.<n>` gets the same pool as
        # `python -m workers`: threads (control commands answer while jobs run), one slot for
        # the running prompt and one for the next, already queued inside ComfyUI.
        worker_pool=WORKER_POOL,
        worker_concurrency=settings.worker_concurrency,
        # Jobs are always routed to a GPU queue by the dispatcher; nothing uses the default queue.
        task_default_queue="comfy.unrouted",
        task_create_missing_queues=True,
        include=list(include),
    )
    return app


def _summary(record: dict) -> str:
    params = record.get("params") or {}
    return repr({"workflow": record["workflow"], "seed": params.get("seed"),
                 "attempt": int(record.get("attempts", 0)) + 1})


def send(celery: Celery, task_id: str, queue: str, record: dict) -> None:
    """Put a job on a GPU's queue. The message carries only the task id (the graphs are in the
    job's payload key), so a job moves to another GPU by a new message, and Flower lists a
    one-line summary instead of kilobytes of graph."""
    celery.send_task(RUN_WORKFLOW, args=[task_id], task_id=task_id, queue=queue, kwargsrepr=_summary(record))


def message(celery: Celery, task_id: str, queue: str, record: dict) -> str:
    """The message `send` would publish, as kombu's Redis transport stores it in the queue's list
    (`keys.celery_queue`), for the submit script to push in the same step that creates the job
    (common/task_store.py): a job is never queued without its message, nor the other way round,
    and a submit skips kombu's per-publish connection handling. Celery builds the task message
    (protocol 2) and kombu serialises the body; only the envelope, fixed by kombu's transport
    (`Channel.prepare_message` and the anonymous exchange's `basic_publish`), is put together here.
    tests/test_producer.py compares it with what `send` publishes."""
    summary = _summary(record)
    headers, properties, body, _ = celery.amqp.as_task_v2(task_id, RUN_WORKFLOW, args=[task_id], kwargs={},
                                                          reply_to=celery.thread_oid, ignore_result=None,
                                                          kwargsrepr=summary)
    content_type, content_encoding, data = serialization.dumps(body, serializer="json")
    if isinstance(data, str):
        data = data.encode(content_encoding)
    return json.dumps({
        "body": base64.b64encode(data).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {**properties, "kwargsrepr": summary, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })
