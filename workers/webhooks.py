"""The webhook worker: delivers the deliveries the API and GPU workers queue (common/webhooks.py).

Its own Celery app and queue (WEBHOOK_QUEUE), run by `python -m workers webhooks` or
`celery -A workers.webhooks worker -Q cs.webhooks --pool threads -c 8`: it never consumes a
GPU queue and a GPU worker never makes a webhook request, so a slow receiver delays nobody's
image. A failed attempt is retried as a new Celery message with a countdown that doubles
(WEBHOOK_BACKOFF … WEBHOOK_BACKOFF_MAX) up to WEBHOOK_MAX_ATTEMPTS; the final delivery's state
is written into the task record, where GET /api/v1/tasks/{id} shows it as `callback`.
"""
from __future__ import annotations

import logging
import threading
import time
from functools import cache

import requests
from celery import signals

from common import metrics, redis_conn, webhooks
from common.logs import setup_logging
from common.settings import get_settings
from common.task_store import TaskStore, now_iso
from common.task_view import task_document
from common.producer import make_celery

log = logging.getLogger("comfy.webhooks")

app = make_celery(include=())
app.conf.task_default_queue = get_settings().webhook_queue

_local = threading.local()


@signals.setup_logging.connect
def _setup_logging(**_):
    setup_logging("webhooks")


@cache
def _store() -> TaskStore:
    settings = get_settings()
    return TaskStore(redis_conn.connect(settings, health_check_interval=30, client_name="comfy-webhooks"),
                     settings.result_ttl, settings.events_ttl, outage_tolerance=settings.redis_outage_tolerance)


def _session() -> requests.Session:
    # One keep-alive session per pool thread (requests' Session is not meant to be shared).
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
        _local.session.trust_env = False  # no proxy from the environment between us and an allowed host
    return _local.session


def _record_state(store: TaskStore, task_id: str, **state) -> None:
    """The final delivery's state, in the record; settled (delivered, failed) leaves the owed
    set, retrying pushes its resend time past the retry."""
    retry_in = state.pop("retry_in", None)
    # One call: never recreates an expired record.
    store.webhook_state(task_id, state, None if retry_in is None else int((time.time() + retry_in) * 1000))


@app.task(bind=True, name=webhooks.DELIVER, acks_late=True, ignore_result=True)
def deliver(self, task_id: str, kind: str, msg_id: str, data: dict | None = None) -> str:
    settings, store = get_settings(), _store()
    record = store.get(task_id)
    if record is None or not record.get("callback"):
        log.info("webhook %s dropped: task %s has no record or callback", msg_id, task_id)
        store.redis.zrem(webhooks.PENDING, task_id)
        return "dropped"
    if kind in webhooks.FINAL and (record.get("webhook") or {}).get("state") in ("delivered", "failed"):
        log.info("webhook %s already settled; this copy is not sent", msg_id)  # a resend crossed it
        return "duplicate"
    final = kind in webhooks.FINAL
    url = record["callback"]["url"]
    attempt = self.request.retries + 1
    secrets = webhooks.parse_secrets(settings.webhook_secret.get_secret_value())
    try:  # again at delivery: the operator may have narrowed the allowlist since the submit
        webhooks.check_callback(url, webhooks.parse_allowlist(settings.webhook_allowed_hosts), bool(secrets))
    except webhooks.CallbackRejected as exc:
        log.warning("webhook %s for task %s not sent: %s", msg_id, task_id, exc.message)
        metrics.webhook_attempt(store.redis, kind, "rejected")
        if final:
            _record_state(store, task_id, state="failed", attempts=attempt - 1, last_status=None,
                          last_error=exc.message, delivered_at=None)
        return "rejected"
    payload = data if data is not None else task_document(record, None, settings.public_url)
    body = webhooks.envelope(kind, payload)
    status, error = None, None
    try:
        response = _session().post(url, data=body, headers=webhooks.sign_headers(secrets, msg_id, body),
                                   timeout=settings.webhook_timeout, allow_redirects=False)
        status = response.status_code
        response.close()
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    if status is not None and 200 <= status < 300:
        log.info("webhook %s (%s) delivered to %s on attempt %d", msg_id, kind, url, attempt)
        metrics.webhook_attempt(store.redis, kind, "delivered")
        if final:
            _record_state(store, task_id, state="delivered", attempts=attempt, last_status=status, last_error=None,
                          delivered_at=now_iso())
        return "delivered"
    error = error or f"HTTP {status}"
    # Progress is stale by the next event: one attempt. Everything else is retried.
    if kind != "progress" and webhooks.retryable(status) and attempt < settings.webhook_max_attempts:
        delay = webhooks.backoff(attempt, settings.webhook_backoff, settings.webhook_backoff_max)
        log.warning("webhook %s (%s) to %s failed on attempt %d (%s); again in %.1f s", msg_id, kind, url, attempt,
                    error, delay)
        metrics.webhook_attempt(store.redis, kind, "retrying")
        if final:
            _record_state(store, task_id, state="retrying", attempts=attempt, last_status=status, last_error=error,
                          delivered_at=None, retry_in=delay)
        raise self.retry(countdown=delay, max_retries=None)
    log.error("webhook %s (%s) to %s given up after %d attempt(s): %s", msg_id, kind, url, attempt, error)
    metrics.webhook_attempt(store.redis, kind, "failed")
    if final:
        _record_state(store, task_id, state="failed", attempts=attempt, last_status=status, last_error=error,
                      delivered_at=None)
    return "failed"


def main(argv: list[str]) -> None:
    settings = get_settings()
    app.worker_main([
        "worker", "-Q", settings.webhook_queue, "-n", "webhooks@%h", "--pool", "threads",
        "--concurrency", str(settings.webhook_concurrency), "-E", "--loglevel", settings.log_level,
        "--without-mingle", "--without-gossip", *argv,
    ])
