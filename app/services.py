"""The parts one API process talks to, made once at start-up."""
from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery

from common import redis_conn
from common.registry import Registry
from common.settings import Settings
from common.storage import Storage, make_storage
from common.producer import make_celery
from common.task_store import TaskStore
from common.webhooks import Notifier
from workflows.catalog import Workflow, load_catalog


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: TaskStore
    registry: Registry
    storage: Storage
    celery: Celery
    catalog: dict[str, Workflow]
    events_redis: redis.Redis | None = None  # event streams' own pool (None: share `redis`)

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        # Blocking pools: under gevent hundreds of requests run at once, and redis-py's default
        # pool raises "Too many connections" past 100; these make a request wait for a free one.
        client = redis_conn.connect(settings, max_connections=settings.redis_max_connections, wait=5,
                                    socket_timeout=5, socket_connect_timeout=2, health_check_interval=30,
                                    client_name="comfy-api")
        # Event streams wait in XREAD BLOCK, each holding a connection: a pool of their own, one
        # connection per stream the process admits, so they never starve ordinary requests.
        events_client = redis_conn.connect(settings, max_connections=settings.sse_max_streams, wait=5,
                                           socket_timeout=10, socket_connect_timeout=2, health_check_interval=30)
        celery = make_celery(settings)
        notifier = Notifier(celery, settings.webhook_queue)
        store = TaskStore(client, settings.result_ttl, settings.events_ttl, notify=notifier.on_status)
        return cls(settings=settings, redis=client, store=store, registry=Registry(client, settings.heartbeat_ttl),
                   storage=make_storage(settings), celery=celery, catalog=load_catalog(), events_redis=events_client)
