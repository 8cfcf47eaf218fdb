"""Task records in Redis: the one truth the API shows, written by the API and the workers.

A record is a Redis hash whose fields are JSON values. Every status change goes through one
Lua script that checks the current status (and, for a worker's start, the queue) first, so a
cancel and a start cannot both win, a job moved to another GPU cannot also start on the old
one, and a terminal record never changes again (a job delivered twice shows one result).

The same script keeps the per-queue indexes that dispatch and failover read:
- `cs:queued:<queue>`  sorted set of waiting jobs (score: enqueue time) → queue position;
- `cs:running:<queue>` set of jobs a worker of that queue has started;
- `cs:load:<queue>`    hash job → cost of every job waiting or running there (backlog).
The rendered graphs a job runs live beside the record in `cs:payload:<id>` (kept EVENTS_TTL
once the job ended).
Both scripts also append the status change to the job's event log (common/events.py), in the
same step, so the event stream and webhooks see exactly the transitions the record went through.

And the active-job sets the submission caps count (MAX_ACTIVE_JOBS, MAX_ACTIVE_JOBS_PER_KEY):
`cs:active` and `cs:active:<owner>` hold every job not yet finished. A job enters them in the
create script (which checks the caps and creates in one step, so concurrent submits cannot
overshoot) and leaves them in the transition script when it reaches a terminal status,
whichever path gets it there (cancel, success, failure, failover giving up).
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Callable, Iterable

import redis

from common import metrics

log = logging.getLogger("comfy.tasks")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
CANCEL_CHANNEL = "cs:cancel"

# KEYS[1] task hash. ARGV: [1] JSON list of allowed current statuses (JSON-encoded strings;
# "[]" = any non-terminal), [2] new status (JSON-encoded, "" = keep), [3] new queue (plain,
# "" = keep), [4] queue the caller requires the job to be on ("" = any), [5] now in ms,
# [6] worker instance the caller requires to own the job (JSON-encoded, "" = any),
# [7] seconds a finished job's event log is kept, then field/value pairs.
# Returns {applied (0/1), status before (JSON) or '', the record's callback (JSON) or ''}.
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
if not ok then return {0, current, ''} end
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
    local owner = redis.call('HGET', key, 'owner')
    owner = owner and cjson.decode(owner) or 'anonymous'
    redis.call('SREM', 'cs:active', id)
    redis.call('SREM', 'cs:active:' .. owner, id)
  end
  redis.call('HSET', key, 'status', status, 'queue', cjson.encode(target))
  local kind = cjson.decode(status)
  if kind == 'running' then kind = 'started' end
  local events = 'cs:events:' .. id
  local event = redis.call('XADD', events, 'MAXLEN', '~', 10000, '*', 'type', kind,
                          'data', cjson.encode({queue = target, from_queue = queue}))
  if kind == 'succeeded' or kind == 'failed' or kind == 'cancelled' then
    -- The record remembers its final event's id: a stream read after the log expired still
    -- tells a client that saw it (Last-Event-ID) from one that did not.
    redis.call('HSET', key, 'final_event', cjson.encode(event))
    redis.call('EXPIRE', events, tonumber(ARGV[7]))
    -- Nothing runs the graphs again (failover is over): keep them as briefly as the events.
    local payload = 'cs:payload:' .. id
    if redis.call('TTL', payload) > tonumber(ARGV[7]) then redis.call('EXPIRE', payload, tonumber(ARGV[7])) end
    -- A final webhook is owed from now until the webhook worker settles it: if the message
    -- queueing it is lost (a process dies right after this script), the monitor sends it again.
    local callback = redis.call('HGET', key, 'callback')
    if callback and callback ~= 'null' then redis.call('ZADD', 'cs:webhooks:pending', ARGV[5], id) end
  else
    local ttl = redis.call('PTTL', key)
    if ttl > 0 then redis.call('PEXPIRE', events, ttl) end
  end
end
if #ARGV > 7 then redis.call('HSET', key, unpack(ARGV, 8)) end
return {1, current, redis.call('HGET', key, 'callback') or ''}
"""


