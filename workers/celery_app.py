"""The Celery application shared by the API (to send jobs) and the GPU workers (to run them).

Configured for long GPU jobs on Redis (see docs/operations.md for the why of each line):
late acknowledgement so a job whose worker dies is delivered again, prefetch of one so a
worker holds only what it can start, a visibility timeout above the longest job so Redis
does not hand a running job to a second worker, task events on for Flower.
"""
from __future__ import annotations

from celery import Celery

from common.settings import get_settings

from common.jobs import RUN_WORKFLOW  # noqa: F401 - the task name lives with enqueueing


def make_celery(settings=None, include: tuple[str, ...] = ("workers.tasks",)) -> Celery:
    settings = settings or get_settings()
    app = Celery("comfy_service", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        # A broker reconnect must not leave a late-ack job both running here and redelivered.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        result_expires=settings.result_ttl,
        result_extended=True,
        task_track_started=True,
        # No task-sent events: publishing them serialises every submit on one per-process lock
        # (half a submit's time in the benchmarks); Flower learns of a job from the worker's
        # task-received event instead.
        task_send_sent_event=False,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        # `celery -A workers.celery_app worker -Q gpu.<host>.<n>` gets the same pool as
        # `python -m workers`: threads (control commands answer while jobs run), one slot for
        # the running prompt and one for the next, already queued inside ComfyUI.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        # Jobs are always routed to a GPU queue by the dispatcher; nothing uses the default queue.
        task_default_queue="comfy.unrouted",
        task_create_missing_queues=True,
        include=list(include),
    )
    return app


app = make_celery()
