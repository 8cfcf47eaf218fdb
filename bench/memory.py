"""Figure: Redis memory per job, waiting and finished, through the real code path.

The API under gunicorn, one worker and one simulator. Redis' `used_memory` (INFO memory) is read
before and after N jobs, divided by N:
- waiting: the worker is frozen (SIGSTOP) while N jobs are submitted, so each one waits in its
  queue: record, graphs, Celery message, indexes (and its event log, had it one yet);
- finished, while its event log is kept (EVENTS_TTL): after the worker thaws and all succeed;
- finished, for RESULT_TTL: once the event logs expired (this stack runs EVENTS_TTL=2 s): the
  record with its result (and the job's log list, had it stayed in Redis).
Baseline in the same run: the Redis of the same stack before any job (what the fleet itself
takes), subtracted. Jobs are StoryDiffusion, 2 characters and 4 scenes at 768×768.
"""
from __future__ import annotations

import signal
import time

from bench.harness import stack
from common import keys
from common.settings import Settings
from tests.support.api import story

GOALS = {"waiting_bytes": 4096, "finished_bytes": 2048}
CHARACTERS = [{"name": "Lena", "description": "a young woman with red hair"},
              {"name": "Tom", "description": "a tall man with a grey beard"}]
SCENES = ["[Lena] wakes up in a small flat", "[Tom] walks to the harbour at dawn",
          "[Lena] buys bread at the market", "[Tom] watches the sea"]


def _used(s) -> int:
    s.redis.execute_command("MEMORY", "PURGE")
    return int(s.redis.info("memory")["used_memory"])


def _breakdown(s, task_id: str) -> dict[str, int]:
    out = {}
    for name, key in (("record", keys.task(task_id)), ("record's long values", keys.task_long(task_id)),
                      ("graphs", keys.payload(task_id)),
                      ("event log", keys.events(task_id)), ("log lines", keys.logs(task_id))):
        size = s.redis.memory_usage(key, samples=0)
        if size:
            out[name] = int(size)
    return out


def run(quick: bool = False) -> dict:
    jobs = 40 if quick else 400
    with stack("memory", EVENTS_TTL="2") as s:
        sim = s.sim(step=0.005)
        worker = s.worker(sim)
        s.api(workers=1)
        s.ready()
        s.wait_records([s.submit(story(steps=2))["task_id"]])  # warm: every lazily made key exists
        time.sleep(3)  # its event log expires
        base = _used(s)
        worker.send(signal.SIGSTOP)
        try:
            body = story(scenes=SCENES, steps=4, width=768, height=768)
            body["characters"] = CHARACTERS
            tasks = [s.submit(body)["task_id"] for _ in range(jobs)]
            waiting = (_used(s) - base) / jobs
            sample_waiting = _breakdown(s, tasks[-1])
        finally:
            worker.send(signal.SIGCONT)
        records = s.wait_records(tasks, timeout=120 + jobs)
        failed = [r["status"] for r in records if r["status"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs did not succeed")
        time.sleep(1.0)  # the worker's last log batch
        finished_with_events = (_used(s) - base) / jobs
        sample_finished = _breakdown(s, tasks[-1])
        time.sleep(3)  # EVENTS_TTL=2: the event logs expire
        s.redis.execute_command("SCAN", 0, "COUNT", 10000)  # let lazy expiry see them
        finished = (_used(s) - base) / jobs
        sample_kept = _breakdown(s, tasks[-1])
    value = {"waiting_bytes": round(waiting), "finished_with_event_log_bytes": round(finished_with_events),
             "finished_bytes": round(finished), "jobs": jobs,
             "one_job": {"waiting": sample_waiting, "finished, event log kept": sample_finished,
                         "finished, for RESULT_TTL": sample_kept}}
    # What docs/deploy.md sizes Redis from: the measured bytes times a backlog and a job rate.
    days = Settings.model_fields["result_ttl"].default / 86400
    value["sizing"] = [{"what": "100,000 jobs waiting", "bytes": 100_000 * value["waiting_bytes"]},
                       {"what": f"10,000 jobs a day, each kept RESULT_TTL ({days:g} days, the default)",
                        "bytes": round(10_000 * days * value["finished_bytes"])}]
    met = value["waiting_bytes"] <= GOALS["waiting_bytes"] and value["finished_bytes"] <= GOALS["finished_bytes"]
    line = (f"{value['waiting_bytes']:,} B per waiting job (goal ≤ {GOALS['waiting_bytes']:,}), "
            f"{value['finished_bytes']:,} B per finished job kept RESULT_TTL (goal ≤ {GOALS['finished_bytes']:,}); "
            f"{value['finished_with_event_log_bytes']:,} B while its event log is kept (EVENTS_TTL)")
    return {"title": "Redis memory per job", "line": line, "met": met, "value": value, "goals": GOALS,
            "goal": goal_text(GOALS)}


def goal_text(goals: dict) -> str:
    return (f"≤ {goals['waiting_bytes']:,} B per waiting job, ≤ {goals['finished_bytes']:,} B per finished job "
            "kept RESULT_TTL")
