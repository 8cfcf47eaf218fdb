"""Celery's Redis transport, made to survive a Redis restart.

When the broker connection drops while a late-acknowledged job runs, Celery closes the broken
connection, and kombu's channel tries to put the job's unacknowledged message back on its
queue through that same, already dismantled connection: an AttributeError that Celery takes
for an "Unrecoverable error" and the whole worker shuts down (kombu 5.7; kombu#970, #582 are
the same family). The message need not go back: it stays in Redis' unacked set (restored after
the visibility timeout), the job's thread keeps running and records its outcome once Redis is
back (common/task_store.py waits out the outage), and the failover monitor accounts for every
taken job (common/reconcile.py). So the channel closes without it, saying so.
"""
from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger("comfy.broker")


class _ClosesDespiteALostConnection:
    """A channel whose connection was dismantled by a reconnect: closing it, or acknowledging
    a message it delivered (the job finished after Redis came back), must not stop the worker."""

    def close(self):
        try:
            super().close()
        except AttributeError as exc:
            log.warning("broker channel closed without restoring its unacknowledged message(s) (%s); they stay "
                        "in Redis' unacked set, and the task records account for their jobs", exc)

    def basic_ack(self, delivery_tag, multiple=False):
        try:
            super().basic_ack(delivery_tag, multiple=multiple)
        except AttributeError as exc:
            log.warning("message %s not acknowledged: its broker connection was replaced (%s); it comes back "
                        "after the visibility timeout and is dropped, its job being final", delivery_tag, exc)

    def basic_reject(self, delivery_tag, requeue=False):
        try:
            super().basic_reject(delivery_tag, requeue=requeue)
        except AttributeError as exc:
            log.warning("message %s not rejected: its broker connection was replaced (%s)", delivery_tag, exc)


class Channel(_ClosesDespiteALostConnection, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_ClosesDespiteALostConnection, kombu_redis.SentinelChannel):
    pass


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str | None:
    """The transport class for a broker URL, as Celery's `broker_transport` names it."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "redis+socket", "unix"):
        return f"{__name__}:Transport"
    if scheme == "sentinel":
        return f"{__name__}:SentinelTransport"
    return None
