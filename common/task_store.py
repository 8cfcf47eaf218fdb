"""Task records in Redis: the one truth the API shows, written by the API and the workers.

A record is a Redis hash whose fields are JSON values. State changes go through one Lua
script that checks the current status first, so a cancel and a worker's start cannot both
win, and a terminal record never changes again (a job delivered twice shows one result).
Waiting jobs also sit in a sorted set per GPU queue, which gives the queue position.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Iterable

import redis

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
CANCEL_CHANNEL = "cs:cancel"

# KEYS[1] task hash, KEYS[2] queued set of its queue; ARGV[1] JSON list of allowed current
# statuses ("[]" = any non-terminal); ARGV[2] 1 to drop it from the queued set; then field/value pairs.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local allowed = cjson.decode(ARGV[1])
local ok = false
if #allowed == 0 then
  ok = current ~= '"succeeded"' and current ~= '"failed"' and current ~= '"cancelled"'
else
  for _, s in ipairs(allowed) do if current == s then ok = true end end
end
if not ok then return {0, current} end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
if ARGV[2] == '1' then redis.call('ZREM', KEYS[2], string.match(KEYS[1], '^cs:task:(.*)$')) end
return {1, current}
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_key(task_id: str) -> str:
    return f"cs:task:{task_id}"


def queued_key(queue: str) -> str:
    return f"cs:queued:{queue}"


def _encode(fields: dict) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value, separators=(",", ":"))]
    return flat


def _decode(raw: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


class TaskStore:
    def __init__(self, client: redis.Redis, ttl: int):
        self.redis = client
        self.ttl = ttl
        self._transition = client.register_script(_TRANSITION)

    def create(self, record: dict, enqueued_at_ms: float) -> None:
        key = task_key(record["task_id"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=dict(zip(*[iter(_encode(record))] * 2)))
        pipe.expire(key, self.ttl)
        pipe.zadd(queued_key(record["queue"]), {record["task_id"]: enqueued_at_ms})
        pipe.execute()

    def get(self, task_id: str) -> dict | None:
        raw = self.redis.hgetall(task_key(task_id))
        return _decode(raw) if raw else None

    def get_many(self, task_ids: Iterable[str]) -> list[dict | None]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(task_key(task_id))
        return [_decode(raw) if raw else None for raw in pipe.execute()]

    def queue_position(self, queue: str, task_id: str) -> int | None:
        """1 = the next job this GPU takes; None when the job no longer waits."""
        rank = self.redis.zrank(queued_key(queue), task_id)
        return None if rank is None else rank + 1

    def transition(self, task_id: str, allowed: Iterable[str] = (), dequeue: bool = False,
                   queue: str = "", **fields) -> tuple[bool, str | None]:
        """Apply `fields` if the status is one of `allowed` (default: any non-terminal).

        Returns (applied, status before). A missing record gives (False, None).
        """
        allowed_json = json.dumps([json.dumps(s) for s in allowed])
        applied, before = self._transition(
            keys=[task_key(task_id), queued_key(queue)],
            args=[allowed_json, "1" if dequeue else "0", *_encode(fields)],
        )
        before = before.decode() if isinstance(before, bytes) else before
        return bool(applied), (json.loads(before) if before else None)

    def update(self, task_id: str, **fields) -> None:
        """Set fields without a status check (prompt id, attempt counters)."""
        self.redis.hset(task_key(task_id), mapping=dict(zip(*[iter(_encode(fields))] * 2)))

    def request_cancel(self, task_id: str) -> None:
        self.update(task_id, cancel_requested=True)
        self.redis.publish(CANCEL_CHANNEL, task_id)
