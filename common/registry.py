"""The fleet registry: each worker's heartbeat in Redis, read back in two round trips.

A worker writes its heartbeat (`keys.worker`, JSON, with a TTL), its last-seen time in
`keys.WORKERS`, and its labels (host, GPU index, ComfyUI URL, GPU name) in `keys.KNOWN_WORKERS`,
which outlives the heartbeat: a dead worker's alert still names its host, a pin naming a GPU or
host the fleet has never had is told apart from one that is down now, and the checkpoints of
GPUs scaled away are remembered. A worker whose
heartbeat expired is not alive, whatever it last said. Reading the fleet (dispatch,
`GET /workers`) is one read of the live queues, then one pipeline for their heartbeats and
backlogs: jobs waiting (in Celery or inside ComfyUI) and the total cost the task store keeps.
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

    def publish(self, beat: dict) -> None:
        now = time.time()
        beat = {**beat, "ts": now}
        labels = {k: beat.get(k) for k in LABELS}
        labels["gpu_name"] = (beat.get("gpu") or {}).get("name")
        labels["last_seen"] = now
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.worker(beat["queue"]), json.dumps(beat), px=int(self.ttl * 1000))
        pipe.zadd(WORKERS, {beat["queue"]: now})
        pipe.hset(keys.KNOWN_WORKERS, beat["queue"], json.dumps(labels, sort_keys=True))
        pipe.execute()

    def withdraw(self, queue: str) -> None:
        """A worker leaving for good (warm shutdown done): it is dead at once, not after its TTL."""
        self.redis.delete(keys.worker(queue))

    def alive(self) -> list[dict]:
        """Live workers' heartbeats, each with `waiting` (jobs not started), `jobs` (waiting or
        running) and `load` (cost units waiting or running on it)."""
        names = [_text(q) for q in self.redis.zrangebyscore(WORKERS, time.time() - self.ttl, "+inf")]
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.get(keys.worker(name))
            pipe.zcard(keys.waiting(name))
            pipe.zcard(keys.handed(name))
            pipe.scard(keys.running(name))
            pipe.get(keys.load(name))
        replies = pipe.execute()
        workers = []
        for i, _ in enumerate(names):
            beat, waiting, handed, running, load = replies[5 * i:5 * i + 5]
            if beat is None:
                continue
            record = json.loads(beat)
            record["waiting"] = int(waiting) + int(handed)
            record["jobs"] = record["waiting"] + int(running)
            record["load"] = max(int(load or 0), 0) / 1000
            workers.append(record)
        return workers

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
        self.redis.zrem(WORKERS, queue)
