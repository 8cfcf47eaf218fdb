"""A chaos run: a whole fleet on loopback, jobs submitted at a steady rate through the HTTP API
while processes are killed and restarted on a schedule, then every accepted job accounted for.

Used by `tests/test_chaos.py` (short, in CI) and `bench/chaos.py` (`make chaos`, the long run).

The fleet is started piece by piece like an operator would: Redis with an fsynced append-only
file (restartable on it, same port), N simulators (each journaling its executions to a file that
survives its SIGKILL: `--record-file`), one `python -m workers` per simulator, the webhook worker,
the API under gunicorn. Faults come from `FAULTS`, a registry: `@fault("name")` adds one.

What the run decides about each accepted job, from evidence outside the service's own word
where it can (the simulators' journals, the stored files, the event log):

- final in time: succeeded / failed (by error code) / cancelled before the deadline, which is
  `deadline` seconds after the last fault plus the GPU time of the work still to do at that
  moment (jobs not final, and jobs not yet submitted, × the median GPU time of a job ÷ GPUs);
- stuck: its record exists but it was not final at the deadline ("late" when it became final
  during the extra watch after it, "never final" otherwise, with its state and a diagnosis: is
  its prompt in a simulator, its Celery message in Redis, the job in its worker's heartbeat);
- lost: accepted (a 202, or a submission without an answer whose Idempotency-Key names a task)
  but its record is gone at the end;
- duplicated: more than one *needless* successful GPU execution, or more than one result set.
  A job runs again legitimately when its ComfyUI died and took the finished prompt's history
  with it; so a second successful execution counts as a duplicate only when an earlier
  successful execution's simulator had not restarted between that execution's end and the
  later prompt being queued (the result was still there to collect). Also duplicated: files of
  more than one attempt in storage, or more than one final event in the job's event log.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import redis
import requests

from common import keys, redis_conn
from common.apikeys import ANONYMOUS
from common.settings import Settings
from common.compact import Dictionaries
from common.task_store import decode_record, parse_queue_counts
from tests.support.fleet import Fleet
from tests.support.procs import RedisServer, SimProcess, free_port, wait_until
from tests.support.sentinel import SentinelGroup

FINAL = ("succeeded", "failed", "cancelled")
# Fast failover, so recovery fits a test's time (production: 2 s, 10 s, 60 s, 60 s).
FAST_ENV = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "3", "COMFYUI_UNREACHABLE_DEADLINE": "3",
            "COMFYUI_STALL_TIMEOUT": "5", "MAX_ATTEMPTS": "3", "PROGRESS_INTERVAL": "0.2",
            "RATE_LIMIT": "off", "RATE_LIMIT_GENERATE": "off", "MAX_ACTIVE_JOBS_PER_KEY": "0", "MAX_ACTIVE_JOBS": "0"}
# Worker log lines worth counting after a run (what the service did under the faults).
LOG_SIGNALS = {
    "prompt lost by ComfyUI": "is lost (not in /queue nor /history)",
    "moved off a lost ComfyUI": "lost it (",
    "failover: worker gone": "is gone; starting it again",
    "result dropped (not ours)": "result dropped",
    "started here but not ours": "started in ComfyUI but is",
    "Celery could not ack after a connection loss": "cannot be acknowledged after a connection loss",
    "Redis ConnectionError": "ConnectionError",
    "traceback": "Traceback (most recent call last)",
}


@dataclass
class Plan:
    jobs: int = 100
    gpus: int = 3
    rate: float = 20.0                 # submissions per second
    faults: list[str] = field(default_factory=lambda: ["ws_drop", "worker_kill", "sim_kill", "redis_restart"])
    first_fault: float = 2.0           # seconds after the first submission
    fault_every: float = 4.0
    redis_down: float = 3.0            # seconds Redis stays dead
    restart_after: float = 1.0         # seconds before a killed worker or simulator is started again
    deadline: float = 60.0             # after the last fault (plus the run time of the work left then)
    watch: float = 30.0                # more watching after the deadline: late, or never final
    step_seconds: float = 0.02
    api_processes: int = 1
    submit_threads: int = 8
    seed: int = 14
    # Redis as a master/replica pair watched by three Sentinels (REDIS_URL=sentinel://...); the
    # master is called down after sentinel_down_ms, above redis_down so a restart is no failover.
    sentinel: bool = False
    sentinel_down_ms: int = 5000
    env: dict[str, str] = field(default_factory=dict)


def job_body(i: int) -> dict:
    """Alternating: SDXL (one image) and a two-scene story (two images), small and fast."""
    if i % 2:
        return {"characters": [{"name": "Lena", "description": "red hair"}], "width": 256, "height": 256,
                "scenes": [f"[Lena] reads letter {i}", "[Lena] walks to the sea"], "steps": 5, "seed": i}
    return {"workflow": "sdxl", "prompt": f"a lighthouse, chaos job {i}", "width": 256, "height": 256,
            "steps": 10, "seed": i}


def images_expected(body: dict) -> int:
    return len(body.get("scenes", [])) or 1


def needless_reruns(runs: list[dict], boots: dict[int, list[float]]) -> list[dict]:
    """Of one job's executions (`port`, `queued`, `start`, `end`, `outcome`), the successful ones
    that came after an earlier successful one whose result was still in its ComfyUI: that
    simulator did not boot again (`boots`: port → boot times) between the earlier execution's
    end and the later prompt being queued. A rerun after the result was lost with its ComfyUI is
    failover doing its job; a rerun while the result sat in /history is a duplicate."""
    ok = sorted((r for r in runs if r["outcome"] == "success"), key=lambda r: r["end"])
    needless = []
    for k, later in enumerate(ok[1:], start=1):
        queued = later["queued"] if later["queued"] is not None else later["start"]
        for earlier in ok[:k]:
            if not any(earlier["end"] <= b <= queued for b in boots.get(earlier["port"], [])):
                needless.append(later)
                break
    return needless


# -- faults -----------------------------------------------------------------------------------
class FaultUnavailable(Exception):
    """This fault cannot run in this tree (reported, not failed)."""


FAULTS: dict[str, Callable[["Chaos", int], dict]] = {}


def fault(name: str):
    """Register `fn(chaos, n) -> details` as a fault; `n` counts injections of this fault (to rotate targets)."""
    def register(fn):
        FAULTS[name] = fn
        return fn
    return register


@fault("worker_kill")
def _worker_kill(chaos: "Chaos", n: int) -> dict:
    worker = chaos.fleet.workers[chaos.pick(n)]
    worker.stop(signal.SIGKILL)
    time.sleep(chaos.plan.restart_after)
    worker.start()
    return {"target": worker.queue}


@fault("sim_kill")
def _sim_kill(chaos: "Chaos", n: int) -> dict:
    index = chaos.pick(n)
    sim = chaos.fleet.sims[index]
    sim.kill()  # SIGKILL: its queue and history are gone
    time.sleep(chaos.plan.restart_after)
    sim.start(wait=True)  # same port, same journal
    return {"target": f"simulator of {chaos.fleet.workers[index].queue} (:{sim.port})", "port": sim.port}


@fault("ws_drop")
def _ws_drop(chaos: "Chaos", n: int) -> dict:
    """Every simulator closes every websocket at once (a network blip between workers and GPUs)."""
    dropped = 0
    for sim in chaos.fleet.sims:
        try:
            sim.faults(drop_websockets=True)
            dropped += 1
        except requests.RequestException:
            pass  # a simulator being restarted by another fault
    return {"target": f"{dropped} simulators"}


@fault("redis_restart")
def _redis_restart(chaos: "Chaos", n: int) -> dict:
    # With Sentinels: the current master, back on its AOF before they would call it down.
    node = chaos.group.master() if chaos.group else chaos.fleet.redis
    node.kill()  # SIGKILL: no shutdown save; the AOF (fsync always) has every write
    time.sleep(chaos.plan.redis_down)
    if chaos.group:
        node.args = chaos.group.node_args()  # it is the master: it comes back as one
    node.start(timeout=30)
    return {"target": f"redis :{node.port} (down {chaos.plan.redis_down:g} s, back on its AOF)"}


@fault("sentinel_failover")
def _sentinel_failover(chaos: "Chaos", n: int) -> dict:
    """SIGKILL the master; the Sentinels promote its replica; the old master comes back as the
    new one's replica (a real failover of a master/replica pair, on loopback)."""
    if chaos.group is None:
        raise FaultUnavailable("the fleet runs without Sentinels (Plan.sentinel)")
    old = chaos.group.master()
    old.kill()
    t0 = time.monotonic()
    new = chaos.group.wait_failover(old.port, timeout=60)
    promoted = time.monotonic() - t0
    old.args = chaos.group.node_args(replica_of=new.port)
    old.start(timeout=30)
    return {"target": f"master :{old.port} killed; :{new.port} promoted after {promoted:.1f} s"}


