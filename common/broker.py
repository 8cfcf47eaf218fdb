"""Celery's Redis transport, made to survive a Redis restart and a Sentinel failover.

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

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger("comfy.broker")
# Replies of a Redis that is in the middle of a Sentinel failover: a master with no replica in
# sync yet (min-replicas-to-write), a node that became a replica, or one that lost its master.
FAILOVER_REPLIES = ("NOREPLICAS", "READONLY", "MASTERDOWN")


def _failover_reply(exc: Exception) -> bool:
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(FAILOVER_REPLIES)


class QoS(kombu_redis.QoS):
    """Bookkeeping writes a failing-over Redis refuses for a few seconds must not stop the
    worker: restoring messages left unacked is retried at the next connection, and a message
    whose ack is refused comes back after the visibility timeout and is dropped (its job is
    final by then, and the task record says so)."""

    def restore_visible(self, *args, **kwargs):
        try:
            return super().restore_visible(*args, **kwargs)
        except redis.ResponseError as exc:
            if not _failover_reply(exc):
                raise
            log.warning("unacknowledged messages not restored now (%s); next time", exc)

    def ack(self, delivery_tag):
        try:
            return super().ack(delivery_tag)
        except redis.ResponseError as exc:
            if not _failover_reply(exc):
                raise
            log.warning("message %s not acknowledged (%s); it comes back after the visibility timeout and is "
                        "dropped, its job being final", delivery_tag, exc)


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
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_ClosesDespiteALostConnection, kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make these the transports of the `redis`, `rediss` and `sentinel` URL schemes in this
    process. Through kombu's alias table rather than Celery's `broker_transport`: on a lost
    connection kombu re-reads the transport from the URL (its failover switch), which would
    bring the stock classes back."""
    from kombu import transport

    for scheme, cls in (("redis", "Transport"), ("rediss", "Transport"), ("sentinel", "SentinelTransport")):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{cls}"
        transport._transport_cache.pop(scheme, None)
