"""Figure: a submit's cost against the backlog, POST /generate with 100,000 jobs waiting ÷ with none.

Redis and the API under gunicorn (as `make run` starts it), no GPU worker: the benchmark publishes
one GPU's heartbeat through the service's Registry (as `throughput` does), so accepted jobs wait.
1. Empty backlog: M submits, one caller, one after another (only those M wait by the end).
2. 100,000 waiting jobs are seeded on the same GPU queue through `TaskStore.create`, the submit
   transition's own code (record, graphs, place in the queue, the queue's running cost total,
   active sets, event log), called directly on the stack's Redis from a few threads, not over
   HTTP, and without a Celery message (a broker list's push does not depend on its length).
3. The same M submits again.
Per phase: POST latency as the caller sees it, and Redis' own time per submit (INFO commandstats
`usec`: the Lua scripts a submit runs, `evalsha`/`eval`, and every command but INFO; the
heartbeat's few writes fall in both phases alike). Goal: each ≤ 1.2 × its empty-backlog value.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.harness import rendered, short_job, stack, summary
from bench.throughput import QUEUE, _heartbeat
from common import keys
from common.task_store import TaskStore, now_iso
from workflows.catalog import load_catalog
from workflows.render import payload_dictionary

GOAL = 1.2
SCRIPTS = ("evalsha", "eval")


def _usec(r) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["usec"] for k, v in r.info("commandstats").items() if k != "cmdstat_info"}


def _phase(s, count: int) -> dict:
    """`count` submits back to back: latency in ms and Redis µs per submit."""
    before, times, positions = _usec(s.redis), [], []
    for _ in range(count):
        t0 = time.perf_counter()
        doc = s.submit(short_job())
        times.append(time.perf_counter() - t0)
        positions.append(doc.get("queue_position"))
    after = _usec(s.redis)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    return {"latency_ms": summary(times), "redis_us_scripts": round(sum(delta.get(k, 0) for k in SCRIPTS) / count, 1),
            "redis_us_all": round(sum(delta.values()) / count, 1),
            "redis_us_by_command": {k: round(v / count, 1) for k, v in sorted(delta.items(), key=lambda kv: -kv[1])[:6] if v},
            "queue_position_last": positions[-1], "waiting_after": s.redis.zcard(keys.waiting(QUEUE))}


def _seed(s, jobs: int, threads: int = 4) -> float:
    """`jobs` waiting jobs through TaskStore.create; returns the seconds it took."""
    body = short_job()
    graphs = rendered(body, "cs_seed")
    payload = {"graph": graphs.api, "ui": graphs.ui, "progress_repeats": graphs.progress_repeats}
    store = TaskStore(s.redis, ttl=7 * 86400)
    dictionary = payload_dictionary(load_catalog()[graphs.workflow])  # as the API compresses them

    def create(n: int) -> None:
        for _ in range(n):
            task_id = str(uuid.uuid4())
            record = {"task_id": task_id, "status": "queued", "workflow": "storydiffusion", "queue": QUEUE,
                      "params": graphs.params, "owner": "anonymous", "created_at": now_iso(),
                      "created_ms": int(time.time() * 1000), "expected_images": graphs.expected_images,
                      "cancel_requested": False, "cost": graphs.cost, "checkpoint": graphs.checkpoint, "pin": {},
                      "attempts": 0, "attempt_log": []}
            if store.create(record, payload, dictionary=dictionary).outcome != "created":
                raise RuntimeError("seeding: a job was not created")
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(create, jobs // threads + (k < jobs % threads)) for k in range(threads)]:
            f.result()
    return time.monotonic() - t0


def run(quick: bool = False) -> dict:
    count, backlog = (100, 10_000) if quick else (300, 100_000)
    with stack("backlog") as s:
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(s, stop), daemon=True)
        beat.start()
        try:
            s.api()
            for _ in range(30):  # warm-up, not measured: each gunicorn thread opens its connections
                s.submit(short_job())
            empty = _phase(s, count)
            seed_s = _seed(s, backlog)
            full = _phase(s, count)
            memory = int(s.redis.info("memory")["used_memory"])
        finally:
            stop.set()
    ratios = {"latency_p50": round(full["latency_ms"]["p50"] / empty["latency_ms"]["p50"], 3),
              "latency_mean": round(full["latency_ms"]["mean"] / empty["latency_ms"]["mean"], 3),
              "redis_scripts": round(full["redis_us_scripts"] / empty["redis_us_scripts"], 3),
              "redis_all": round(full["redis_us_all"] / empty["redis_us_all"], 3)}
    met = all(v <= GOAL for v in ratios.values())
    line = (f"with {full['waiting_after'] - count:,} jobs waiting ÷ none: POST latency p50 {ratios['latency_p50']:.2f}× "
            f"({full['latency_ms']['p50']:.1f} / {empty['latency_ms']['p50']:.1f} ms), mean {ratios['latency_mean']:.2f}×; "
            f"Redis per submit: scripts {ratios['redis_scripts']:.2f}× ({full['redis_us_scripts']:.0f} / "
            f"{empty['redis_us_scripts']:.0f} µs), all commands {ratios['redis_all']:.2f}×; goal ≤ {GOAL} ×")
    return {
        "title": "Submit cost against the backlog",
        "line": line,
        "value": ratios,
        "goal": f"POST latency and Redis time per submit with {backlog:,} jobs waiting ≤ {GOAL} × with none",
        "met": met,
        "baseline": {"name": "the same submits with an empty backlog, same stack, same run", **empty},
        "backlog": full,
        "seeded": {"jobs": backlog, "seconds": round(seed_s, 1), "how": "TaskStore.create on the stack's Redis, 4 threads",
                   "redis_used_memory_mib": round(memory / 2**20, 1)},
        "setup": {"submits_per_phase": count, "api": "gunicorn gevent -w 2 (as make run)",
                  "caller": "one, back to back (requests.Session)", "body": "storydiffusion, 1 scene 256², 2 steps",
                  "worker": "none: a heartbeat published by the benchmark; jobs wait in Redis"},
    }