# Creating a job, atomically with its admission checks.
# KEYS: [1] task hash, [2] payload, [3] cs:queued:<queue>, [4] cs:load:<queue>, [5] cs:active,
# [6] cs:active:<owner>, [7] (optional) the caller's idempotency key.
# ARGV: [1] record TTL s, [2] payload JSON, [3] enqueue time ms, [4] cost, [5] task id,
# [6] cap overall (0 = none), [7] cap per owner (0 = none), [8] idempotency value,
# [9] idempotency TTL s, then the record's field/value pairs.
# Returns {1} created, {2, value} the idempotency key already names a task (nothing created),
# {3, scope, active, cap} a cap is reached (nothing created).
_CREATE = """
local function terminal(s)
  return (not s) or s == '"succeeded"' or s == '"failed"' or s == '"cancelled"'
end
-- A member whose record expired or ended without passing the transition script (it should
-- not happen) would hold a slot forever: prune such members when the cap is reached, at most
-- every few seconds per set.
local function full(set, cap)
  if cap <= 0 then return false end
  if redis.call('SCARD', set) < cap then return false end
  if redis.call('SET', set .. ':pruned', '1', 'NX', 'EX', 5) then
    for _, id in ipairs(redis.call('SMEMBERS', set)) do
      if terminal(redis.call('HGET', 'cs:task:' .. id, 'status')) then redis.call('SREM', set, id) end
    end
  end
  return redis.call('SCARD', set) >= cap
end
if #KEYS >= 7 then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {2, existing} end
end
local owner_cap, total_cap = tonumber(ARGV[7]), tonumber(ARGV[6])
if full(KEYS[6], owner_cap) then return {3, 'key', redis.call('SCARD', KEYS[6]), owner_cap} end
if full(KEYS[5], total_cap) then return {3, 'service', redis.call('SCARD', KEYS[5]), total_cap} end
local ttl = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
redis.call('HSET', KEYS[4], ARGV[5], ARGV[4])
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('SADD', KEYS[6], ARGV[5])
if #KEYS >= 7 then redis.call('SET', KEYS[7], ARGV[8], 'EX', tonumber(ARGV[9])) end
local events = 'cs:events:' .. ARGV[5]
redis.call('XADD', events, 'MAXLEN', '~', 10000, '*', 'type', 'queued',
           'data', cjson.encode({queue = string.sub(KEYS[3], 11)}))
redis.call('EXPIRE', events, ttl)
return {1}
"""

ACTIVE = "cs:active"


def active_key(owner: str | None = None) -> str:
    return f"{ACTIVE}:{owner}" if owner else ACTIVE


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


# Called after a status change of a job that has a callback: (task id, new status, callback).
Notify = Callable[[str, str, dict], None]


class TaskStore:
    def __init__(self, client: redis.Redis, ttl: int, events_ttl: int = 3600, notify: Notify | None = None):
        self.redis = client
        self.ttl = ttl
        self.events_ttl = events_ttl
        self.notify = notify  # webhooks (common/webhooks.py); None: this process sends none
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)

    def create(self, record: dict, payload: dict, *, max_active: int = 0, max_active_per_owner: int = 0,
               idempotency: tuple[str, str, int] | None = None) -> tuple[str, object]:
        """Store a new queued job: its record, the graphs it runs, its place in its queue and in
        the active sets of its owner (`record["owner"]`, default anonymous) and of the service.

        One script checks and creates, so nothing is created when
        - `idempotency` = (key, value, ttl) is given and that key exists: ("replay", its value);
        - a cap (0 = none) is reached: ("full", {"scope": "key"|"service", "active", "limit"}).
        Otherwise ("created", None); with `idempotency` the key is set to value for ttl seconds.
        """
        task_id, queue = record["task_id"], record["queue"]
        owner = record.setdefault("owner", "anonymous")
        keys = [task_key(task_id), payload_key(task_id), queued_key(queue), load_key(queue), active_key(),
                active_key(owner)]
        idem_value, idem_ttl = "", 0
        if idempotency is not None:
            idem_key, idem_value, idem_ttl = idempotency
            keys.append(idem_key)
        result = self._create(keys=keys, args=[
            self.ttl, json.dumps(payload, separators=(",", ":")), int(time.time() * 1000),
            json.dumps(record.get("cost", 1.0)), task_id, int(max_active), int(max_active_per_owner),
            idem_value, int(idem_ttl), *_encode(record)])
        outcome = int(result[0])
        if outcome == 2:
            value = result[1]
            return "replay", value.decode() if isinstance(value, bytes) else value
        if outcome == 3:
            scope = result[1].decode() if isinstance(result[1], bytes) else result[1]
            return "full", {"scope": scope, "active": int(result[2]), "limit": int(result[3])}
        metrics.job_submitted(self.redis, record["workflow"])
        return "created", None

    def active_count(self, owner: str | None = None) -> int:
        """Jobs not yet finished: of `owner`, or of the whole service."""
        return int(self.redis.scard(active_key(owner)))

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
        applied, before, callback = self._transition(
            keys=[task_key(task_id)],
            args=[allowed_json, json.dumps(status) if status else "", queue or "", on_queue or "",
                  int(time.time() * 1000), json.dumps(owner) if owner else "", int(self.events_ttl),
                  *_encode(fields)],
        )
        before = before.decode() if isinstance(before, bytes) else before
        if applied and status in TERMINAL:
            record = self.get(task_id) or {}
            metrics.job_finished(self.redis, record, status, fields.get("error"))
        callback = json.loads(callback) if callback else None
        if applied and status and callback and self.notify is not None:
            try:
                self.notify(task_id, status, callback)
            except Exception:  # noqa: BLE001 - a webhook must never undo or block a job's transition
                log.exception("task %s: webhook for %s not queued", task_id, status)
        return bool(applied), (json.loads(before) if before else None)

    def update(self, task_id: str, **fields) -> None:
        """Set fields without a status check (prompt id, attempt log)."""
        self.redis.hset(task_key(task_id), mapping=dict(zip(*[iter(_encode(fields))] * 2)))

    def request_cancel(self, task_id: str) -> None:
        self.update(task_id, cancel_requested=True)
        self.redis.publish(CANCEL_CHANNEL, task_id)
