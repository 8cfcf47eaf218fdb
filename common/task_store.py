"""Task records in Redis: the one truth the API shows, written by the API and the workers.

A record is a Redis hash whose fields are JSON values. Every status change goes through one
Lua script that checks the current status (and, for a worker's start, the queue) first, so a
cancel and a start cannot both win, a job moved to another GPU cannot also start on the old
one, and a terminal record never changes again (a job delivered twice shows one result).

The same script keeps the per-queue indexes that dispatch and failover read:
- `cs:queued:<queue>`  sorted set of waiting jobs (score: enqueue time) → queue position;
- `cs:running:<queue>` set of jobs a worker of that queue has started;
- `cs:load:<queue>`    hash job → cost of every job waiting or running there (backlog).
The rendered graphs a job runs live beside the record in `cs:payload:<id>`.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Iterable

import redis

from common import metrics

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
CANCEL_CHANNEL = "cs:cancel"

# KEYS[1] task hash. ARGV: [1] JSON list of allowed current statuses (JSON-encoded strings;
# "[]" = any non-terminal), [2] new status (JSON-encoded, "" = keep), [3] new queue (plain,
# "" = keep), [4] queue the caller requires the job to be on ("" = any), [5] now in ms,
# [6] worker instance the caller requires to own the job (JSON-encoded, "" = any),
# then field/value pairs. Returns {applied (0/1), status before (JSON) or ''}.
_TRANSITION = """
local key = KEYS[1]
local current = redis.call('HGET', key, 'status')
if not current then return {0, ''} end
local allowed = cjson.decode(ARGV[1])
local ok = false
if #allowed == 0 then
  ok = current ~= '"succeeded"' and current ~= '"failed"' and current ~= '"cancelled"'
else
  for _, s in ipairs(allowed) do if current == s then ok = true end end
end
local queue = cjson.decode(redis.call('HGET', key, 'queue'))
if ok and ARGV[4] ~= '' and ARGV[4] ~= queue then ok = false end
if ok and ARGV[6] ~= '' and ARGV[6] ~= redis.call('HGET', key, 'worker') then ok = false end
if not ok then return {0, current} end
local id = string.sub(key, 9)
local status = ARGV[2]
if status ~= '' then
  local target = queue
  if ARGV[3] ~= '' then target = ARGV[3] end
  if current == '"queued"' then redis.call('ZREM', 'cs:queued:' .. queue, id) end
  if current == '"running"' then redis.call('SREM', 'cs:running:' .. queue, id) end
  local cost = redis.call('HGET', key, 'cost') or '1'
  if target ~= queue then redis.call('HDEL', 'cs:load:' .. queue, id) end
  if status == '"queued"' then
    redis.call('ZADD', 'cs:queued:' .. target, ARGV[5], id)
    redis.call('HSET', 'cs:load:' .. target, id, cost)
  elseif status == '"running"' then
    redis.call('SADD', 'cs:running:' .. target, id)
    redis.call('HSET', 'cs:load:' .. target, id, cost)
  else
    redis.call('HDEL', 'cs:load:' .. target, id)
  end
  redis.call('HSET', key, 'status', status, 'queue', cjson.encode(target))
end
if #ARGV > 6 then redis.call('HSET', key, unpack(ARGV, 7)) end
return {1, current}
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_key(task_id: str) -> str:
    return f"cs:task:{task_id}"


def payload_key(task_id: str) -> str:
    return f"cs:payload:{task_id}"


def queued_key(queue: str) -> str:
    return f"cs:queued:{queue}"


def running_key(queue: str) -> str:
    return f"cs:running:{queue}"


def load_key(queue: str) -> str:
    return f"cs:load:{queue}"


def _encode(fields: dict) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value, separators=(",", ":"))]
    return flat


def decode_record(raw: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


class TaskStore:
    def __init__(self, client: redis.Redis, ttl: int):
        self.redis = client
        self.ttl = ttl
        self._transition = client.register_script(_TRANSITION)

    def create(self, record: dict, payload: dict) -> None:
        """Store a new queued job: its record, the graphs it runs, and its place in its queue."""
        task_id, queue = record["task_id"], record["queue"]
        key = task_key(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=dict(zip(*[iter(_encode(record))] * 2)))
        pipe.expire(key, self.ttl)
        pipe.set(payload_key(task_id), json.dumps(payload, separators=(",", ":")), ex=self.ttl)
        pipe.zadd(queued_key(queue), {task_id: time.time() * 1000})
        pipe.hset(load_key(queue), task_id, json.dumps(record.get("cost", 1.0)))
        metrics.job_submitted(pipe, record["workflow"])
        pipe.execute()

    def payload(self, task_id: str) -> dict | None:
        raw = self.redis.get(payload_key(task_id))
        return json.loads(raw) if raw else None

    def get(self, task_id: str) -> dict | None:
        raw = self.redis.hgetall(task_key(task_id))
        return decode_record(raw) if raw else None

    def get_many(self, task_ids: Iterable[str]) -> list[dict | None]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(task_key(task_id))
        return [decode_record(raw) if raw else None for raw in pipe.execute()]

    def queue_position(self, queue: str, task_id: str) -> int | None:
        """1 = the next job this GPU takes; None when the job no longer waits."""
        rank = self.redis.zrank(queued_key(queue), task_id)
        return None if rank is None else rank + 1

    def waiting(self, queue: str) -> list[str]:
        return [m.decode() for m in self.redis.zrange(queued_key(queue), 0, -1)]

    def running(self, queue: str) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(running_key(queue)))

    def transition(self, task_id: str, allowed: Iterable[str] = (), status: str | None = None,
                   queue: str | None = None, on_queue: str | None = None, owner: str | None = None,
                   **fields) -> tuple[bool, str | None]:
        """Move a job to `status` (and `queue`) if its status is one of `allowed` (default: any
        non-terminal), with `on_queue` it is on that queue, and with `owner` that worker
        instance started it (a worker that lost a job to failover cannot finish it); set
        `fields` alongside.

        Returns (applied, status before). A missing record gives (False, None).
        """
        allowed_json = json.dumps([json.dumps(s) for s in allowed])
        applied, before = self._transition(
            keys=[task_key(task_id)],
            args=[allowed_json, json.dumps(status) if status else "", queue or "", on_queue or "",
                  int(time.time() * 1000), json.dumps(owner) if owner else "", *_encode(fields)],
        )
        before = before.decode() if isinstance(before, bytes) else before
        if applied and status in TERMINAL:
            record = self.get(task_id) or {}
            metrics.job_finished(self.redis, record, status, fields.get("error"))
        return bool(applied), (json.loads(before) if before else None)

    def update(self, task_id: str, **fields) -> None:
        """Set fields without a status check (prompt id, attempt log)."""
        self.redis.hset(task_key(task_id), mapping=dict(zip(*[iter(_encode(fields))] * 2)))

    def request_cancel(self, task_id: str) -> None:
        self.update(task_id, cancel_requested=True)
        self.redis.publish(CANCEL_CHANNEL, task_id)
