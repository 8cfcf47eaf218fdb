"""Figure 4: cancel latency at each stage a job can be in.

Each round puts three jobs in place on one simulator: A running, B waiting inside ComfyUI's
queue (the worker keeps the next prompt there), C still in Celery (both worker slots are
taken). Then DELETE C, B, A in turn and time, from just before each DELETE:

- → the simulator stops it: B's deletion is seen as ComfyUI's `status` broadcast on our own
  websocket; A's stop is its busy-record end (outcome `interrupted`), the interrupt's
  arrival (`interrupts[].t`) beside it; C never reaches the simulator (checked).
- → the API shows `cancelled` (the DELETE answer, or the first GET after it).

Baseline in the same run: ComfyClient.cancel() straight on the simulator for a running and
a pending prompt (the floor of stopping a prompt in ComfyUI at all).

A running prompt stops at its next step check, so both stop times include the rest of the
step the cancel lands in. Both rounds therefore time their running cancel at the same phase
distribution: after the pending one's cancel, the same fixed pause plus a seeded uniform delay
in [0, one step), the same delay for round n of both (uniform, the landing phase is uniform
whatever the anchor's own phase was).
"""
from __future__ import annotations

import random
import time

from bench.harness import API, StatusListener, rendered, short_job, stack, summary, wait_until
from workers.comfy_client import ComfyClient

GOAL_RATIO = 1.5  # issue 16: API-visible cancel of a running job p95 ÷ the direct client's stop p95
STEP = 0.01  # the simulator's --step-seconds
LONG = {"steps": 100, "scenes": 4}  # 4 s of 10 ms steps: only our cancel ends it
SETTLE = 0.02  # s after the pending prompt's cancel before the running one's (both rounds)
SEED = 16  # the running cancels' phase delays (issue 16), the same in every run


def _delete(s, task_id: str) -> float:
    """DELETE, then (if the answer was 202) poll: when the API first showed `cancelled`."""
    doc = s.http.delete(f"{s.url}{API}/tasks/{task_id}", timeout=10).json()
    while doc.get("status") != "cancelled":
        if doc.get("status") in ("succeeded", "failed"):
            raise RuntimeError(f"task {task_id} ended {doc['status']} instead of cancelled")
        time.sleep(0.001)
        doc = s.task(task_id)
    return time.time()


def _running(sim, prompt_id: str) -> bool:
    return (sim.record()["running"] or {}).get("prompt_id") == prompt_id


def _prompt(s, task_id: str):
    return s.record(task_id).get("prompt_id")


def _service_round(s, sim, listener, delay: float) -> dict:
    a = s.submit(short_job(**LONG))["task_id"]
    pa = wait_until(lambda: _prompt(s, a), 10, interval=0.005, what="A submitted")
    wait_until(lambda: _running(sim, pa), 10, interval=0.005, what="A running")
    b = s.submit(short_job(**LONG))["task_id"]
    pb = wait_until(lambda: _prompt(s, b), 10, interval=0.005, what="B submitted")
    wait_until(lambda: pb in sim.record()["queued_at"], 10, interval=0.005, what="B in ComfyUI's queue")
    c = s.submit(short_job())["task_id"]
    time.sleep(0.05)  # C would be taken by now if a worker slot were free
    if s.record(c)["status"] != "queued":
        raise RuntimeError("C left Celery although both worker slots were busy")
    out = {}
    t0 = time.time()
    out["celery_api"] = _delete(s, c) - t0
    t0 = time.time()
    out["pending_api"] = _delete(s, b) - t0
    t_deleted = listener.first_after(t0)
    out["pending_sim"] = None if t_deleted is None else t_deleted - t0
    time.sleep(SETTLE + delay)
    t0 = time.time()
    out["running_api"] = _delete(s, a) - t0
    busy = wait_until(lambda: next((x for x in sim.record()["busy"] if x["prompt_id"] == pa), None), 10,
                      interval=0.005, what="A stopped")
    record = sim.record()
    out["running_sim"] = busy["end"] - t0
    out["running_interrupt"] = next(i["t"] for i in record["interrupts"] if i["interrupted_prompt_id"] == pa) - t0
    if busy["outcome"] != "interrupted" or pb not in record["deleted"]:
        raise RuntimeError(f"A {busy['outcome']}, B deleted: {pb in record['deleted']}")
    s.wait_records([a, b, c], timeout=20)
    wait_until(lambda: s.record(c).get("prompt_id") is None and sim.record()["running"] is None, 5,
               what="C never reached ComfyUI")
    return out


