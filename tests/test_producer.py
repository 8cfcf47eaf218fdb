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
