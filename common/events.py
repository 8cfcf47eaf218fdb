"""Each job's event log: a Redis stream `cs:events:<task id>` that the event stream (SSE) and
webhooks read.

Status events (queued, started, succeeded, failed, cancelled) are appended by the task
store's Lua scripts in the same step as the status change, so a stream can never show a
status the record does not have, nor miss one. Workers append progress and output events.
Stream ids (`<ms>-<seq>`) are the SSE event ids: a client that reconnects with
Last-Event-ID reads on from exactly there.

The log lives as long as the record while the job runs; once it ends it is kept for
EVENTS_TTL only (progress events are most of it), after which a finished job's stream is
served from its record alone.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import redis

QUEUED, STARTED, PROGRESS, OUTPUT = "queued", "started", "progress", "output"
FINAL = ("succeeded", "failed", "cancelled")
TYPES = (QUEUED, STARTED, PROGRESS, OUTPUT, *FINAL)
# A bound on one job's log even if a worker reported progress far more often than it should.
MAX_EVENTS = 10_000
_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def events_key(task_id: str) -> str:
    return f"cs:events:{task_id}"


def valid_id(value: str) -> bool:
    """A stream id Redis accepts: <ms>-<seq>, each below 2^64."""
    return bool(_ID.match(value)) and all(int(part) < 2 ** 64 for part in value.split("-"))


def id_after(a: str, b: str) -> bool:
    """Stream id `a` is later than `b`."""
    (a_ms, a_seq), (b_ms, b_seq) = (map(int, a.split("-")), map(int, b.split("-")))
    return (a_ms, a_seq) > (b_ms, b_seq)


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict


def append(client: redis.Redis, task_id: str, kind: str, data: dict) -> str:
    """Add a worker-side event (progress, output). XADD keeps the TTL the create script gave
    the log; a log that had none (a job queued before logs existed) gets its record's."""
    key = events_key(task_id)
    pipe = client.pipeline(transaction=False)
    pipe.xadd(key, {"type": kind, "data": json.dumps(data, separators=(",", ":"))}, maxlen=MAX_EVENTS,
              approximate=True)
    pipe.pttl(key)
    event_id, ttl = pipe.execute()
    if ttl == -1:
        record_ttl = client.pttl(f"cs:task:{task_id}")
        client.pexpire(key, record_ttl if record_ttl > 0 else 3_600_000)
    return event_id.decode() if isinstance(event_id, bytes) else event_id


def _decode(entries) -> list[Event]:
    events = []
    for raw_id, fields in entries:
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in fields.items()}
        event_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        events.append(Event(event_id, fields.get("type", ""), json.loads(fields.get("data") or "{}")))
    return events


def read(client: redis.Redis, task_id: str, after: str = "0-0", count: int = 200,
         block_ms: int | None = None) -> list[Event]:
    """Events after `after` (oldest first); with `block_ms`, wait that long for the first one."""
    reply = client.xread({events_key(task_id): after}, count=count, block=block_ms)
    return _decode(reply[0][1]) if reply else []
