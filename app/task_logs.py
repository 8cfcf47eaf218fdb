"""GET /api/v1/tasks/{task_id}/logs: one run's log lines — ComfyUI's and the worker's.

The worker collects them while the job runs (`workers/joblogs.py`: how ComfyUI's untagged lines
are attributed to jobs, and its limits) into the capped Redis list ``cs:logs:<task_id>``, and
moves that list to the output storage (`<task_id>/log.jsonl`) once the run ended: this reads both.
"""
from __future__ import annotations

import json

from flask import Blueprint, current_app, jsonify

from app.security import load_task
from common.logs import job_log_key
from common.storage import log_key

blueprint = Blueprint("task_logs", __name__)


@blueprint.get("/tasks/<task_id>/logs")
def get_task_logs(task_id: str):
    svc = current_app.extensions["comfy"]
    task_id, _ = load_task(task_id)  # 404 unless the task exists and the caller's key owns it
    # The list first: a line reaches storage before it leaves the list, so a move in between
    # shows a line twice (dropped below), never not at all.
    listed = svc.redis.lrange(job_log_key(task_id), 0, -1)
    stored = (svc.storage.get(log_key(task_id)) or b"").splitlines()
    lines = []
    for item in dict.fromkeys([*stored, *listed]):
        try:
            line = json.loads(item)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append({"t": line.get("t"), "source": line.get("source"), "m": line.get("m")})
    # Arrival order differs from time order (ComfyUI flushes its log in batches): sort, stably.
    lines.sort(key=lambda line: line["t"] or "")
    return jsonify({"task_id": task_id, "lines": lines})
