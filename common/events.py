"""Each job's event log: a Redis stream `cs:events:<task id>` that the event stream (SSE) and
webhooks read.

Every event is appended by the task store's transition script in the same step as the
transition it reports (common/lifecycle.py names which): queued (submitted, taken by a GPU's
worker, or moved), started (ComfyUI began executing), progress, output, and the final status.
A stream can never show a state the record does not have, nor miss one.
Stream ids (`<ms>-<seq>`) are the SSE event ids: a client that reconnects with
Last-Event-ID reads on from exactly there.

The log lives as long as the record while the job runs; once it ends it is kept for
EVENTS_TTL only (progress events are most of it), after which a finished job's stream is
served from its record alone.

A job that only waits has no log: a stream holding one entry costs ~4.7 KB of Redis (its first
node is allocated whole), more than the rest of a waiting job. Its `queued` event from the
submit is `submitted(record)`, made from the record with the id (`<created_ms>-0`) under which
the job's next transition writes it, first, into the log it then creates (common/task_store.py).
Readers replay it from the record while there is no log, and from the log once there is one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import redis

from common import keys
from common.lifecycle import FINAL

QUEUED, STARTED, PROGRESS, OUTPUT = "queued", "started", "progress", "output"
TYPES = (QUEUED, STARTED, PROGRESS, OUTPUT, *FINAL)
_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def events_key(task_id: str) -> str:
    return keys.events(task_id)


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
    return from_reply(client.xread({events_key(task_id): after}, count=count, block=block_ms))


def from_reply(reply) -> list[Event]:
    """XREAD's reply for one job's log as events (none when it timed out)."""
    return _decode(reply[0][1]) if reply else []


def submitted_id(record: dict) -> str:
    """The id of a job's submit event (its log's first entry, once it has a log)."""
    created = record.get("created_ms")
    return f"{int(created)}-0" if created else "0-1"


def submitted(record: dict) -> Event:
    """A job's submit event, as its log will hold it: on the queue it waits on (a move to
    another queue is an event, which writes the log)."""
    return Event(submitted_id(record), QUEUED, {"queue": record["queue"]})


def has_log(client: redis.Redis, task_id: str) -> bool:
    return bool(client.exists(events_key(task_id)))
