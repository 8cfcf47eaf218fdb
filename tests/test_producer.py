"""The submit script pushes a Celery message it was handed (common/producer.message): it must be
the message Celery itself publishes, so workers, Flower and `celery` commands see no difference."""
from __future__ import annotations

import json

import pytest

from common import keys
from common.producer import make_celery, message, send
from common.settings import Settings

RECORD = {"workflow": "storydiffusion", "params": {"seed": 7}, "attempts": 1}


@pytest.fixture
def celery(redis_server):
    return make_celery(Settings(REDIS_URL=redis_server.url))


def _published(redis_server, queue: str) -> dict:
    raw = redis_server.client().lrange(keys.celery_queue(queue), 0, -1)
    assert len(raw) == 1
    return json.loads(raw[0])


def test_built_message_is_the_one_celery_publishes(redis_server, celery):
    send(celery, "task-1", "gpu.a.0", RECORD)
    published = _published(redis_server, "gpu.a.0")
    built = json.loads(message(celery, "task-1", "gpu.a.0", RECORD))
    for envelope in (published, built):
        assert envelope["properties"].pop("delivery_tag")  # a fresh id per message
    assert built["headers"] == published["headers"]
    assert built == published


def test_each_message_has_its_own_delivery_tag(celery):
    first, second = (json.loads(message(celery, "task-1", "gpu.a.0", RECORD)) for _ in range(2))
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    assert first["headers"]["kwargsrepr"] == "{'workflow': 'storydiffusion', 'seed': 7, 'attempt': 2}"


def test_the_submit_script_queues_a_job_and_its_message_together_or_neither(redis_server, celery):
    """A job is never waiting without its message, nor a message without its job: the submit
    script pushes the message only when it creates the job (not when a cap refuses it, nor on an
    Idempotency-Key replay)."""
    from common.task_store import TaskStore

    client = redis_server.client()
    store = TaskStore(client, 3600)
    messages = lambda: client.llen(keys.celery_queue("gpu.a.0"))  # noqa: E731

    def submit(task_id: str, **options):
        record = {"task_id": task_id, "workflow": "storydiffusion", "queue": "gpu.a.0", "owner": "alice",
                  "params": {}, "created_at": "2026-01-01T00:00:00Z", "cost": 1.0}
        return store.create(record, {"graph": {}}, message=message(celery, task_id, "gpu.a.0", record), **options)

    assert submit("job-1", idempotency=("cs:test:idem", "first", 60)).outcome == "created"
    assert messages() == 1 and store.get("job-1")["status"] == "queued"
    assert submit("job-2", idempotency=("cs:test:idem", "second", 60)).outcome == "replay"
    assert submit("job-3", max_active_per_owner=1).outcome == "full"
    assert messages() == 1 and store.get("job-2") is None and store.get("job-3") is None
    queued = json.loads(client.lindex(keys.celery_queue("gpu.a.0"), 0))
    assert queued["headers"]["id"] == "job-1"
