"""The fleet registry: each worker's heartbeat in Redis, read back in one round trip.

A worker writes `cs:worker:<queue>` (JSON, with a TTL) and its last-seen time in the
`cs:workers` sorted set. A worker whose heartbeat expired is not alive, whatever it last said.
Reading the fleet (for dispatch or `GET /workers`) is one Lua call, however large the fleet:
every live heartbeat plus its queue's backlog (jobs waiting, cost of jobs waiting or running).
"""
from __future__ import annotations

import json
import time

import redis

from common import metrics

WORKERS = "cs:workers"

# ARGV[1]: oldest last-seen time still alive. Returns flat triples per live worker:
# heartbeat JSON, jobs waiting, total cost waiting or running (as a string: Lua numbers
# would be truncated to integers on the way out).
_ALIVE = """
local names = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local out = {}
for _, name in ipairs(names) do
  local beat = redis.call('GET', 'cs:worker:' .. name)
  if beat then
    local load = 0
    for _, cost in ipairs(redis.call('HVALS', 'cs:load:' .. name)) do load = load + tonumber(cost) end
    out[#out + 1] = beat
    out[#out + 1] = redis.call('ZCARD', 'cs:queued:' .. name)
    out[#out + 1] = tostring(load)
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
        # Its labels outlive the heartbeat: /metrics reports a dead worker under the same series.
        pipe.hset(metrics.WORKER_LABELS, beat["queue"], json.dumps(metrics.worker_labels(beat)))
        pipe.execute()

    def withdraw(self, queue: str) -> None:
        """A worker leaving for good (warm shutdown done): it is dead at once, not after its TTL."""
        self.redis.delete(worker_key(queue))

    def alive(self) -> list[dict]:
        """Live workers' heartbeats, each with `waiting` (jobs not started) and `load`
        (cost units waiting or running on it)."""
        flat = self._alive(keys=[WORKERS], args=[time.time() - self.ttl])
        workers = []
        for beat, waiting, load in zip(flat[::3], flat[1::3], flat[2::3]):
            record = json.loads(beat)
            record["waiting"] = int(waiting)
            record["load"] = float(load)
            workers.append(record)
        return workers

    def known_queues(self) -> list[str]:
        """Every GPU queue that ever sent a heartbeat (alive or not)."""
        return [q.decode() for q in self.redis.zrange(WORKERS, 0, -1)]

    def forget(self, queue: str) -> None:
        self.redis.zrem(WORKERS, queue)
        self.redis.hdel(metrics.WORKER_LABELS, queue)
