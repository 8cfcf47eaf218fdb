"""The fleet registry: each worker's heartbeat in Redis, read back in one round trip.

A worker writes `cs:worker:<queue>` (JSON, with a TTL) and its last-seen time in the
`cs:workers` sorted set. A worker whose heartbeat expired is not alive, whatever it last said.
"""
from __future__ import annotations

import json
import time

import redis

WORKERS = "cs:workers"

# ARGV[1] oldest last-seen time still alive. Returns, per live worker, its heartbeat JSON and
# the number of jobs waiting in its queue: one round trip however large the fleet.
_ALIVE = """
local names = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local out = {}
for i, name in ipairs(names) do
  local beat = redis.call('GET', 'cs:worker:' .. name)
  if beat then
    out[#out + 1] = beat
    out[#out + 1] = redis.call('ZCARD', 'cs:queued:' .. name)
  end
end
return out
"""


def worker_key(queue: str) -> str:
    return f"cs:worker:{queue}"


class Registry:
    def __init__(self, client: redis.Redis, ttl: float):
        self.redis = client
        self.ttl = ttl
        self._alive = client.register_script(_ALIVE)

    def publish(self, beat: dict) -> None:
        now = time.time()
        beat = {**beat, "ts": now}
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(worker_key(beat["queue"]), json.dumps(beat), px=int(self.ttl * 1000))
        pipe.zadd(WORKERS, {beat["queue"]: now})
        pipe.execute()

    def withdraw(self, queue: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(worker_key(queue))
        pipe.zrem(WORKERS, queue)
        pipe.execute()

    def alive(self) -> list[dict]:
        """Live workers' heartbeats, each with `waiting`: jobs queued for it and not started."""
        flat = self._alive(keys=[WORKERS], args=[time.time() - self.ttl])
        workers = []
        for beat, waiting in zip(flat[::2], flat[1::2]):
            record = json.loads(beat)
            record["waiting"] = int(waiting)
            workers.append(record)
        return workers
