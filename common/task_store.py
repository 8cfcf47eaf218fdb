"""Task records in Redis, changed only by the transitions common/lifecycle.py declares.

A record is a Redis hash of short JSON values (`keys.task`) and, beside it, a hash of its long
values (params, result, error, ...), each zlib-compressed JSON against a preset dictionary
(`keys.task_long`, common/compact.py): a hash with one value over 64 bytes (Redis' default
`hash-max-listpack-value`, which managed Redis often fixes) leaves the compact listpack encoding
and costs about twice the memory. The fields a script reads stay in the record's own hash
whatever their length (`HASH_FIELDS`). One Lua script applies any transition: it checks the record's state against the transition's sources (from the table, passed in), the
queue the caller expects, and for owned transitions the worker instance, then in the same step
- moves the job between its queue's indexes (waiting / handed / running, `common/keys.py`) and
  keeps the queue's counters in `keys.QUEUE_COUNTS` (jobs per index, and their total cost) with
  them, so reading the whole fleet's backlog is one command whatever its size;
- appends the transition's event to the job's event log (`keys.events`), so the event stream
  sees exactly the transitions the record went through; a waiting job's log is made by its
  next event, which writes the submit event first (a stream costs ~4.7 KB: common/events.py);
- on a final state: leaves the active sets (job caps), deletes the graphs (`keys.payload`),
  expires the event log after EVENTS_TTL, owes a final webhook (`keys.WEBHOOKS_PENDING`) and
  counts the job's metrics.
A finished record never changes again; a cancel and a worker's hand-over cannot both win.

Every key a script touches comes in KEYS, built by common/keys.py.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable

import redis
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from common import compact, events, keys, lifecycle, metrics
from common.lifecycle import State, Status

log = logging.getLogger("comfy.tasks")

# Public statuses, for callers that compare a record's status.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (str(s) for s in Status)
TERMINAL = frozenset(str(s) for s in lifecycle.FINAL_STATUSES)
CANCEL_CHANNEL = keys.CANCEL_CHANNEL
MAX_EVENTS = 10_000  # a bound on one job's log even if a worker reported progress too often

# A queue's counters in keys.QUEUE_COUNTS ("waiting handed running load"), read and written by the
# scripts below (prepended to each).
_COUNTERS_LUA = """
local function counters(hash, queue)
  local c, raw = {0, 0, 0, 0}, redis.call('HGET', hash, queue)
  if raw then
    local i = 1
    for n in string.gmatch(raw, '-?%d+') do c[i] = tonumber(n); i = i + 1 end
  end
  return c
end
local function store_counters(hash, queue, c)
  redis.call('HSET', hash, queue, string.format('%d %d %d %d', c[1], c[2], c[3], c[4]))
end
"""

# KEYS: [1] task, [2] events, [3] payload, [4] webhooks pending, [5] active (service),
# [6] active (owner), [7-9] the queue the job is on: waiting, handed, running, [10-12] the queue
# it goes to (the same keys when it stays), [13] keys.QUEUE_COUNTS, [14] the record's long values,
# [15..] metric keys.
# ARGV: [1] task id, [2] JSON list of source states ([] = the job must not exist: never here),
# [3] target state ('' = stay), [4] target status, [5] event type ('' = none), [6] event data
# JSON, [7] queue the job must be on ('' = any), [8] queue it goes to, [9] worker instance that
# must own it when handed or running ('' = no check), [10] owner, [11] now ms, [12] seconds a
# finished job's log is kept, [13] MAXLEN of the log, [14] '1': return the record and payload,
# [15] number of side operations N, then N × (op, key index, field, value): metrics, or 'publish'
# (field: the channel, value: the message; key index unused), then the number of
# values to set in the record's hash (2 × fields) and in its long values' hash, then those
# field/value pairs (short JSON; compressed JSON).
# Returns {applied, state before, callback, event id, cancel requested, record, payload, long values}.
_TRANSITION = _COUNTERS_LUA + """
local raw_state = redis.call('HGET', KEYS[1], 'state')
local state
if raw_state then
  state = cjson.decode(raw_state)
else
  local status = redis.call('HGET', KEYS[1], 'status')
  if not status then return {0, '', '', '', '0', false, false, false} end
  status = cjson.decode(status)
  if status == 'queued' then state = 'waiting' else state = status end
end
local ok = false
for _, s in ipairs(cjson.decode(ARGV[2])) do if s == state then ok = true end end
local queue = cjson.decode(redis.call('HGET', KEYS[1], 'queue'))
if ok and ARGV[7] ~= '' and ARGV[7] ~= queue then ok = false end
if ok and ARGV[9] ~= '' and (state == 'handed' or state == 'running') then
  local worker = redis.call('HGET', KEYS[1], 'worker')
  if not worker or cjson.decode(worker) ~= ARGV[9] then ok = false end
