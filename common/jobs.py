"""Putting a job on a GPU queue: first dispatch (API) and every move after it (failover).

The Celery message carries only the task id; the graphs it runs are in the task's payload
key, so a job can be moved to another GPU by sending a new message, and Flower lists a
one-line summary instead of kilobytes of graph.
"""
from __future__ import annotations

import logging

from celery import Celery

from common.dispatch import JobSpec, choose
from common.registry import Registry
from common.task_store import QUEUED, TaskStore, now_iso

log = logging.getLogger("comfy.jobs")

RUN_WORKFLOW = "comfy.run_workflow"


def job_spec(record: dict, exclude: frozenset[str] = frozenset()) -> JobSpec:
    pin = record.get("pin") or {}
    return JobSpec(workflow=record["workflow"], cost=float(record.get("cost", 1.0)),
                   checkpoint=record.get("checkpoint"), gpu=pin.get("gpu"), host=pin.get("host"), exclude=exclude)


def send(celery: Celery, task_id: str, queue: str, record: dict) -> None:
    params = record.get("params") or {}
    celery.send_task(RUN_WORKFLOW, args=[task_id], task_id=task_id, queue=queue,
                     kwargsrepr=repr({"workflow": record["workflow"], "seed": params.get("seed"),
                                      "attempt": int(record.get("attempts", 0)) + 1}))


def requeue(store: TaskStore, registry: Registry, celery: Celery, record: dict, *, from_status: str,
            reason: dict, avoid: str | None = None, must_move: bool = False, owner: str | None = None) -> str | None:
    """Move a job (waiting or orphaned) to the best healthy GPU, avoiding `avoid` when another fits.

    With no healthy GPU at all the job waits on its own queue again, unless `must_move`
    (then nothing changes). Returns the new queue, or None if nothing was moved (no GPU with
    `must_move`, or the record changed under us: cancelled, finished, moved).
    `reason` is appended to the job's attempt log, which a final failure reports.
    """
    workers = registry.alive()
    queue = None
    if avoid:
        queue = choose(workers, job_spec(record, frozenset({avoid})))
    queue = queue or choose(workers, job_spec(record))
    if queue is None:
        if must_move:
            return None
        queue = record["queue"]
    log_entry = {**reason, "at": now_iso(), "from": record["queue"], "to": queue}
    attempt_log = [*(record.get("attempt_log") or []), log_entry]
    applied, before = store.transition(record["task_id"], allowed=(from_status,), status=QUEUED, queue=queue,
                                       on_queue=record["queue"], owner=owner, attempt_log=attempt_log, started_at=None,
                                       prompt_id=None, worker=None)
    if not applied:
        log.info("task %s not moved: it is %s now", record["task_id"], before)
        return None
    send(celery, record["task_id"], queue, {**record, "queue": queue})
    log.info("task %s moved %s → %s (%s)", record["task_id"], record["queue"], queue, reason.get("code"))
    return queue
