"""What a job keeps in Redis reads back even when its workflow's compression dictionary left
Redis (evicted, deleted): the process's own workflows make it again (common/compact.py)."""
from __future__ import annotations

import uuid

import redis

from common import compact, keys
from common.task_store import TaskStore
from workflows.catalog import load_catalog
from workflows.render import payload_dictionary, render, resolve_seed


def test_a_job_reads_back_after_its_dictionary_left_redis(redis_server, monkeypatch):
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)
    workflow = load_catalog()["storydiffusion"]
    params = resolve_seed(workflow.parse({"characters": [{"name": "Lena", "description": "a woman"}],
                                          "scenes": ["[Lena] reads a letter"]}))
    rendered = render(workflow, params, output_prefix="cs_x")
    dictionary = payload_dictionary(workflow)
    task_id = str(uuid.uuid4())
    store.create({"task_id": task_id, "workflow": "storydiffusion", "queue": "gpu.a.0", "owner": "o",
                  "params": rendered.params, "created_at": "2026-01-01T00:00:00Z", "cost": rendered.cost},
                 {"graph": rendered.api, "ui": rendered.ui}, dictionary=dictionary)
    assert client.delete(keys.payload_dictionary(compact.dictionary_id(dictionary))) == 1
    monkeypatch.setattr(compact.Dictionaries, "_cache", dict(compact.KNOWN))  # a process that never saw it

    assert store.payload(task_id)["graph"] == rendered.api
    assert store.get(task_id)["params"] == rendered.params