end
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested')
cancel = (cancel == 'true') and '1' or '0'
if not ok then return {0, state, '', '', cancel, false, false, false} end
local id, target, now = ARGV[1], ARGV[3], tonumber(ARGV[11])
local final = target == 'succeeded' or target == 'failed' or target == 'cancelled'
if target ~= '' then
  -- The queues' counters move with their indexes: a count changes only when its index did.
  local to = ARGV[8]
  local moved = to ~= queue
  local from_c = counters(KEYS[13], queue)
  local to_c = moved and counters(KEYS[13], to) or from_c
  if state == 'waiting' then from_c[1] = from_c[1] - redis.call('ZREM', KEYS[7], id)
  elseif state == 'handed' then from_c[2] = from_c[2] - redis.call('ZREM', KEYS[8], id)
  elseif state == 'running' then from_c[3] = from_c[3] - redis.call('SREM', KEYS[9], id) end
  local cost = math.floor(tonumber(redis.call('HGET', KEYS[1], 'cost') or '1') * 1000 + 0.5)
  if final or moved then from_c[4] = from_c[4] - cost end
  if not final then
    if moved then to_c[4] = to_c[4] + cost end
    if target == 'waiting' then to_c[1] = to_c[1] + redis.call('ZADD', KEYS[10], now, id)
    elseif target == 'handed' then to_c[2] = to_c[2] + redis.call('ZADD', KEYS[11], now, id)
    elseif target == 'running' then to_c[3] = to_c[3] + redis.call('SADD', KEYS[12], id) end
  end
  store_counters(KEYS[13], queue, from_c)
  if moved then store_counters(KEYS[13], to, to_c) end
  redis.call('HSET', KEYS[1], 'state', cjson.encode(target), 'status', cjson.encode(ARGV[4]),
             'queue', cjson.encode(ARGV[8]))
end
local n = tonumber(ARGV[15])
local i = 16
for _ = 1, n do
  local op, key, f, v = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3]
  if op == 'hincrby' then redis.call('HINCRBY', key, f, v)
  elseif op == 'hincrbyfloat' then redis.call('HINCRBYFLOAT', key, f, v)
  elseif op == 'set' then redis.call('SET', key, v)
  elseif op == 'publish' then redis.call('PUBLISH', f, v) end
  i = i + 4
end
local n_short, n_long = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
i = i + 2
-- A field lives on one side only: set on one, it leaves the other.
local function place(key, other, first, count)
  if count == 0 then return end
  redis.call('HSET', key, unpack(ARGV, first, first + count - 1))
  local names = {}
  for j = first, first + count - 1, 2 do names[#names + 1] = ARGV[j] end
  redis.call('HDEL', other, unpack(names))
end
place(KEYS[1], KEYS[14], i, n_short)
place(KEYS[14], KEYS[1], i + n_short, n_long)
if n_long > 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[14], ttl) end
end
local event = ''
if ARGV[5] ~= '' then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    -- A waiting job has no log yet: its submit event goes first, with the id readers gave it
    -- (common/events.py `submitted`), on the queue it was submitted to (this one: every move adds an event).
    local created = redis.call('HGET', KEYS[1], 'created_ms')
    local first = (created and created:match('^%d+$')) and (created .. '-0') or '0-1'
    redis.call('XADD', KEYS[2], first, 'type', 'queued', 'data', cjson.encode({queue = queue}))
  end
  event = redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[13]), '*', 'type', ARGV[5], 'data', ARGV[6])
end
if final then
  redis.call('SREM', KEYS[5], id)
  redis.call('SREM', KEYS[6], id)
  local ttl = tonumber(ARGV[12])
  -- The record remembers its final event's id: a stream read after the log expired still
  -- tells a client that saw it (Last-Event-ID) from one that did not.
  if event ~= '' then redis.call('HSET', KEYS[1], 'final_event', cjson.encode(event)) end
  redis.call('EXPIRE', KEYS[2], ttl)
  -- Nothing runs the graphs again (a requeue never starts from a final state).
  redis.call('DEL', KEYS[3])
  -- A final webhook is owed from now until the webhook worker settles it (the monitor re-sends).
  local callback = redis.call('HGET', KEYS[1], 'callback') or redis.call('HGET', KEYS[14], 'callback')
  if callback and callback ~= 'null' then redis.call('ZADD', KEYS[4], now, id) end
elseif event ~= '' then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
local record, payload, long = false, false, false
if ARGV[14] == '1' then
  record = redis.call('HGETALL', KEYS[1])
  payload = redis.call('GET', KEYS[3])
  long = redis.call('HGETALL', KEYS[14])