def _direct_round(client: ComfyClient, sim, listener, n: int, delay: float) -> dict:
    x = client.submit(rendered(short_job(**LONG), f"cx_{n}").api).prompt_id
    y = client.submit(rendered(short_job(**LONG), f"cy_{n}").api).prompt_id
    wait_until(lambda: _running(sim, x), 10, interval=0.005, what="X running")
    t0 = time.time()
    client.cancel(y)
    t_deleted = listener.first_after(t0)
    time.sleep(SETTLE + delay)
    t1 = time.time()
    client.cancel(x)
    busy = wait_until(lambda: next((b for b in sim.record()["busy"] if b["prompt_id"] == x), None), 10,
                      interval=0.005, what="X stopped")
    client.forget(x)
    client.forget(y)
    return {"pending_sim": None if t_deleted is None else t_deleted - t0, "running_sim": busy["end"] - t1}


def run(quick: bool = False) -> dict:
    rounds = 3 if quick else 100
    phase = random.Random(SEED)
    samples: dict[str, list] = {}
    base: dict[str, list] = {}
    with stack("cancel") as s:
        sim = s.sim(step=STEP)
        s.worker(sim)
        s.api()
        s.ready()
        s.wait_records([s.submit(short_job())["task_id"]])  # warm
        listener = StatusListener(sim.url)
        try:
            with ComfyClient(sim.url, timeout=10) as client:
                for n in range(rounds):
                    delay = phase.uniform(0, STEP)
                    for k, v in _service_round(s, sim, listener, delay).items():
                        samples.setdefault(k, []).append(v)
                    for k, v in _direct_round(client, sim, listener, n, delay).items():
                        base.setdefault(k, []).append(v)
        finally:
            listener.close()
    stats = {k: summary(v) for k, v in samples.items()}
    base_stats = {k: summary(v) for k, v in base.items()}
    # The goal covers every stage, both ends: the simulator stopping it and the API showing it.
    judged = ["celery_api", "pending_sim", "pending_api", "running_sim", "running_api"]
    worst = max(judged, key=lambda k: stats[k]["p95"])
    ratio = round(stats["running_api"]["p95"] / base_stats["running_sim"]["p95"], 2) \
        if base_stats["running_sim"]["p95"] else None
    met = ratio is not None and ratio <= GOAL_RATIO
    return {
        "title": "Cancel latency",
        "line": (f"p95 running: sim stops {stats['running_sim']['p95']:.1f} / API {stats['running_api']['p95']:.1f} ms; "
                 f"pending in ComfyUI: sim {stats['pending_sim']['p95']:.1f} / API {stats['pending_api']['p95']:.1f} ms; "
                 f"in Celery: API {stats['celery_api']['p95']:.1f} ms (direct client floor: running "
                 f"{base_stats['running_sim']['p95']:.1f}, pending {base_stats['pending_sim']['p95']:.1f} ms); "
                 f"running, API-visible ÷ direct stop p95 {ratio}×; goal ≤ {GOAL_RATIO:g}×"),
        "value": {k: stats[k]["p95"] for k in judged},
        "worst": {"stage": worst, "p95_ms": stats[worst]["p95"]},
        "goal": f"a running job's API-visible cancel p95 ≤ {GOAL_RATIO:g} × the direct client's stop p95",
        "ratio": ratio,
        "met": met,
        "baseline": {"name": "ComfyClient.cancel() on the simulator directly", "ms": base_stats,
                     "difference_p95_ms": {k: round(stats[k]["p95"] - base_stats[k]["p95"], 2) for k in base_stats}},
        "stages_ms": stats,
        "setup": {"rounds": rounds, "simulator": f"--step-seconds {STEP:g} (an interrupt lands at the next step, "
                                                 f"≤ {STEP * 1000:g} ms)",
                  "phase": f"both rounds cancel the running prompt {SETTLE * 1000:g} ms + a uniform random delay in "
                           f"[0, {STEP * 1000:g}) ms (seed {SEED}, the same delay for round n of both) after the "
                           "pending prompt's cancel, so the cancel lands at a uniform phase of the step in both",
                  "api": "gunicorn gevent -w 2 (as make run)", "worker": "WORKER_CONCURRENCY=2"},
        "series": {k: [round(x * 1000, 3) for x in v if x is not None] for k, v in samples.items()},
    }
