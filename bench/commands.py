"""Figure: Redis commands on one job's path, by who sends them and why.

Jobs run one at a time on one simulated GPU with PROGRESS_INTERVAL=0 (every ComfyUI progress
message is written) while Redis' MONITOR records every command. Each command that names the
job (its id is in a key or an argument) is attributed by its connection's client name
(`CLIENT LIST`): the GPU worker (`comfy-worker`), its log writer (`comfy-worker-logs`), the API
(`comfy-api`) or Celery's transport (unnamed). The worker's commands are split by what they
carry: a progress update, an output, or the job itself (hand-over, start, finish, ...).
Baseline in the same run: the job's own event log, which says how many progress updates and
outputs there were to write. A pipeline is several commands; the figure counts commands.
"""
from __future__ import annotations

import threading
import time

import redis

from bench.harness import stack
from common import keys
from tests.support.api import story

GOALS = {"worker_per_job": 6, "per_image": 1, "per_progress": 1}


class Monitor:
    """Every command Redis executes, with the address of the connection that sent it."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.lines: list[tuple[str, list[str]]] = []
        self._monitor = self.client.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for entry in self._monitor.listen():
                self.lines.append((f"{entry['client_address']}:{entry['client_port']}", entry["command"].split(" ")))
        except (redis.ConnectionError, ValueError, AttributeError, OSError):
            pass

    def close(self) -> None:
        try:
            self._monitor.connection.disconnect()
        except Exception:  # noqa: BLE001 - a monitor being torn down
            pass
        self._thread.join(2)


def _transition_event(words: list[str]) -> str | None:
    """The event a task-store transition call appends (ARGV[5]; common/task_store.py), if it is one."""
    if words[0].upper() != "EVALSHA" or len(words) < 3 or not words[2].isdigit():
        return None
    args = words[3 + int(words[2]):]
    return args[4] if len(args) > 4 else None


def _names(client: redis.Redis) -> dict[str, str]:
    return {c["addr"]: c.get("name") or "celery" for c in client.client_list()}


def run(quick: bool = False) -> dict:
    jobs = 4 if quick else 20
    with stack("commands", PROGRESS_INTERVAL="0") as s:
        sim = s.sim(step=0.02)
        s.worker(sim)
        s.api(workers=1)
        s.ready()
        s.wait_records([s.submit(story(steps=4))["task_id"]])  # warm: checkpoint loaded
        monitor = Monitor(s.fleet.redis.url)
        tasks = []
        for _ in range(jobs):
            task_id = s.submit(story(steps=6))["task_id"]
            s.wait_records([task_id], interval=0.05)
            tasks.append(task_id)
        time.sleep(0.6)  # the log writer's last batch (FLUSH_INTERVAL)
        names = _names(s.redis)
        monitor.close()
        counted = {"worker_job": 0, "worker_progress": 0, "worker_output": 0, "worker_logs": 0, "api": 0,
                   "celery": 0, "other": 0}
        progress_events = outputs = 0
        by_command: dict[str, int] = {}
        for task_id in tasks:
            log = s.redis.xrange(keys.events(task_id))
            progress_events += sum(1 for _, f in log if f[b"type"] == b"progress")
            outputs += sum(1 for _, f in log if f[b"type"] == b"output")
        wanted = set(tasks)
        for addr, words in monitor.lines:
            if not any(t in word for word in words for t in wanted):
                continue
            who = names.get(addr, "other")
            if who == "comfy-worker":
                event = _transition_event(words)
                kind = ("worker_progress" if event == "progress" else "worker_output" if event == "output"
                        else "worker_job")
                if kind == "worker_job":
                    by_command[words[0]] = by_command.get(words[0], 0) + 1
            elif who == "comfy-worker-logs":
                kind = "worker_logs"
            elif who == "comfy-api":
                kind = "api"
            elif who == "celery":
                kind = "celery"
            else:
                kind = "other"
            counted[kind] += 1
    value = {
        "worker_per_job": round(counted["worker_job"] / jobs, 2),
        "per_image": round(counted["worker_output"] / max(outputs, 1), 2),
        "per_progress": round(counted["worker_progress"] / max(progress_events, 1), 2),
        "worker_log_commands_per_job": round(counted["worker_logs"] / jobs, 2),
        "api_per_job": round(counted["api"] / jobs, 2),
        "celery_transport_per_job": round(counted["celery"] / jobs, 2),
        "worker_job_commands": {k: round(v / jobs, 2) for k, v in sorted(by_command.items())},
    }
    met = all(value[k] <= goal for k, goal in GOALS.items())
    line = (f"worker: {value['worker_per_job']} commands per job (goal ≤ {GOALS['worker_per_job']}), "
            f"{value['per_image']} per image, {value['per_progress']} per progress update; "
            f"+ logs {value['worker_log_commands_per_job']}, API {value['api_per_job']}, "
            f"Celery {value['celery_transport_per_job']} per job")
    goal = (f"worker ≤ {GOALS['worker_per_job']} per job, ≤ {GOALS['per_image']} per image, "
            f"≤ {GOALS['per_progress']} per progress update")
    return {"title": "Redis commands per job", "line": line, "met": met, "goal": goal, "value": value, "jobs": jobs,
            "progress_updates": progress_events, "outputs": outputs, "goals": GOALS}
