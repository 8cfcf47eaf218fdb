"""Figure 1 on a real ComfyUI (`--comfyui-url`): service overhead per job above the direct client.

The `overhead` method on the named server: each service job (POST /generate → first GET
/tasks/{id} showing `succeeded`, through a worker driving that ComfyUI) alternates with a floor
job (the same kind of graph through `ComfyClient` straight on it: submit → wait → the outputs
it listed downloaded, as the worker does), one at a time. From both, ComfyUI's own execution of
the prompt is taken away, read from its history timestamps (bench/real.py), not from a
simulator's record.
"""
from __future__ import annotations

import time

from bench import real
from bench.harness import stack, summary
from bench.overhead import GOAL_P50_RATIO, GOAL_P99_RATIO, WARMUP, _service_job, judge
from workers.comfy_client import ComfyClient


def _floor_job(client: ComfyClient, n: int) -> dict:
    t0 = time.time()
    sub = client.submit(real.graph(n, f"floor_{n}"))
    result = client.wait(sub.prompt_id, timeout=30)
    files = client.outputs(sub.prompt_id, listed=result.outputs)  # as the worker: no second look at /history
    t1 = time.time()
    assert files, "the floor job produced no output"
    return {"prompt_id": sub.prompt_id, "t0": t0, "visible": t1}


def run(quick: bool = False, comfyui_url: str | None = None) -> dict:
    if not comfyui_url:
        raise ValueError("overhead_real needs a ComfyUI: --comfyui-url URL")
    jobs = 30 if quick else 300
    server = real.describe(comfyui_url)
    with stack("overhead-real", **real.ENV) as s:
        s.worker(comfyui_url)
        s.api()
        s.ready()
        service, floor = [], []
        with ComfyClient(comfyui_url, timeout=10) as client:
            for n in range(jobs + WARMUP):  # even colours for the service, odd for the floor: never cached
                a = _service_job(s, real.body(2 * n))
                b = _floor_job(client, 2 * n + 1)
                if n >= WARMUP:
                    service.append(a)
                    floor.append(b)
            for job in service:
                job["prompt_id"] = s.record(job["task_id"])["prompt_id"]
            ran = real.spans(client, [j["prompt_id"] for j in service + floor])

    def over(job):
        r = ran[job["prompt_id"]]
        return job["visible"] - job["t0"] - (r["end"] - r["start"])

    svc, flr = [over(j) for j in service], [over(j) for j in floor]
    s_sum, f_sum = summary(svc), summary(flr)
    phases = {"POST /generate": [], "to ComfyUI queue": [], "ComfyUI queue → start": [], "end → visible": []}
    for j in service:
        r = ran[j["prompt_id"]]
        phases["POST /generate"].append(j["accepted"] - j["t0"])
        phases["to ComfyUI queue"].append(r["queued"] - j["accepted"])
        phases["ComfyUI queue → start"].append(r["start"] - r["queued"])
        phases["end → visible"].append(j["visible"] - r["end"])
    floor_phases = {"submit": [], "ComfyUI queue → start": [], "end → outputs": []}
    for j in floor:
        r = ran[j["prompt_id"]]
        floor_phases["submit"].append(r["queued"] - j["t0"])
        floor_phases["ComfyUI queue → start"].append(r["start"] - r["queued"])
        floor_phases["end → outputs"].append(j["visible"] - r["end"])
    execution = summary([r["end"] - r["start"] for r in ran.values()])

    d50, d95, d99, r50, r99, met = judge(s_sum, f_sum)
    return {
        "title": "Service overhead per job on a real ComfyUI",
        "line": (f"ComfyUI {server['comfyui_version']}: service ÷ floor: p50 {r50}× ({s_sum['p50']:.1f} / "
                 f"{f_sum['p50']:.1f} ms), p99 {r99}× ({s_sum['p99']:.1f} / {f_sum['p99']:.1f} ms); goal ≤ "
                 f"{GOAL_P50_RATIO:g}× / ≤ {GOAL_P99_RATIO:g}×"),
        "value": {"p50_ratio": r50, "p99_ratio": r99, "p50_ms": d50, "p95_ms": d95, "p99_ms": d99},
        "goal": f"service ÷ floor ≤ {GOAL_P50_RATIO:g}× at p50, ≤ {GOAL_P99_RATIO:g}× at p99",
        "met": met,
        "comfyui": server,
        "baseline": {"name": "floor: the same kind of graph through ComfyClient directly, same ComfyUI", "ms": f_sum},
        "service_ms": s_sum,
        "execution_ms": execution,
        "phases_ms": {k: summary(v) for k, v in phases.items()},
        "floor_phases_ms": {k: summary(v) for k, v in floor_phases.items()},
        "setup": {"jobs": len(svc), "warmup_dropped": WARMUP, "workflow": real.WORKFLOW, "timing": real.TIMING,
                  "api": "gunicorn gevent -w 2 (as make run)", "poll": "GET /tasks/{id} every ~1 ms until succeeded"},
        "series": {"service_ms": [round(v * 1000, 3) for v in svc], "floor_ms": [round(v * 1000, 3) for v in flr]},
    }