end
local callback = redis.call('HGET', KEYS[1], 'callback') or redis.call('HGET', KEYS[14], 'callback') or ''
return {1, state, callback, event, cancel, record, payload, long}
"""

# Creating a job (the `submit` transition), atomically with its admission checks and its Celery
# message (common/producer.message), so a job is never queued without its message. Its `queued`
# event is not written: a waiting job has no event log (common/events.py `submitted`).
# KEYS: [1] task, [2] payload, [3] the record's long values, [4] waiting (the job's queue),
# [5] keys.QUEUE_COUNTS, [6] active, [7] active (owner), [8] metric counters, [9] the queue's
# Celery list, then, optional, the caller's idempotency key and the payload's compression
# dictionary (ARGV [14], [15] say where; 0 = none).
# ARGV: [1] record TTL s, [2] payload (compressed), [3] enqueue time ms, [4] cost in thousandths,
# [5] task id, [6] cap overall (0 = none), [7] cap per owner (0 = none), [8] idempotency value,
# [9] idempotency TTL s, [10] the queue, [11] (unused), [12] counter field, [13] the Celery message ('' = the
# caller sends it), [14] index of the idempotency key, [15] index of the dictionary key, [16] the
# dictionary ('' = it must be there already), [17] number of short values (2 × fields), [18]
# number of long ones, then the record's field/value pairs (short JSON; compressed JSON).
# Returns {1, jobs ahead of it (running ones included)} created, {2, value} the idempotency key
# names a task already (nothing created), {3, scope, active, cap} a cap is reached (nothing
# created), {4} the dictionary must be sent (nothing created).
_CREATE = _COUNTERS_LUA + """
local idem, dict = tonumber(ARGV[14]), tonumber(ARGV[15])
if idem > 0 then
  local existing = redis.call('GET', KEYS[idem])
  if existing then return {2, existing} end
end
if dict > 0 and ARGV[16] == '' and redis.call('EXISTS', KEYS[dict]) == 0 then return {4} end
local owner_cap, total_cap = tonumber(ARGV[7]), tonumber(ARGV[6])
if owner_cap > 0 and redis.call('SCARD', KEYS[7]) >= owner_cap then
  return {3, 'key', redis.call('SCARD', KEYS[7]), owner_cap}
end
if total_cap > 0 and redis.call('SCARD', KEYS[6]) >= total_cap then
  return {3, 'service', redis.call('SCARD', KEYS[6]), total_cap}
end
local ttl = tonumber(ARGV[1])
local n_short, n_long = tonumber(ARGV[17]), tonumber(ARGV[18])
redis.call('HSET', KEYS[1], unpack(ARGV, 19, 18 + n_short))
redis.call('EXPIRE', KEYS[1], ttl)
if n_long > 0 then
  redis.call('HSET', KEYS[3], unpack(ARGV, 19 + n_short, 18 + n_short + n_long))
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
-- The dictionary outlives every payload compressed against it: each submit extends it.
if dict > 0 then
  if ARGV[16] ~= '' then redis.call('SET', KEYS[dict], ARGV[16], 'EX', ttl) else redis.call('EXPIRE', KEYS[dict], ttl) end
end
local c = counters(KEYS[5], ARGV[10])
c[1] = c[1] + redis.call('ZADD', KEYS[4], ARGV[3], ARGV[5])
c[4] = c[4] + tonumber(ARGV[4])
store_counters(KEYS[5], ARGV[10], c)
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('SADD', KEYS[7], ARGV[5])
redis.call('HINCRBY', KEYS[8], ARGV[12], 1)
if idem > 0 then redis.call('SET', KEYS[idem], ARGV[8], 'EX', tonumber(ARGV[9])) end
if ARGV[13] ~= '' then redis.call('LPUSH', KEYS[9], ARGV[13]) end
-- Jobs ahead of it: the queue's running and handed ones (its counters), then its rank in line.
return {1, c[3] + c[2] + redis.call('ZRANK', KEYS[4], ARGV[5])}
"""

# Where a job stands in its GPU's line. KEYS: [1] waiting, [2] handed, [3] running of its queue.
# ARGV: [1] task id. Returns the number of jobs ahead of it (running ones included), or -1 when
# it no longer waits there.
_POSITION = """
local rank = redis.call('ZRANK', KEYS[2], ARGV[1])
if rank then return redis.call('SCARD', KEYS[3]) + rank end
rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if rank then return redis.call('SCARD', KEYS[3]) + redis.call('ZCARD', KEYS[2]) + rank end
return -1
"""

# Adopting what versions before keys.QUEUE_COUNTS left (an upgrade with jobs in flight): for each
# queue whose old cost total still exists, add it to the queue's load and recount its jobs per
# index. KEYS: [1] keys.QUEUE_COUNTS, then per queue: old total, waiting, handed, running.
# ARGV: the queues. Returns how many had an old total.
_ADOPT = _COUNTERS_LUA + """
local adopted = 0
for q = 1, #ARGV do
  local k, queue = 4 * q - 2, ARGV[q]
  local old = redis.call('GET', KEYS[k])
  if old then
    local c = counters(KEYS[1], queue)
    store_counters(KEYS[1], queue, {redis.call('ZCARD', KEYS[k + 1]), redis.call('ZCARD', KEYS[k + 2]),
                                    redis.call('SCARD', KEYS[k + 3]), c[4] + tonumber(old)})
    redis.call('DEL', KEYS[k])
    adopted = adopted + 1
  end
