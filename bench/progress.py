"""Figure 6: progress freshness, a simulator progress event → visible in GET /tasks/{id}.

Method: the worker reaches its simulator through `bench.tap`, a pass-through that stamps
each websocket `progress` frame as it leaves the simulator (ComfyUI sends a prompt's
progress only to the submitting client's socket, so it cannot be watched from outside).
A poller reads GET /tasks/{id} every ~2 ms; the first answer showing sampler step k is when
step k became visible (its receipt time: an upper bound, within one poll). Latency = that
minus the tap's stamp of step k. The stack runs PROGRESS_INTERVAL=0 (the default): every ComfyUI progress
message is written (one Redis command each, the `commands` figure counts them); the goal is on
the age of the step a caller sees (issue 16), the write latency is reported beside it.

Baseline in the same run: the service's ComfyClient driving the simulator directly through
the same tap, its event callback time minus the tap's stamp (the transport floor).
"""
from __future__ import annotations

import json
import socket
import sys
import time

from bench.harness import rendered, short_job, stack, summary, wait_until
from tests.support.procs import free_port
from workers.comfy_client import ComfyClient, Progress

GOAL_P95_MS = 50.0  # the age of the progress a caller reads, p95 (issue 16)
STEPS, STEP_SECONDS = 60, 0.03
PROGRESS_INTERVAL = 0.0


def _stamps(path) -> dict[tuple[str, int], float]:
    stamps = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        stamps.setdefault((e["prompt_id"], e["value"]), e["t"])
    return stamps


def _watch(s, task_id: str) -> list[tuple[float, str, int]]:
    """(receipt time, status, step) of every poll until the job ends."""
    polls = []
    while True:
        doc = s.task(task_id)
        t = time.time()
        progress = doc.get("progress") or {}
        polls.append((t, doc["status"], progress.get("step", 0) if progress.get("max", 0) == STEPS else 0))
        if doc["status"] in ("succeeded", "failed", "cancelled"):
            return polls
        time.sleep(0.002)


def run(quick: bool = False) -> dict:
    jobs = 1 if quick else 6
    with stack("progress", PROGRESS_INTERVAL=str(PROGRESS_INTERVAL)) as s:
        sim = s.sim(step=STEP_SECONDS)
        tap_port, out = free_port(), s.workdir / "tap.jsonl"
        s.spawn("tap", [sys.executable, "-m", "bench.tap", str(tap_port), str(sim.port), str(out)])
        wait_until(lambda: socket.create_connection(("127.0.0.1", tap_port), timeout=1).close() or True, 10,
                   what="tap listening")
        tap_url = f"http://127.0.0.1:{tap_port}"
        s.worker(tap_url)
        s.api()
        s.ready()
        s.wait_records([s.submit(short_job())["task_id"]])  # warm
        service = []
        for _ in range(jobs):
            task_id = s.submit(short_job(steps=STEPS))["task_id"]
            polls = _watch(s, task_id)
            service.append((s.record(task_id)["prompt_id"], polls))
        received = {}
        with ComfyClient(tap_url, timeout=10) as client:
            floor_prompt = client.submit(rendered(short_job(steps=STEPS), "progress_floor").api).prompt_id

            def on_event(ev):
                if isinstance(ev, Progress):
                    received.setdefault(ev.value, time.time())
            client.wait(floor_prompt, on_event=on_event, timeout=30)
        time.sleep(0.2)
        stamps = _stamps(out)
    latency, age, timeline = [], [], None
    for prompt_id, polls in service:
        seen = {}
        for t, status, step in polls:
            if status == "running" and step:
                seen.setdefault(step, t)
                age.append(t - stamps[(prompt_id, step)])
        latency += [t - stamps[(prompt_id, step)] for step, t in seen.items()]
        if timeline is None:
            t0 = min(stamps[(prompt_id, k)] for k in range(1, STEPS + 1))
            timeline = {"emitted": [[round(stamps[(prompt_id, k)] - t0, 4), k] for k in range(1, STEPS + 1)],
                        "visible": [[round(t - t0, 4), k] for k, t in sorted(seen.items())]}
    floor = [t - stamps[(floor_prompt, k)] for k, t in received.items()]
    s_sum, f_sum, a_sum = summary(latency), summary(floor, digits=3), summary(age)
    return {
        "title": "Progress freshness",
        "line": (f"progress event → visible p95 {s_sum['p95']:.1f} ms (p50 {s_sum['p50']:.1f}, {s_sum['n']} steps), "
                 f"{s_sum['p95'] - f_sum['p95']:+.1f} ms vs the client's own floor (p95 {f_sum['p95']:.2f} ms); "
                 f"age of the shown step p95 {a_sum['p95']:.0f} ms at PROGRESS_INTERVAL={PROGRESS_INTERVAL:g}, steps of "
                 f"{STEP_SECONDS * 1000:.0f} ms; goal: age p95 ≤ {GOAL_P95_MS:g} ms"),
        "value": {"p50_ms": s_sum["p50"], "p95_ms": s_sum["p95"], "age_p95_ms": a_sum["p95"]},
        "goal": f"age of the shown progress p95 ≤ {GOAL_P95_MS:g} ms (steps of {STEP_SECONDS * 1000:.0f} ms)",
        "met": a_sum["p95"] <= GOAL_P95_MS,
        "baseline": {"name": "ComfyClient event callback through the same tap", "ms": f_sum,
                     "difference_p95_ms": round(s_sum["p95"] - f_sum["p95"], 2)},
        "service_ms": s_sum,
        "view_age_ms": a_sum,
        "setup": {"jobs": jobs, "steps": STEPS, "step_seconds": STEP_SECONDS, "progress_interval": PROGRESS_INTERVAL,
                  "poll": "GET /tasks/{id} every ~2 ms"},
        "series": {"latency_ms": [round(x * 1000, 3) for x in latency], "timeline": timeline},
    }
