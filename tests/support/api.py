"""Small helpers for driving the HTTP API in tests."""
from __future__ import annotations

import time

import requests

LENA = {"name": "Lena", "description": "a young woman with red hair"}


def story(scenes=("[Lena] wakes up in a small flat", "[Lena] walks to the sea"), **fields) -> dict:
    return {"characters": [LENA], "scenes": list(scenes), "width": 256, "height": 256, **fields}


def submit(base: str, body: dict) -> dict:
    response = requests.post(base + "/api/v1/generate", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def wait_status(base: str, task_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 30.0,
                on_poll=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = requests.get(f"{base}/api/v1/tasks/{task_id}", timeout=5).json()
        if on_poll:
            on_poll(doc)
        if doc["status"] in statuses:
            return doc
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} still {doc['status']} after {timeout}s: {doc}")
        time.sleep(0.02)