end
return adopted
"""

# The webhook worker's record of a final delivery. KEYS: [1] task, [2] webhooks pending, [3] the
# record's long values. ARGV: [1] task id, [2] delivery state JSON, [3] '' = settled, else when to
# look again (ms), [4] '1': the state is long (compressed: it goes beside the record).
_WEBHOOK_STATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[4] == '1' then
    redis.call('HSET', KEYS[3], 'webhook', ARGV[2])
    redis.call('HDEL', KEYS[1], 'webhook')
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
  else
    redis.call('HSET', KEYS[1], 'webhook', ARGV[2])
    redis.call('HDEL', KEYS[3], 'webhook')
  end
end
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], ARGV[1]) else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
return 1
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


# Redis' default hash-max-listpack-value: a hash holding one longer value is a hashtable.
SHORT_VALUE = 64
# Read from the record's own hash by a script or directly (app/sse.py): kept there, however long.
HASH_FIELDS = frozenset({"state", "status", "queue", "worker", "cancel_requested", "cost", "created_ms",
                         "final_event", "gpu", "task_id", "owner"})


def _encode(fields: dict, dictionary: bytes = compact.VOCABULARY) -> tuple[list, list]:
    """A record's fields as (short, long) flat field/value lists: JSON in the record's hash, and
    compressed JSON (against `dictionary`: common/compact.py) in its long values' hash."""
    short: list = []
    long: list = []
    for name, value in fields.items():
        text = _json(value)
        if len(text) <= SHORT_VALUE or name in HASH_FIELDS:
            short += [name, text]
        else:
            long += [name, compact.pack(text.encode(), dictionary)]
    return short, long


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(raw) -> dict:
    if isinstance(raw, list):
        return dict(zip(raw[::2], raw[1::2]))
    return raw or {}


def decode_record(raw, long=None, dictionaries: compact.Dictionaries | None = None) -> dict:
    """A record from HGETALL (a dict) or from a script (a flat list), with its long values (the
    same shapes; `dictionaries` reads them when one names a workflow's dictionary)."""
    record = {_text(k): json.loads(v) for k, v in _pairs(raw).items()}
    if long:
        dictionaries = dictionaries or compact.Dictionaries(None)
        for name, value in _pairs(long).items():
            record.setdefault(_text(name), dictionaries.unpack(value))
    return record


def read_record(client: redis.Redis, task_id: str) -> dict | None:
    """One record as the service keeps it (for tools and tests that read Redis directly)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.task(task_id))
    pipe.hgetall(keys.task_long(task_id))
    raw, long = pipe.execute()
    return decode_record(raw, long, compact.Dictionaries(client)) if raw else None


def pack_payload(payload: dict, dictionary: bytes | None = None) -> bytes:
    """The graphs a job runs, as stored: zlib-compressed JSON, against its workflow's templates
    when given (`dictionary`, stored once under `keys.payload_dictionary`): a tenth of the bytes
    of compressing them alone."""
    return compact.pack(payload, dictionary, level=9 if dictionary else 6)


def unpack_payload(raw: bytes | str | None) -> dict | None:
    """A stored payload compressed alone, or plain JSON (stored before compression); one compressed
    against a workflow's dictionary needs Redis: `TaskStore.payload`."""
    return compact.Dictionaries(None).unpack(raw)


def parse_queue_counts(raw: dict) -> dict[str, tuple[int, int, int, int]]:
    """HGETALL of `keys.QUEUE_COUNTS` → queue → (waiting, handed, running, load in thousandths)."""
    return {_text(queue): keys.parse_counters(value) for queue, value in raw.items()}


def cost_units(cost) -> int:
    """A job's cost as the integer the queue totals keep (thousandths of a unit)."""
    return int(round(float(cost if cost is not None else 1.0) * 1000))


# Called after a status change of a job that has a callback: (task id, new status, callback).
Notify = Callable[[str, str, dict], None]


@dataclass
class Outcome:
    """What a transition did. `before` is the state the job was in (None: no such job)."""
    applied: bool
    before: State | None
    callback: dict | None = None
    event_id: str | None = None
    cancel_requested: bool = False
    record: dict | None = None
    payload: dict | None = None

    def __bool__(self) -> bool:
        return self.applied


@dataclass
class Created:
    outcome: str  # created | replay | full
    info: object = None  # created: jobs ahead of it; replay: the key's value; full: the cap


@dataclass
class CancelResult:
    """What a cancel request did: `cancelled` (it never reached a GPU), `requested` (its worker
    will delete or interrupt it), `finished` (it had already ended), `missing`."""
    outcome: str
    state: State | None = None
    last_event: str | None = None