# -- the run ----------------------------------------------------------------------------------
@dataclass
class Submission:
    index: int
    key: str                       # Idempotency-Key
    sent_at: float = 0.0
    answered_at: float | None = None
    status: int | None = None      # HTTP status; None: no answer
    code: str | None = None        # error code, or the exception's name without an answer
    task_id: str | None = None
    maybe_task_id: str | None = None  # a refusal that named the job it may have queued


class Chaos:
    def __init__(self, plan: Plan, workdir: Path, log: Callable[[str], None] = print):
        self.plan, self.workdir, self.log = plan, Path(workdir), log
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(plan.seed)
        self.run_id = f"chaos-{int(time.time())}-{plan.seed}"
        self.fleet: Fleet | None = None
        self.subs: list[Submission] = []
        self.events: list[dict] = []
        self.t0 = 0.0

    def pick(self, n: int) -> int:
        """Which GPU a fault hits: rotating from a seeded start, so successive kills spread out."""
        if not hasattr(self, "_offset"):
            self._offset = self.rng.randrange(self.plan.gpus)
        return (self._offset + n) % self.plan.gpus

    # -- fleet ----------------------------------------------------------------------------------
    def start(self) -> None:
        plan, wd = self.plan, self.workdir
        self.group = None
        if plan.sentinel:
            self.group = SentinelGroup(wd / "redis", down_after_ms=plan.sentinel_down_ms, failover_timeout_ms=10_000,
                                       durable=True)
            store = self.group
        else:
            store = RedisServer(port=free_port(), workdir=wd, durable=True)
        env = self.env = {**FAST_ENV, **({"REDIS_MIN_REPLICAS": "1"} if plan.sentinel else {}), **plan.env}
        fleet = Fleet(workdir=wd, redis=store, extra_env=env)
        self.fleet = fleet
        fleet.redis.start()
        for i in range(plan.gpus):
            port = free_port()
            sim = SimProcess(port=port, workdir=wd, args=[
                "--step-seconds", str(plan.step_seconds), "--load-seconds", "0.05",
                "--record-file", str(wd / f"record-{port}.jsonl")])
            fleet.sims.append(sim.start(wait=False))
        for sim in fleet.sims:
            sim.wait_ready(30)
        for i, sim in enumerate(fleet.sims):
            fleet.add_worker(sim, queue=f"gpu.chaos.{i}")
        fleet.add_webhook_worker()
        fleet.wait_workers(timeout=60)
        fleet.start_api(processes=plan.api_processes)
        # The harness's own client follows the master as the fleet does.
        self.redis = redis_conn.connect(Settings(REDIS_URL=fleet.redis.url), socket_timeout=5)
        wait_until(lambda: requests.get(fleet.url + "/readyz", timeout=2).status_code == 200, 30, what="/readyz")

    def stop(self) -> None:
        if self.fleet:
            self.fleet.stop()

    # -- submitting and breaking ----------------------------------------------------------------
    def _submit(self, sub: Submission, session: requests.Session) -> None:
        sub.sent_at = time.time() - self.t0
        try:
            r = session.post(self.fleet.url + "/api/v1/generate", json=job_body(sub.index), timeout=10,
                             headers={"Idempotency-Key": sub.key})
        except requests.RequestException as exc:
            sub.code = type(exc).__name__
            return
        sub.answered_at = time.time() - self.t0
        sub.status = r.status_code
        try:
            doc = r.json()
        except ValueError:
            doc = {}
        if r.status_code == 202:
            sub.task_id = doc.get("task_id")
        else:
            sub.code = (doc.get("error") or {}).get("code") or "no_error_body"
            # A 503 that names the job and says it may have been queued told the caller the truth.
            details = (doc.get("error") or {}).get("details") or {}
            if details.get("queued") == "unknown" and details.get("task_id"):
                sub.code += " (may be queued)"
                sub.maybe_task_id = details["task_id"]

    def _fault_loop(self, stop: threading.Event) -> None:
        plan, counts = self.plan, Counter()
        for k, name in enumerate(plan.faults):
            at = plan.first_fault + k * plan.fault_every
            if stop.wait(max(0.0, self.t0 + at - time.time())):
                return
            start = time.time() - self.t0
            event = {"fault": name, "at": round(start, 2)}
            try:
                event.update(FAULTS[name](self, counts[name]))
                event["restored"] = round(time.time() - self.t0, 2)
            except FaultUnavailable as exc:
                event["skipped"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - a broken injection is reported, the run goes on
                event["error"] = f"{type(exc).__name__}: {exc}"
            counts[name] += 1
            self.events.append(event)
            self.log(f"chaos: +{start:5.1f} s {name}: {event.get('target') or event.get('skipped') or event.get('error')}")

    def run(self) -> dict:
        plan = self.plan
        self.subs = [Submission(i, f"{self.run_id}-{i}") for i in range(plan.jobs)]
        stop = threading.Event()
        self.t0 = time.time()
        faults = threading.Thread(target=self._fault_loop, args=(stop,), name="chaos-faults", daemon=True)
        faults.start()
        local = threading.local()

        def send(sub):
            if not hasattr(local, "session"):
                local.session = requests.Session()
            self._submit(sub, local.session)

        with ThreadPoolExecutor(plan.submit_threads, thread_name_prefix="chaos-submit") as pool:
            for sub in self.subs:  # a steady rate: each submission at its own time, late ones at once
                time.sleep(max(0.0, self.t0 + sub.index / plan.rate - time.time()))
                pool.submit(send, sub)
        submitted_at = time.time() - self.t0
        faults.join(plan.first_fault + len(plan.faults) * (plan.fault_every + plan.redis_down + 30))
        stop.set()
        self._resolve_unanswered()
        injected = [e for e in self.events if "restored" in e]
        last_fault = max((e["restored"] for e in injected), default=submitted_at)
        allowance = self._run_time_left(last_fault)
        deadline = last_fault + plan.deadline + allowance
        self.log(f"chaos: submitted {plan.jobs} in {submitted_at:.1f} s; last fault over at +{last_fault:.1f} s; "
                 f"deadline +{deadline:.1f} s (60 s + {allowance:.1f} s of GPU work left)")
        final_seen = self._watch(deadline + plan.watch)
        return self._account(submitted_at, last_fault, allowance, deadline, final_seen)

    def _resolve_unanswered(self) -> None:
        """A submission without an HTTP answer, or refused, may still have queued a job: its
        Idempotency-Key names the task if one was created."""
        for sub in self.subs:
            if sub.task_id:
                continue
            digest = hashlib.sha256(sub.key.encode()).hexdigest()
            try:
                raw = self.redis.get(keys.idempotency(ANONYMOUS, digest))
            except redis.RedisError:
                raw = None
            if raw:
                sub.task_id = json.loads(raw).get("task_id")

    def _gpu_seconds_per_job(self) -> float:
        ok = [e["end"] - e["start"] for e in self.executions() if e["outcome"] == "success"]
        return statistics.median(ok) if ok else 1.0

    def _run_time_left(self, at: float) -> float:
        """GPU time of the work not final at `at` (seconds after t0), spread over the GPUs."""
        accepted = [s for s in self.subs if s.task_id]
        finished = self._finished_at([s.task_id for s in accepted])
        left = sum(1 for s in accepted if finished.get(s.task_id) is None or finished[s.task_id] > at)
        left += sum(1 for s in self.subs if s.sent_at > at and not s.task_id)
        return left * self._gpu_seconds_per_job() / self.plan.gpus

    def _finished_at(self, task_ids: list[str]) -> dict[str, float | None]:
        """Seconds after t0 at which each record says it finished (None: not final)."""
        out = {}
        pipe = self.redis.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hmget(keys.task(tid), "status", "finished_at")
        for tid, (status, finished) in zip(task_ids, pipe.execute()):
            status = json.loads(status) if status else None
            if status in FINAL and finished:
                out[tid] = datetime.fromisoformat(json.loads(finished).replace("Z", "+00:00")).timestamp() - self.t0
            else:
                out[tid] = None
        return out

    def _watch(self, until: float) -> dict[str, float]:
        """Poll the records (Redis, cheap) until every accepted job is final or `until` (seconds after t0)."""
        pending = {s.task_id for s in self.subs if s.task_id}
        seen: dict[str, float] = {}
        while pending and time.time() - self.t0 < until:
            try:
                for tid, at in self._finished_at(sorted(pending)).items():
                    if at is not None:
                        seen[tid] = time.time() - self.t0
                        pending.discard(tid)
            except redis.RedisError:
                pass
            time.sleep(0.5)
        return seen

    # -- evidence -------------------------------------------------------------------------------
    def executions(self) -> list[dict]:
        """Every prompt any simulator queued, from the journals: task, port, times, outcome, boot."""
        out = []
        for path in sorted(self.workdir.glob("record-*.jsonl")):
            port = int(path.stem.split("-")[1])
            boot, prompts = 0, {}
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut by the SIGKILL
                kind = e["e"]
                if kind == "boot":
                    boot += 1
                    continue
                p = prompts.setdefault(e["prompt_id"], {"prompt_id": e["prompt_id"], "port": port, "boot": boot,
                                                        "task_id": None, "queued": None, "start": None, "end": None,
                                                        "outcome": "never started"})
                if kind == "queued":
                    p["queued"] = e["t"] - self.t0
                    prefix = next((x for x in e.get("prefixes", []) if x.startswith("cs_")), None)
                    p["task_id"] = prefix[3:] if prefix else None
                elif kind == "started":
                    p["start"], p["outcome"] = e["start"] - self.t0, "killed with its simulator"
                elif kind == "ended":
                    p["start"], p["end"], p["outcome"] = e["start"] - self.t0, e["end"] - self.t0, e["outcome"]
                elif kind == "deleted":
                    p["outcome"] = "deleted"
            out += [{**p, "restarted_after": p["boot"] < boot} for p in prompts.values()]
        return out

    def _boot_times(self) -> dict[int, list[float]]:
        """When each simulator lost its history: killed (the fault's start) or booted again."""
        times = defaultdict(list)
        for event in self.events:
            if event["fault"] == "sim_kill" and "port" in event:
                times[event["port"]].append(event["at"])
        for path in self.workdir.glob("record-*.jsonl"):
            port = int(path.stem.split("-")[1])
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e["e"] == "boot":
                    times[port].append(e["t"] - self.t0)
        return times

    def _stored_attempts(self, task_id: str) -> list[str]:
        folder = self.workdir / "outputs" / task_id
        return sorted({p.name.split("_")[0] for p in folder.iterdir() if "_" in p.name}) if folder.is_dir() else []

    def _diagnose(self, task_id: str, record: dict, runs: list[dict]) -> dict:
        """Why a job is not final: who, if anyone, still holds it."""
        queue, prompt = record.get("queue"), record.get("prompt_id")
        beat_raw = self.redis.hget(keys.HEARTBEATS, queue) if queue else None
        beat = json.loads(beat_raw) if beat_raw else None
        messages = sum(task_id in m.decode(errors="replace") for m in self.redis.lrange(keys.celery_queue(queue), 0, -1)) if queue else 0
        unacked = sum(task_id in v.decode(errors="replace") for v in self.redis.hvals("unacked"))
        run = next((r for r in runs if r["prompt_id"] == prompt), None)
        return {
            "state": record.get("state"), "status": record.get("status"), "queue": queue, "gpu": record.get("gpu"),
            "attempts": record.get("attempts"), "attempt_log": [a.get("code") for a in record.get("attempt_log") or []],
            "prompt_id": prompt, "handed_at": record.get("handed_at"), "started_at": record.get("started_at"),
            "worker_alive": bool(beat), "worker_is_owner": bool(beat and beat.get("instance") == record.get("worker")),
            "in_worker_heartbeat": bool(beat and task_id in (beat.get("running") or [])),
            "celery_messages_waiting": messages, "celery_messages_unacked": unacked,
            # What the monitor's lost-message check compares (workers/monitor.py): the queue's
            # counters (waiting, handed, running), its messages, and every unacknowledged one.
            "queue_counts": parse_queue_counts(self.redis.hgetall(keys.QUEUE_COUNTS)).get(queue) if queue else None,
            "queue_messages": self.redis.llen(keys.celery_queue(queue)) if queue else 0,
            "unacked_total": self.redis.hlen(keys.CELERY_UNACKED),
            "prompt_in_simulator": (f"{run['outcome']} on :{run['port']}"
                                    + (" (that simulator restarted since)" if run["restarted_after"] else "")
                                    if run else "never reached a simulator"),
        }

    def _log_signals(self) -> dict:
        counts = {}
        for name, needle in LOG_SIGNALS.items():
            per = {}
            for proc in [*self.fleet.workers, *self.fleet.extra_procs, self.fleet.api]:
                n = proc.output().count(needle) if proc else 0
                if n:
                    per[proc.name] = n
            if per:
                counts[name] = per
        return counts

    def _account(self, submitted_at: float, last_fault: float, allowance: float, deadline: float,
                 final_seen: dict[str, float]) -> dict:
        session = requests.Session()
        wait_until(lambda: session.get(self.fleet.url + "/readyz", timeout=2).status_code == 200, 30,
                   what="/readyz after the run")
        accepted = [s for s in self.subs if s.task_id]
        refused = Counter()
        for s in self.subs:
            if s.status != 202:
                refused[f"{s.status or 'no answer'} {s.code}"] += 1
        refused_at = defaultdict(list)  # when each kind of refusal was sent (first, last)
        for s in self.subs:
            if s.status != 202:
                refused_at[f"{s.status or 'no answer'} {s.code}"].append(s.sent_at)
        recorded_anyway = [s for s in self.subs if s.status != 202 and s.task_id]
        runs_by_task = defaultdict(list)
        executions = self.executions()
        for e in executions:
            runs_by_task[e["task_id"]].append(e)
        boots = self._boot_times()
        finished = self._finished_at([s.task_id for s in accepted])
        pipe = self.redis.pipeline(transaction=False)
        for s in accepted:
            pipe.hgetall(keys.task(s.task_id))
            pipe.xrange(keys.events(s.task_id))
            pipe.hgetall(keys.task_long(s.task_id))
        raw = pipe.execute()

        outcome, failed, lost, stuck, duplicated, wrong_results = Counter(), Counter(), [], [], [], []
        for k, s in enumerate(accepted):
            tid = s.task_id
            record = decode_record(raw[3 * k], raw[3 * k + 2], Dictionaries(self.redis))
            events = [fields.get(b"type", b"").decode() for _, fields in raw[3 * k + 1]]
            r = session.get(f"{self.fleet.url}/api/v1/tasks/{tid}", timeout=10)
            if r.status_code == 404 or not record:
                lost.append({"task_id": tid, "http": r.status_code, "submission": s.index})
                continue
            doc = r.json()
            status = doc["status"]
            at = finished.get(tid)
            if at is None or at > deadline:
                stuck.append({"task_id": tid, "final_after_s": round(at, 1) if at is not None else None,
                              **({"final_status": status} if at is not None else
                                 self._diagnose(tid, record, runs_by_task[tid]))})
            if status in FINAL:
                outcome[status] += 1
            if status == "failed":
                failed[(doc.get("error") or {}).get("code", "?")] += 1
            if status == "succeeded" and len(doc["result"]["images"]) != images_expected(job_body(s.index)):
                wrong_results.append({"task_id": tid, "images": len(doc["result"]["images"])})
            runs = runs_by_task[tid]
            needless = needless_reruns(runs, boots)
            stored = self._stored_attempts(tid)
            final_events = [e for e in events if e in FINAL]
            if needless or len(stored) > 1 or len(final_events) > 1:
                duplicated.append({
                    "task_id": tid, "status": status, "stored_attempts": stored, "final_events": len(final_events),
                    "executions": [f"{r['outcome']} on :{r['port']} +{r['start'] or 0:.1f}…"
                                   f"{'+%.1f' % r['end'] if r['end'] is not None else '?'} s" for r in
                                   sorted(runs, key=lambda r: r["queued"] or 0)],
                    "attempt_log": [a.get("code") for a in record.get("attempt_log") or []],
                    "faults_between": self._faults_between(runs),
                })
        finals = [v for v in finished.values() if v is not None]
        everyone_final = len(finals) == len(accepted) and not lost
        recovery = max(0.0, max(finals) - last_fault) if finals and everyone_final else None
        plan = self.plan
        result = {
            "plan": {"jobs": plan.jobs, "gpus": plan.gpus, "rate_per_s": plan.rate, "step_seconds": plan.step_seconds,
                     "faults": plan.faults, "fault_every_s": plan.fault_every, "redis_down_s": plan.redis_down,
                     "deadline_s": plan.deadline, "api_processes": plan.api_processes,
                     "settings": {k: v for k, v in self.env.items() if not k.startswith(("RATE", "MAX_ACTIVE"))},
                     "redis": "a master and its replica under three Sentinels" if plan.sentinel else "one Redis, AOF always"},
            "faults": self.events,
            "submitted_in_s": round(submitted_at, 1), "last_fault_s": round(last_fault, 1),
            "run_time_allowance_s": round(allowance, 1), "deadline_s": round(deadline, 1),
            # accepted: answered 202; the service also holds the jobs of submissions that got no answer
            # or a refusal but whose Idempotency-Key names a task: all of them are accounted for below.
            "accepted": sum(1 for s in self.subs if s.status == 202),
            "accepted_without_answer": sum(1 for s in accepted if s.status is None),
            "refused": dict(refused),
            "refused_when_s": {k: [round(min(v), 1), round(max(v), 1)] for k, v in refused_at.items()},
            # Refused with no word that it may run, yet queued: the caller was told something untrue.
            "refused_but_queued": sum(1 for s in recorded_anyway if s.status is not None and not s.maybe_task_id),
            "succeeded": outcome["succeeded"], "failed": dict(failed), "cancelled": outcome["cancelled"],
            "lost": lost, "stuck": stuck, "duplicated": duplicated, "wrong_results": wrong_results,
            "submit": self._submit_latency(),
            "gpu_executions": dict(Counter(e["outcome"] for e in executions)),
            "gpu_seconds_per_job": round(self._gpu_seconds_per_job(), 3),
            "all_final": everyone_final,
            "recovery_s": round(recovery, 1) if recovery is not None else None,
            "log_signals": self._log_signals(),
        }
        result["summary"] = summary(result)
        (self.workdir / "chaos-result.json").write_text(json.dumps(result, indent=1) + "\n")
        return result

    def _faults_between(self, runs: list[dict]) -> list[str]:
        """The faults from just before the job's first prompt was queued to its last one queued."""
        queued = [r["queued"] for r in runs if r["queued"] is not None]
        if not queued:
            return []
        return [f"{e['fault']} {e.get('target', '')} +{e['at']:.1f}…+{e['restored']:.1f} s".strip() for e in self.events
                if "restored" in e and min(queued) - 1 <= e["restored"] and e["at"] <= max(queued)]

    def _submit_latency(self) -> dict:
        """How POST /generate answered: latency, and after each Redis restart how long until the
        first 202 to a request sent after Redis was back (the API recovering by itself)."""
        ms = sorted((s.answered_at - s.sent_at) * 1000 for s in self.subs if s.answered_at is not None)
        out = {"p50_ms": round(statistics.median(ms), 1) if ms else None,
               "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1) if ms else None,
               "max_ms": round(ms[-1], 1) if ms else None, "after_redis_restart": []}
        for e in self.events:
            if e["fault"] == "redis_restart" and "restored" in e:
                during = [s for s in self.subs if e["at"] <= s.sent_at < e["restored"]]
                ok = [s.answered_at for s in self.subs if s.status == 202 and s.sent_at >= e["restored"]]
                out["after_redis_restart"].append({
                    "sent_while_down": len(during), "of_them_202": sum(1 for s in during if s.status == 202),
                    "slowest_answer_while_down_ms": round(max(((s.answered_at or s.sent_at) - s.sent_at) * 1000
                                                              for s in during), 1) if during else None,
                    "first_202_after_s": round(min(ok) - e["restored"], 2) if ok else None})
        return out


def summary(r: dict) -> str:
    """One readable line."""
    refused = sum(r["refused"].values())
    failed = sum(r["failed"].values())
    never = sum(1 for s in r["stuck"] if s["final_after_s"] is None)
    faults = ", ".join(f"{e['fault']}{' (skipped)' if 'skipped' in e else ' (ERROR)' if 'error' in e else ''}"
                       for e in r["faults"])
    rec = f"{r['recovery_s']:.1f} s" if r["recovery_s"] is not None else "never (not every job final)"
    return (f"{r['plan']['jobs']} jobs on {r['plan']['gpus']} GPUs at {r['plan']['rate_per_s']:g}/s, faults: {faults} | "
            f"accepted {r['accepted']}, refused {refused} {r['refused'] or ''}, succeeded {r['succeeded']}, "
            f"failed {failed} {r['failed'] or ''}, cancelled {r['cancelled']}, lost {len(r['lost'])}, "
            f"stuck {len(r['stuck'])} ({never} never final), duplicated {len(r['duplicated'])}, "
            f"wrong results {len(r['wrong_results'])} | last fault +{r['last_fault_s']} s, every job final "
            f"{rec} after it (deadline {r['deadline_s'] - r['last_fault_s']:.1f} s)")


def failures(r: dict) -> list[str]:
    """What the run breaks of issue 14's bar (empty: it passed)."""
    out = []
    if r["lost"]:
        out.append(f"{len(r['lost'])} lost")
    for label, jobs in (("stuck", r["stuck"]),):
        if jobs:
            states = Counter(j.get("state") or f"final late ({j.get('final_status')})" for j in jobs)
            out.append(f"{len(jobs)} {label} (" + ", ".join(f"{n} {s}" for s, n in states.items()) + ")")
    if r["duplicated"]:
        out.append(f"{len(r['duplicated'])} duplicated")
    if r["failed"]:
        out.append(f"{sum(r['failed'].values())} failed {r['failed']}")
    if r["wrong_results"]:
        out.append(f"{len(r['wrong_results'])} with the wrong number of images")
    if r["refused_but_queued"]:
        out.append(f"{r['refused_but_queued']} refused but queued anyway")
    return out


def run(plan: Plan, workdir: Path, log: Callable[[str], None] = print) -> dict:
    """Start the fleet, run the plan, stop everything (also on error)."""
    chaos = Chaos(plan, workdir, log)
    try:
        chaos.start()
        return chaos.run()
    finally:
        chaos.stop()


if __name__ == "__main__":  # a quick manual run: python -m tests.support.chaos [jobs] [gpus]
    import tempfile

    n, g = (int(sys.argv[1]) if len(sys.argv) > 1 else 60), (int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    result = run(Plan(jobs=n, gpus=g, rate=6), Path(tempfile.mkdtemp(prefix="chaos-")))
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=1))
    print(result["summary"])
