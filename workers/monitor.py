"""Failover: find jobs stranded by a dead worker, GPU or ComfyUI, and move them.

Runs inside every worker's heartbeat thread; a short Redis lock lets one of them act per
round. Two cases, both decided by pure functions below and acted on by `Monitor`:

- a job a worker started but whose worker process is no longer alive (its heartbeat expired,
  or a new process took over the queue): started again on a healthy GPU, up to MAX_ATTEMPTS
  starts, then failed with the attempt log (a job that kills its worker every time stops);
- jobs waiting on a queue whose worker is dead or draining: moved to healthy queues, and the
  stale Celery messages left in the dead queue are removed.

And one for webhooks: a finished job's final webhook still unsettled after WEBHOOK_RESEND_AFTER
(its Celery message was lost) is queued again.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from celery import Celery

from common import keys, metrics
from common.jobs import requeue
from common.lifecycle import State, state_of
from common.registry import Registry
from common.task_store import FAILED, TERMINAL, TaskStore, now_iso

log = logging.getLogger("comfy.monitor")
LOCK = keys.MONITOR_LOCK


def _age_seconds(iso: str | None, now: datetime) -> float:
    if not iso:
        return float("inf")
    return (now - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds()


def is_orphan(record: dict, beat: dict | None, grace: float, now: datetime) -> bool:
    """A job a worker took (handed to ComfyUI or running) whose worker process is gone: no live
    heartbeat for its queue, or a live one from another process (the worker restarted).
    `grace` covers a job just taken."""
    if state_of(record) not in (State.HANDED, State.RUNNING):
        return False
    if _age_seconds(record.get("started_at") or record.get("handed_at"), now) < grace:
        return False
    return beat is None or beat.get("instance") != record.get("worker")


def needs_moving(beat: dict | None) -> bool:
    """Waiting jobs leave a queue whose worker is dead or draining."""
    return beat is None or bool(beat.get("draining"))


class Monitor:
    def __init__(self, store: TaskStore, registry: Registry, celery: Celery, instance: str,
                 max_attempts: int, interval: float, comfy_cancel=None, notifier=None, webhook_resend_after=300.0):
        self.store, self.registry, self.celery = store, registry, celery
        self.instance, self.max_attempts, self.interval = instance, max_attempts, interval
        self.comfy_cancel = comfy_cancel  # (comfyui_url, prompt_id) → None; best effort
        self.notifier, self.webhook_resend_after = notifier, webhook_resend_after

    def run_once(self) -> None:
        redis = self.store.redis
        if not redis.set(LOCK, self.instance, nx=True, px=max(int(self.interval * 900), 100)):
            return
        alive = {w["queue"]: w for w in self.registry.alive()}
        now = datetime.now(timezone.utc)
        for queue in self.registry.known_queues():
            beat = alive.get(queue)
            for record in filter(None, self.store.get_many(self.store.taken(queue))):
                if is_orphan(record, beat, grace=2 * self.interval, now=now):
                    self._restart_orphan(record, queue)
            if needs_moving(beat):
                self._move_waiting(queue)
        if self.notifier is not None:
            self._resend_owed_webhooks()

    def _resend_owed_webhooks(self) -> None:
        """Final webhooks owed for WEBHOOK_RESEND_AFTER with no attempt settled: the message that
        queued them was lost (its sender died after the transition). Queued again, same id."""
        redis = self.store.redis
        now_ms = int(time.time() * 1000)
        cutoff = now_ms - int(self.webhook_resend_after * 1000)
        owed = [m.decode() for m in redis.zrangebyscore(keys.WEBHOOKS_PENDING, "-inf", cutoff, start=0, num=100)]
        for task_id, record in zip(owed, self.store.get_many(owed)):
            settled = (record or {}).get("webhook", {}) or {}
            if record is None or record.get("status") not in TERMINAL or not record.get("callback") \
                    or settled.get("state") in ("delivered", "failed"):
                redis.zrem(keys.WEBHOOKS_PENDING, task_id)
                continue
            self.notifier.send(task_id, record["status"])
            redis.zadd(keys.WEBHOOKS_PENDING, {task_id: now_ms})
            log.warning("task %s: its %s webhook was not settled after %.0f s; queued again", task_id,
                        record["status"], self.webhook_resend_after)

    def _restart_orphan(self, record: dict, queue: str) -> None:
        task_id = record["task_id"]
        attempts = int(record.get("attempts", 0))
        entry = {"code": "worker_lost", "gpu": queue, "message": "the worker running the job died"}
        if record.get("prompt_id") and record.get("comfyui") and self.comfy_cancel:
            self.comfy_cancel(record["comfyui"], record["prompt_id"])  # its ComfyUI may still run it
        if attempts >= self.max_attempts:
            attempt_log = [*(record.get("attempt_log") or []), {**entry, "at": now_iso()}]
            error = {"source": "service", "code": "worker_lost",
                     "message": f"the job's worker died during each of its {attempts} attempts; not retried again",
                     "details": {"attempts": attempt_log}}
            done = self.store.apply("fail", task_id, queue=queue, owner=record.get("owner", "anonymous"),
                                    instance=record.get("worker"), event={"queue": queue},
                                    fields={"finished_at": now_iso(), "error": error, "attempt_log": attempt_log},
                                    metric_ops=metrics.finished_ops(record, FAILED, error))
            if done:
                log.warning("task %s failed: its worker died %d times", task_id, attempts)
            return
        log.warning("task %s: worker on %s is gone; starting it again", task_id, queue)
        requeue(self.store, self.registry, self.celery, record, reason=entry, avoid=queue,
                instance=record.get("worker"))

    def _move_waiting(self, queue: str) -> None:
        moved = 0
        for record in filter(None, self.store.get_many(self.store.waiting(queue))):
            if state_of(record) == State.WAITING and record.get("queue") == queue:
                if requeue(self.store, self.registry, self.celery, record, must_move=True,
                           reason={"code": "gpu_unavailable", "gpu": queue,
                                   "message": "its GPU stopped taking jobs"}, avoid=queue):
                    moved += 1
        self._purge_stale_messages(queue)
        if moved:
            log.warning("moved %d waiting job(s) off %s", moved, queue)

    def _purge_stale_messages(self, queue: str) -> None:
        """Drop Celery messages in `queue` whose job no longer waits there (moved, cancelled, done)."""
        redis = self.store.redis
        messages = []
        for raw in redis.lrange(queue, 0, -1):
            try:
                messages.append((raw, json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
        records = self.store.get_many(task_id for _, task_id in messages)  # one round trip for all
        for (raw, _), record in zip(messages, records):
            if record is None or state_of(record) != State.WAITING or record.get("queue") != queue:
                redis.lrem(queue, 1, raw)