# What a Redis outage looks like to a client: the server is gone, restarting, or loading its AOF;
# or, around a Sentinel failover, a node that is a replica now (READONLY), has no replica in sync
# to accept a write (NOREPLICAS, min-replicas-to-write), or lost its master (MASTERDOWN).
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError)
OUTAGE_REPLIES = ("NOREPLICAS", "MASTERDOWN", "LOADING", "READONLY")


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OUTAGE_ERRORS) or (isinstance(exc, redis.ResponseError)
                                              and str(exc).startswith(OUTAGE_REPLIES))


class TaskStore:
    def __init__(self, client: redis.Redis, ttl: int, events_ttl: int = 3600, notify: Notify | None = None,
                 outage_tolerance: float = 0.0):
        self.redis = client
        self.ttl = ttl
        self.events_ttl = events_ttl
        self.notify = notify  # webhooks (common/webhooks.py); None: this process sends none
        # Workers wait out a Redis outage this long (REDIS_OUTAGE_TOLERANCE) before a transition
        # gives up; the API does not wait (0): its caller gets a 503 at once.
        self.outage_tolerance = outage_tolerance
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._position = client.register_script(_POSITION)
        self._webhook_state = client.register_script(_WEBHOOK_STATE)
        self._adopt = client.register_script(_ADOPT)
        self.dictionaries = compact.Dictionaries(client)  # what compressed values were compressed against

    # Reading ------------------------------------------------------------------------------------
    def get(self, task_id: str) -> dict | None:
        return read_record(self.redis, task_id)

    def events_then_record(self, client: redis.Redis, task_id: str, after: str,
                           block_ms: int) -> tuple[list[events.Event], dict | None]:
        """The job's events after `after`, waiting up to `block_ms` for the first (XREAD BLOCK
        on `client`, the event streams' own pool), and its record as it stands once they came,
        in one round trip: Redis runs the reads queued behind a blocked XREAD as it unblocks,
        so whoever waits for the final event has the final record with it."""
        pipe = client.pipeline(transaction=False)
        pipe.xread({keys.events(task_id): after}, count=200, block=block_ms)
        pipe.hgetall(keys.task(task_id))
        pipe.hgetall(keys.task_long(task_id))
        reply, raw, long = pipe.execute()
        return events.from_reply(reply), decode_record(raw, long, self.dictionaries) if raw else None

    def exists(self, task_id: str) -> bool:
        return bool(self.redis.exists(keys.task(task_id)))

    def get_many(self, task_ids: Iterable[str]) -> list[dict | None]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(keys.task(task_id))
            pipe.hgetall(keys.task_long(task_id))
        replies = pipe.execute()
        return [decode_record(raw, long, self.dictionaries) if raw else None
                for raw, long in zip(replies[::2], replies[1::2])]

    def payload(self, task_id: str) -> dict | None:
        return self._unpack(self.redis.get(keys.payload(task_id)))

    def _unpack(self, raw: bytes | None) -> dict | None:
        try:
            return self.dictionaries.unpack(raw)
        except LookupError as exc:  # its dictionary is gone: as good as no graphs (the job fails, says so)
            log.error("graphs unreadable: %s", exc)
            return None

    def queue_position(self, queue: str, task_id: str) -> int | None:
        """How many jobs are ahead of this one on its GPU, the running one included (0: it is
        next); None when it no longer waits there."""
        ahead = int(self._position(keys=[keys.waiting(queue), keys.handed(queue), keys.running(queue)],
                                   args=[task_id]))
        return None if ahead < 0 else ahead

    def waiting(self, queue: str) -> list[str]:
        """Jobs waiting in Celery for this GPU, oldest first."""
        return [_text(m) for m in self.redis.zrange(keys.waiting(queue), 0, -1)]

    def handed(self, queue: str) -> list[str]:
        """Jobs this GPU's worker took and queued in its ComfyUI, in the order it took them."""
        return [_text(m) for m in self.redis.zrange(keys.handed(queue), 0, -1)]

    def running(self, queue: str) -> list[str]:
        return sorted(_text(m) for m in self.redis.smembers(keys.running(queue)))

    def taken(self, queue: str) -> list[str]:
        """Jobs a worker of this queue has (handed or running)."""
        return [*self.handed(queue), *self.running(queue)]

    def active_count(self, owner: str | None = None) -> int:
        """Jobs not yet finished: of `owner`, or of the whole service."""
        return int(self.redis.scard(keys.active(owner)))

    def last_event_id(self, task_id: str) -> str:
        entries = self.redis.xrevrange(keys.events(task_id), count=1)
        return _text(entries[0][0]) if entries else "0-0"

    def queue_counts(self) -> dict[str, tuple[int, int, int, int]]:
        """Every queue's counters (`keys.QUEUE_COUNTS`) in one read: queue → jobs waiting,
        handed, running, and their total cost in thousandths of a unit."""
        return parse_queue_counts(self.redis.hgetall(keys.QUEUE_COUNTS))

    def adopt_legacy_totals(self, queues: Iterable[str]) -> int:
        """Fold the cost totals that versions before `keys.QUEUE_COUNTS` kept into it (once per
        queue, or again while such a version still runs); returns how many queues had one."""
        queues = list(queues)
        call_keys = [keys.QUEUE_COUNTS]
        for queue in queues:
            call_keys += [keys.legacy_load(queue), *keys.queue_keys(queue)]
        return int(self._adopt(keys=call_keys, args=queues)) if queues else 0

    # Creating -----------------------------------------------------------------------------------
    def create(self, record: dict, payload: dict, *, max_active: int = 0, max_active_per_owner: int = 0,
               idempotency: tuple[str, str, int] | None = None, message: str = "",
               dictionary: bytes | None = None) -> Created:
        """The `submit` transition: store a new waiting job, its graphs, its place in its queue
        and in the active sets of its owner (`record["owner"]`) and of the service, and push its
        Celery `message` (common/producer.message) when one is given. `dictionary`: the
        workflow's templates the graphs are compressed against (stored once, then named).

        One script checks and creates, so nothing is created when
        - `idempotency` = (key, value, ttl) is given and that key exists: ("replay", its value);
        - a cap (0 = none) is reached: ("full", {"scope": "key"|"service", "active", "limit"}).
        Otherwise ("created", jobs ahead of it on its GPU); with `idempotency` the key is set to
        value for ttl seconds.
        """
        task_id, queue = record["task_id"], record["queue"]
        owner = record.setdefault("owner", "anonymous")
        record = {**record, "state": str(State.WAITING), "status": QUEUED}
        call_keys = [keys.task(task_id), keys.payload(task_id), keys.task_long(task_id), keys.waiting(queue),
                     keys.QUEUE_COUNTS, keys.active(), keys.active(owner), keys.METRIC_COUNTERS,
                     keys.celery_queue(queue)]
        idem_value, idem_ttl, idem_at, dict_at = "", 0, 0, 0
        if idempotency is not None:
            idem_key, idem_value, idem_ttl = idempotency
            call_keys.append(idem_key)
            idem_at = len(call_keys)
        if dictionary:
            call_keys.append(keys.payload_dictionary(compact.dictionary_id(dictionary)))
            dict_at = len(call_keys)
        short, long = _encode(record, dictionary or compact.VOCABULARY)  # params repeat the templates
        head = [self.ttl, pack_payload(payload, dictionary), int(time.time() * 1000), cost_units(record.get("cost")),
                task_id, int(max_active), int(max_active_per_owner), idem_value, int(idem_ttl), queue, "",
                metrics.submitted_field(record["workflow"]), message, idem_at, dict_at]
        sent, pruned, info = "", False, {}  # the dictionary goes with a submit only when Redis lacks it
        for _ in range(3):
            result = self._create(keys=call_keys, args=[*head, sent, len(short), len(long), *short, *long])
            outcome = int(result[0])
            if outcome == 4:
                sent = dictionary
                continue
            if outcome == 2:
                return Created("replay", _text(result[1]))
            if outcome == 3:
                info = {"scope": _text(result[1]), "active": int(result[2]), "limit": int(result[3])}
                # A member whose record expired without a final transition would hold a slot for
                # good: prune such members once, then ask again.
                if not pruned and self._prune(keys.active(owner) if info["scope"] == "key" else keys.active()):
                    pruned = True
                    continue
                return Created("full", info)
            return Created("created", int(result[1]))
        return Created("full", info)

    def _prune(self, set_key: str) -> int:
        if not self.redis.set(keys.pruned(set_key), "1", nx=True, ex=5):
            return 0
        members = [_text(m) for m in self.redis.smembers(set_key)]
        records = self.get_many(members)
        gone = [m for m, r in zip(members, records) if r is None or r.get("status") in TERMINAL]
        return int(self.redis.srem(set_key, *gone)) if gone else 0

    # Transitions --------------------------------------------------------------------------------
    def apply(self, name: str, task_id: str, *, queue: str, owner: str = "anonymous", to_queue: str | None = None,
              instance: str | None = None, fields: dict | None = None, event: dict | None = None,
              metric_ops: list[tuple] = (), want_record: bool = False, wait_out_outage: bool = True) -> Outcome:
        """Apply lifecycle transition `name` (see `_apply`), waiting out a Redis outage of up to
        `outage_tolerance` seconds with exponential backoff. A transition whose reply was lost
        with the connection may have applied: a retry refused because the job is already where
        this transition takes it, and owned by `instance`, counts as applied."""
        call = functools.partial(self._apply, name, task_id, queue=queue, owner=owner, to_queue=to_queue,
                                 instance=instance, fields=fields, event=event, metric_ops=metric_ops,
                                 want_record=want_record)
        if not wait_out_outage or self.outage_tolerance <= 0:
            return call()
        retried = False
        for attempt in Retrying(retry=retry_if_exception(is_outage), reraise=True,
                                stop=stop_after_delay(self.outage_tolerance),
                                wait=wait_exponential_jitter(initial=0.1, max=5.0),
                                before_sleep=lambda state: log.warning(
                                    "task %s: Redis unavailable for %s (%s); retrying", task_id, name,
                                    state.outcome.exception())):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    retried = True
                outcome = call()
        if retried and not outcome.applied:
            outcome = self._applied_before(name, task_id, instance, outcome, want_record)
        return outcome

    def _applied_before(self, name: str, task_id: str, instance: str | None, outcome: Outcome,
                        want_record: bool) -> Outcome:
        spec = lifecycle.transition(name)
        record = self.get(task_id)
        if record is None or instance is None or record.get("worker") != instance:
            return outcome
        if spec.target is not None and lifecycle.state_of(record) == spec.target:
            log.info("task %s: %s had applied before the connection was lost", task_id, name)
            payload = self.payload(task_id) if want_record else None
            return Outcome(True, outcome.before, record.get("callback"), None, bool(record.get("cancel_requested")),
                           record if want_record else None, payload)
        return outcome

    def _apply(self, name: str, task_id: str, **call) -> Outcome:
        """Apply lifecycle transition `name` to a job that is on `queue` (else refused).

        `instance`: for an owned transition, the worker that must own a handed or running job.
        `to_queue`: where the job goes (requeue, or a worker taking a job from another queue).
        `fields`: record fields set with it; `event`: the data of the event it appends;
        `metric_ops`: (op, key, field, value) counted only if it applies (common/metrics.py);
        ("publish", None, channel, message) publishes only if it applies.
        """
        call_keys, args = self._script_call(name, task_id, **call)
        return self._outcome(name, task_id, self._transition(keys=call_keys, args=args))

    def apply_in_turn(self, steps: list[tuple[str, str, dict]],
                      then: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
        """Several transitions, each (name, task id, `apply`'s keyword arguments), sent in one
        round trip: a pipeline, not a transaction, so each is checked and applied by the script on
        its own, in order, exactly as `apply` would one after the other. For a worker's last steps
        of a job (its last `output`, then `succeed`: one refused is the other refused). Should
        Redis be away meanwhile, the steps not known to have applied go through `apply` one by
        one, which waits it out; any other error is raised, as `apply` would.
        `then(i, outcome)` runs as each step's outcome is known, before the next one's webhook is
        queued, so the caller's own webhooks keep the order of the events."""
        calls = [self._script_call(name, task_id, **kw) for name, task_id, kw in steps]
        try:
            for _ in range(2):
                pipe = self.redis.pipeline(transaction=False)
                for call_keys, args in calls:
                    pipe.evalsha(self._transition.sha, len(call_keys), *call_keys, *args)
                replies = pipe.execute(raise_on_error=False)
                if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                    break
                self.redis.script_load(_TRANSITION)  # Redis restarted and forgot it: nothing ran
            else:
                raise redis.RedisError("the transition script could not be loaded")
        except redis.RedisError:
            replies = []
        outcomes: list[Outcome] = []
        for index, (name, task_id, kw) in enumerate(steps):
            reply = replies[index] if index < len(replies) else None
            if isinstance(reply, Exception) and not is_outage(reply):
                raise reply  # as `apply` would have raised it
            if reply is None or isinstance(reply, Exception):
                replies = []  # Redis is away: from here on one by one, waiting it out
                outcome = self.apply(name, task_id, **kw)
            else:
                outcome = self._outcome(name, task_id, reply)
            outcomes.append(outcome)
            if then is not None:
                then(index, outcome)
        return outcomes

    def _script_call(self, name: str, task_id: str, *, queue: str, owner: str = "anonymous",
                     to_queue: str | None = None, instance: str | None = None, fields: dict | None = None,
                     event: dict | None = None, metric_ops: list[tuple] = (),
                     want_record: bool = False) -> tuple[list[str], list]:
        """KEYS and ARGV of the transition script for one transition (see `_TRANSITION`)."""
        spec = lifecycle.transition(name)
        # Owned transitions of a handed or running job need its worker; no instance matches none.
        must_own = (instance or "-") if spec.owned else ""
        to_queue = to_queue or queue
        target = spec.target
        metric_keys: list[str] = []
        ops: list[str] = []
        for op, key, fname, value in metric_ops:
            if op == "publish":  # a channel, not a key
                ops += [op, "0", fname, str(value)]
                continue
            if key not in metric_keys:
                metric_keys.append(key)
            ops += [op, str(15 + metric_keys.index(key)), fname, str(value)]
        call_keys = [keys.task(task_id), keys.events(task_id), keys.payload(task_id), keys.WEBHOOKS_PENDING,
                     keys.active(), keys.active(owner), *keys.queue_keys(queue), *keys.queue_keys(to_queue),
                     keys.QUEUE_COUNTS, keys.task_long(task_id), *metric_keys]
        short, long = _encode(fields or {})
        args = [task_id, _json(sorted(str(s) for s in spec.sources)), str(target) if target else "",
                str(lifecycle.status_of(target)) if target else "", spec.event or "", _json(event or {}),
                queue, to_queue, must_own, owner, int(time.time() * 1000), int(self.events_ttl), MAX_EVENTS,
                "1" if want_record else "0", len(metric_ops), *ops, len(short), len(long), *short, *long]
        return call_keys, args

    def _outcome(self, name: str, task_id: str, reply) -> Outcome:
        """The script's reply as an `Outcome`; a status change of a job with a callback is
        handed to `notify` (webhooks)."""
        spec = lifecycle.transition(name)
        target = spec.target
        applied, before, callback, event_id, cancel, record, payload, long = reply
        before = _text(before)
        outcome = Outcome(
            applied=bool(applied), before=State(before) if before else None,
            callback=self.dictionaries.unpack(callback or None), event_id=_text(event_id) or None,
            cancel_requested=_text(cancel) == "1",
            record=decode_record(record, long, self.dictionaries) if record else None,
            payload=self._unpack(payload or None))
        if outcome.applied and target is not None and outcome.callback and self.notify is not None:
            status = str(lifecycle.status_of(target))
            if status != str(lifecycle.status_of(outcome.before)) or spec.event == "started":
                try:
                    self.notify(task_id, status, outcome.callback)
                except Exception:  # noqa: BLE001 - a webhook must never undo or block a transition
                    log.exception("task %s: webhook for %s not queued", task_id, status)
        return outcome

    def cancel(self, task_id: str, record: dict) -> CancelResult:
        """A cancel request (DELETE, or a Celery revoke): a job still in Celery is cancelled at
        once and never reaches a GPU; one a worker has is flagged, and its worker is told (it
        deletes the prompt from ComfyUI's queue or interrupts it, then records `cancel_run`)."""
        queue, owner = record["queue"], record.get("owner", "anonymous")
        if lifecycle.state_of(record) in (State.HANDED, State.RUNNING):
            # A worker has it (as just read): flag it and tell the worker (the script publishes
            # once the flag is set), one round trip; if it moved meanwhile, the full sequence
            # below decides.
            flagged, last = self._flag_cancel(task_id, queue, owner)
            if flagged.applied:
                return CancelResult("requested", flagged.before, last)
        last = self.last_event_id(task_id)
        done = self.apply("cancel_waiting", task_id, queue=queue, owner=owner, fields={
            "finished_at": now_iso(), "cancel_requested": True}, event={"queue": queue},
            metric_ops=metrics.finished_ops(record, CANCELLED))
        if done.applied:
            return CancelResult("cancelled", State.CANCELLED, last)
        if done.before is None:
            return CancelResult("missing")
        if done.before in lifecycle.FINAL_STATES:
            return CancelResult("finished", done.before, last)
        if done.before == State.WAITING:  # it moved to another queue meanwhile: ask again there
            current = self.get(task_id)
            return self.cancel(task_id, current) if current else CancelResult("missing")
        flagged = self.apply("request_cancel", task_id, queue=queue,
                             owner=owner, fields={"cancel_requested": True})
        if not flagged.applied:
            current = self.get(task_id)
            if current is None:
                return CancelResult("missing")
            if current.get("status") in TERMINAL:
                return CancelResult("finished", lifecycle.state_of(current), last)
            if current["queue"] != queue:
                return self.cancel(task_id, current)
        self.redis.publish(CANCEL_CHANNEL, task_id)
        return CancelResult("requested", flagged.before, last)

    def _flag_cancel(self, task_id: str, queue: str, owner: str) -> tuple[Outcome, str]:
        """`request_cancel`, publishing the request to the workers if it applies, and the id of
        the job's last event just before it (where DELETE starts waiting for the final one), in
        one round trip."""
        call_keys, args = self._script_call("request_cancel", task_id, queue=queue, owner=owner,
                                            fields={"cancel_requested": True},
                                            metric_ops=[("publish", None, CANCEL_CHANNEL, task_id)])
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(keys.events(task_id), count=1)
        pipe.evalsha(self._transition.sha, len(call_keys), *call_keys, *args)
        entries, reply = pipe.execute(raise_on_error=False)
        if isinstance(entries, Exception):
            raise entries
        last = _text(entries[0][0]) if entries else "0-0"
        if isinstance(reply, redis.exceptions.NoScriptError):  # Redis forgot the script: nothing ran
            reply = self._transition(keys=call_keys, args=args)
        elif isinstance(reply, Exception):
            raise reply
        return self._outcome("request_cancel", task_id, reply), last

    def webhook_state(self, task_id: str, state: dict, retry_at_ms: int | None) -> None:
        """The webhook worker's record of a final delivery; `retry_at_ms` None: settled."""
        short, long = _encode({"webhook": state})
        value = long[1] if long else short[1]
        self._webhook_state(keys=[keys.task(task_id), keys.WEBHOOKS_PENDING, keys.task_long(task_id)],
                            args=[task_id, value, "" if retry_at_ms is None else int(retry_at_ms),
                                  "1" if long else "0"])
