"""Moving a job to a GPU again (the `requeue` transition): after its worker or its ComfyUI was
lost, or when its GPU stopped taking jobs. Used by the worker and the failover monitor."""
from __future__ import annotations

import logging

from celery import Celery

from common.dispatch import JobSpec, choose
from common.producer import send
from common.registry import Registry
from common.task_store import TaskStore, now_iso

log = logging.getLogger("comfy.jobs")


def job_spec(record: dict, exclude: frozenset[str] = frozenset()) -> JobSpec:
    pin = record.get("pin") or {}
    return JobSpec(workflow=record["workflow"], cost=float(record.get("cost", 1.0)),
                   checkpoint=record.get("checkpoint"), gpu=pin.get("gpu"), host=pin.get("host"), exclude=exclude)


def requeue(store: TaskStore, registry: Registry, celery: Celery, record: dict, *, reason: dict,
            avoid: str | None = None, must_move: bool = False, instance: str | None = None,
            to: str | None = None) -> str | None:
    """Move a job (waiting, handed or running) to the best healthy GPU, avoiding `avoid` when
    another fits; `instance` is the worker that has it (handed or running). `to`: that GPU's
    queue, chosen by the caller (the local autoscaler spreading a backlog over GPUs it started).

    With no healthy GPU at all the job waits on its own queue again, unless `must_move`
    (then nothing changes). Returns the new queue, or None if nothing was moved (no GPU with
    `must_move`, or the record changed under us: cancelled, finished, moved).
    `reason` is appended to the job's attempt log, which a final failure reports.
    """
    queue = to
    workers = registry.alive() if to is None else []
    if queue is None and avoid:
        queue = choose(workers, job_spec(record, frozenset({avoid})))
    queue = queue or choose(workers, job_spec(record))
    if queue is None:
        if must_move:
            return None
        queue = record["queue"]
    entry = {**reason, "at": now_iso(), "from": record["queue"], "to": queue}
    attempt_log = [*(record.get("attempt_log") or []), entry]
    moved = store.apply("requeue", record["task_id"], queue=record["queue"], to_queue=queue,
                        owner=record.get("owner", "anonymous"), instance=instance or record.get("worker"),
                        fields={"attempt_log": attempt_log, "started_at": None, "prompt_id": None, "worker": None,
                                "gpu": None, "progress": None, "waiting_reason": None},
                        event={"queue": queue, "from_queue": record["queue"], "reason": reason.get("code")})
    if not moved:
        log.info("task %s not moved: it is %s now", record["task_id"], moved.before)
        return None
    send(celery, record["task_id"], queue, {**record, "queue": queue})
    log.info("task %s moved %s → %s (%s)", record["task_id"], record["queue"], queue, reason.get("code"))
    return queue
