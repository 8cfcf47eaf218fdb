"""The fleet registry: each worker's heartbeat in Redis, read back in one round trip.

A worker writes its heartbeat (JSON, with its time `ts`) into one hash (`keys.HEARTBEATS`) and
that time into another (`keys.HEARTBEAT_TIMES`), its last-seen time in `keys.WORKERS`, and its labels (host, GPU index, ComfyUI URL, GPU name) in
`keys.KNOWN_WORKERS`, which outlives the heartbeat: a dead worker's alert still names its host,
a pin naming a GPU or host the fleet has never had is told apart from one that is down now, and
the checkpoints of GPUs scaled away are remembered. A worker whose last heartbeat is older than
HEARTBEAT_TTL is not alive, whatever it said. Reading the fleet (dispatch, `GET /workers`) is
two commands in one round trip whatever its size: every GPU's heartbeat time, and every
queue's counters (jobs waiting in Celery, inside ComfyUI, running, and their total cost:
`keys.QUEUE_COUNTS`, kept by the task store). Only heartbeats newer than this process's last
reading are fetched and parsed (a second round trip, at most one per heartbeat).
"""
from __future__ import annotations

import json
import time

import redis

from common import keys

WORKERS = keys.WORKERS
LABELS = ("host", "gpu_index", "comfyui_url", "checkpoints")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Registry:
    def __init__(self, client: redis.Redis, ttl: float):
        self.redis = client
        self.ttl = ttl
        self._known: dict[str, dict] | None = None
        self._known_at = float("-inf")
        # queue → (heartbeat time as read, as a number, the heartbeat parsed, counters as read,
        # the dict alive() returns)
        self._beats: dict[bytes, tuple] = {}

    def publish(self, beat: dict) -> None:
        now = time.time()
        beat = {**beat, "ts": now}
        labels = {k: beat.get(k) for k in LABELS}
        labels["gpu_name"] = (beat.get("gpu") or {}).get("name")
        labels["last_seen"] = now
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.HEARTBEATS, beat["queue"], json.dumps(beat))
        pipe.hset(keys.HEARTBEAT_TIMES, beat["queue"], repr(now))  # after the beat: a reader that sees it gets the beat
        pipe.zadd(WORKERS, {beat["queue"]: now})
        pipe.hset(keys.KNOWN_WORKERS, beat["queue"], json.dumps(labels, sort_keys=True))
        pipe.execute()

    def withdraw(self, queue: str) -> None:
        """A worker leaving for good (warm shutdown done): it is dead at once, not after its TTL."""
        self.redis.hdel(keys.HEARTBEAT_TIMES, queue)

    def alive(self) -> list[dict]:
        """Live workers' heartbeats, each with `waiting` (jobs not started), `jobs` (waiting or
        running) and `load` (cost units waiting or running on it).

        One round trip of two commands whatever the fleet's size: every GPU's heartbeat time, and
        every queue's counters. Only heartbeats newer than this process's last reading are
        fetched (a second round trip) and parsed; a GPU whose heartbeat and counters did not
        change gets the same dict again: callers read these, never mutate them."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.HEARTBEAT_TIMES)
        pipe.hgetall(keys.QUEUE_COUNTS)
        times, counters = pipe.execute()
        cache, beats = self._beats, {}  # a whole new cache: concurrent readers each leave a consistent one
        cutoff = time.time() - self.ttl
        workers, changed = [], []
        for name, at in times.items():
            entry = cache.get(name)
            if entry is None or entry[0] != at:
                changed.append((name, at))
                continue
            beats[name] = entry
            if entry[1] >= cutoff and entry[2] is not None:
                counts = counters.get(name)
                workers.append(entry[4] if entry[3] == counts else self._with_counts(beats, name, entry, counts))
        if changed:
            for (name, at), raw in zip(changed, self.redis.hmget(keys.HEARTBEATS, [n for n, _ in changed])):
                entry = beats[name] = (at, float(at), json.loads(raw) if raw else None, None, None)
                if entry[1] >= cutoff and entry[2] is not None:  # else expired, or its heartbeat is gone
                    workers.append(self._with_counts(beats, name, entry, counters.get(name)))
        self._beats = beats
        return workers

    @staticmethod
    def _with_counts(beats: dict, name, entry: tuple, counts) -> dict:
        """The dict dispatch reads for a heartbeat with new counters (or a new heartbeat)."""
        waiting, handed, running, load = (max(n, 0) for n in keys.parse_counters(counts))
        worker = {**entry[2], "waiting": waiting + handed, "jobs": waiting + handed + running, "load": load / 1000}
        beats[name] = (*entry[:3], counts, worker)
        return worker

    def known_queues(self) -> list[str]:
        """Every GPU queue that ever sent a heartbeat and was not forgotten (alive or not)."""
        return [_text(q) for q in self.redis.zrange(WORKERS, 0, -1)]

    def known(self, max_age: float = 0.0) -> dict[str, dict]:
        """Every GPU queue the fleet has ever had → its last heartbeat's labels. `max_age`: this
        process's last reading may serve if it is younger (the caller reads again before it
        refuses anything on its strength). Not to be mutated."""
        now = time.monotonic()
        if self._known is None or now - self._known_at >= max_age:
            self._known = {_text(q): json.loads(v) for q, v in self.redis.hgetall(keys.KNOWN_WORKERS).items()}
            self._known_at = now
        return self._known

    def forget(self, queue: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(WORKERS, queue)
        pipe.hdel(keys.HEARTBEAT_TIMES, queue)
        pipe.hdel(keys.HEARTBEATS, queue)
        pipe.execute()
