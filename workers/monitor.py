"""Failover and reconciliation: every job a worker has taken is accounted for by reality, and
jobs stranded by a dead or draining GPU are moved.

Runs on every worker's monitor thread (workers/runtime.py); a short Redis lock lets one of
them act per round. Decisions are pure (common/reconcile.py, `needs_moving` below); `Monitor`
acts:

- a job its worker does not account for (dead, replaced by a new process, or alive but no
  longer listing it in its heartbeat) past RECONCILE_GRACE is checked against its ComfyUI:
  still there → wait; finished → its outputs are collected (no second run); failed → failed;
  lost → a new attempt on another GPU, up to MAX_ATTEMPTS, then failed with the attempt log;
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

from common import keys, metrics, reconcile
from common.jobs import requeue
from common.lifecycle import State, state_of
from common.registry import Registry
from common.task_store import FAILED, TERMINAL, TaskStore, now_iso

log = logging.getLogger("comfy.monitor")
LOCK = keys.MONITOR_LOCK
LOST_MESSAGE_AGE = 10.0  # seconds a job waits before a missing Celery message counts as lost


def needs_moving(beat: dict | None) -> bool:
    """Waiting jobs leave a queue whose worker is dead or draining."""
    return beat is None or bool(beat.get("draining"))


class Monitor:
    def __init__(self, store: TaskStore, registry: Registry, celery: Celery, instance: str,
                 max_attempts: int, interval: float, comfy_cancel=None, notifier=None, webhook_resend_after=300.0,
                 grace: float | None = None, job_timeout: float = 3600.0, collect=None, comfy_view=None):
        self.store, self.registry, self.celery = store, registry, celery
        self.instance, self.max_attempts, self.interval = instance, max_attempts, interval
        self.comfy_cancel = comfy_cancel  # (comfyui_url, prompt_id) → None; best effort
        self.notifier, self.webhook_resend_after = notifier, webhook_resend_after
        self.grace = 2 * interval if grace is None else grace
        self.job_timeout = job_timeout
        self.collect = collect  # record → outcome: finish a job from its ComfyUI's outputs
        self.comfy_view = comfy_view or prompt_state  # (comfyui_url, prompt_id) → a reconcile.* state

    def run_once(self) -> None:
        redis = self.store.redis
        if not redis.set(LOCK, self.instance, nx=True, px=max(int(self.interval * 900), 100)):
            return
        alive = {w["queue"]: w for w in self.registry.alive()}
        now = datetime.now(timezone.utc)
        queues = self.registry.known_queues()
        self.store.adopt_legacy_totals(queues)
        counts = self.store.queue_counts()
        in_hand = self._unacked_in_hand(counts)
        for queue in queues:
            beat = alive.get(queue)
            for record in filter(None, self.store.get_many(self.store.taken(queue))):
                if reconcile.suspect(record, beat, now, self.grace):
                    self._settle(record, queue, beat, now)
            if needs_moving(beat):
                self._move_waiting(queue)
            else:
                self._recover_lost_messages(queue, in_hand.get(queue, set()), counts.get(queue, (0,))[0])
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

    def _settle(self, record: dict, queue: str, beat: dict | None, now: datetime) -> None:
        task_id = record["task_id"]
        url, prompt_id = record.get("comfyui"), record.get("prompt_id")
        comfy = self.comfy_view(url, prompt_id) if url and prompt_id else reconcile.ABSENT
        alive = not reconcile.worker_gone(record, beat)
        decision = reconcile.settle(record, comfy, now=now, max_attempts=self.max_attempts,
                                    job_timeout=self.job_timeout, worker_alive=alive)
        if decision.action == reconcile.WAIT:
            return
        log.warning("task %s on %s: %s → %s", task_id, queue, decision.message, decision.action)
        owner, worker = record.get("owner", "anonymous"), record.get("worker")
        if decision.action == reconcile.COLLECT and self.collect is not None:
            # Counted first: a collection that kills its collector must not loop for ever.
            counted = self.store.apply("collect", task_id, queue=queue, owner=owner, instance=worker,
                                       metric_ops=[("hincrby", keys.task(task_id), "collect_attempts", 1)],
                                       want_record=True)
            if counted:
                log.info("task %s collected from %s: %s", task_id, url, self.collect(counted.record))
            return
        if decision.action in (reconcile.TIMEOUT, reconcile.REQUEUE, reconcile.GIVE_UP) and self.comfy_cancel:
            if url and prompt_id and comfy not in (reconcile.ABSENT, reconcile.SUCCEEDED, reconcile.FAILED):
                self.comfy_cancel(url, prompt_id)  # never leave it to run on beside its next attempt
        if decision.action == reconcile.CANCEL:
            self.store.apply("cancel_run", task_id, queue=queue, owner=owner, instance=worker, event={"queue": queue},
                             fields={"finished_at": now_iso()}, metric_ops=metrics.finished_ops(record, "cancelled"))
            return
        entry = {"code": decision.code, "gpu": queue, "message": decision.message}
        if decision.action == reconcile.REQUEUE:
            requeue(self.store, self.registry, self.celery, record, reason=entry, avoid=queue, instance=worker)
            return
        attempt_log = [*(record.get("attempt_log") or []), {**entry, "at": now_iso()}]
        source = "comfyui" if decision.action == reconcile.FAIL else "service"
        error = {"source": source, "code": decision.code, "message": decision.message,
                 "details": {"attempts": attempt_log, "prompt_id": prompt_id}}
        done = self.store.apply("fail", task_id, queue=queue, owner=owner, instance=worker, event={"queue": queue},
                                fields={"finished_at": now_iso(), "error": error, "attempt_log": attempt_log},
                                metric_ops=metrics.finished_ops(record, FAILED, error))
        if done:
            log.warning("task %s failed: %s", task_id, decision.message)

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

    def _unacked_in_hand(self, counts: dict[str, tuple[int, int, int, int]]) -> dict[str, set[str]]:
        """Waiting jobs whose Celery message a worker holds and is about to hand over (delivered
        less than LOST_MESSAGE_AGE ago), by queue. `counts`: every queue's counters.

        Taken jobs' messages stay unacknowledged while they run; while kombu's unacked hash holds
        no more than those, nothing is read. Otherwise every unacknowledged message is read, and
        those older than LOST_MESSAGE_AGE that no taken job accounts for are dropped: an ack
        refused during a Redis outage, or a message a killed worker had not handed over yet.
        Kombu would restore them only after the visibility timeout (hours), and counting them
        as present hid a waiting job whose own message was lost for as long."""
        redis = self.store.redis
        taken = sum(max(handed, 0) + max(running, 0) for _, handed, running, _ in counts.values())
        if int(redis.hlen(keys.CELERY_UNACKED)) <= taken:
            return {}
        with redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.CELERY_UNACKED).zrange(keys.CELERY_UNACKED_INDEX, 0, -1, withscores=True)
            entries, delivered = pipe.execute()
        delivered = {tag.decode(): at for tag, at in delivered}
        held = []  # (delivery tag, task id, queue, delivered at)
        for tag, raw in entries.items():
            tag = tag.decode()
            try:
                message, _exchange, routing_key = json.loads(raw)
                held.append((tag, message["headers"]["id"], routing_key, delivered.get(tag, 0.0)))
            except (ValueError, KeyError, TypeError):
                continue  # not a message this service sent: not ours to judge
        cutoff = time.time() - LOST_MESSAGE_AGE
        in_hand: dict[str, set[str]] = {}
        stale = []
        for (tag, task_id, queue, at), record in zip(held, self.store.get_many(t for _, t, _, _ in held)):
            state = state_of(record) if record else None
            if state in (State.HANDED, State.RUNNING):
                # Its worker runs it (from this queue, or drained from it by `add_consumer`); a
                # dead worker's job is reconciled from its record (common/reconcile.py).
                continue
            if at > cutoff:
                if state == State.WAITING and record.get("queue") == queue:
                    in_hand.setdefault(queue, set()).add(task_id)
                continue  # just delivered: let its worker act on it
            stale.append(tag)
        if stale:
            with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.CELERY_UNACKED, *stale).zrem(keys.CELERY_UNACKED_INDEX, *stale)
                pipe.execute()
            log.warning("dropped %d unacknowledged Celery message(s) no worker will act on (a refused ack, or a "
                        "message a gone worker held)", len(stale))
        return in_hand

    def _recover_lost_messages(self, queue: str, in_hand: set[str], waiting: int) -> None:
        """A job waiting for its GPU whose Celery message is gone (a Redis failover can keep the
        record and lose the message, or lose a worker's hand-over after it took the message; a
        killed worker takes the message it held with it) would wait for ever: sent again. Cheap
        while nothing is missing: the queue's messages plus the ones its worker is handing over
        (`in_hand`, Monitor._unacked_in_hand) cover its waiting jobs, and no message is read."""
        redis = self.store.redis
        if waiting <= 0 or redis.llen(keys.celery_queue(queue)) + len(in_hand) >= waiting:
            return
        cutoff = (time.time() - LOST_MESSAGE_AGE) * 1000  # not a message in flight between two lists
        old = [m.decode() for m in redis.zrangebyscore(keys.waiting(queue), "-inf", cutoff)]
        if not old:
            return
        present = set(in_hand)
        for raw in redis.lrange(keys.celery_queue(queue), 0, -1):
            try:
                present.add(json.loads(raw)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue
        for record in filter(None, self.store.get_many(t for t in old if t not in present)):
            if state_of(record) == State.WAITING and record.get("queue") == queue:
                log.warning("task %s waits on %s but its Celery message is gone; sending it again", record["task_id"],
                            queue)
                requeue(self.store, self.registry, self.celery, record, reason={
                    "code": "message_lost", "gpu": queue, "message": "its Celery message was lost"})

    def _purge_stale_messages(self, queue: str) -> None:
        """Drop Celery messages in `queue` whose job no longer waits there (moved, cancelled, done)."""
        redis = self.store.redis
        messages = []
        for raw in redis.lrange(keys.celery_queue(queue), 0, -1):
            try:
                messages.append((raw, json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
        records = self.store.get_many(task_id for _, task_id in messages)  # one round trip for all
        for (raw, _), record in zip(messages, records):
            if record is None or state_of(record) != State.WAITING or record.get("queue") != queue:
                redis.lrem(keys.celery_queue(queue), 1, raw)


def prompt_state(url: str, prompt_id: str) -> str:
    """What a ComfyUI knows of a prompt: running, pending, succeeded, failed, interrupted,
    absent, or unreachable (common/reconcile.py). /queue first, then /history: a prompt that
    finishes between the two reads is found in the second."""
    from workers.comfy_client import ComfyClient, ComfyError

    try:
        with ComfyClient(url, timeout=3.0) as client:
            queue = client.queue()
            if prompt_id in queue.running_ids():
                return reconcile.RUNNING
            if prompt_id in queue.pending_ids():
                return reconcile.PENDING
            entry = client.history(prompt_id)
    except ComfyError:
        return reconcile.UNREACHABLE
    if entry is None:
        return reconcile.ABSENT
    kinds = {kind for kind, _ in entry.messages}
    if "execution_interrupted" in kinds:
        return reconcile.INTERRUPTED
    if entry.status_str == "success" or ("execution_success" in kinds and "execution_error" not in kinds):
        return reconcile.SUCCEEDED
    return reconcile.FAILED
