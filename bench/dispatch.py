"""Figure 3: dispatch quality, the makespan of a burst of mixed jobs on GPUs of unequal speed.

Four simulators at speeds 2×, 1×, 1×, 0.5× (--speed), one worker each. After a warm-up
(two pinned jobs per GPU, so every heartbeat carries a measured speed, as on a fleet that
has been up for a while), a burst of jobs of mixed cost goes in through POST /generate.

- The real dispatcher is run for real: makespan = first POST → last result recorded.
- Lower bound: total work / total speed, the work being each job's nominal simulator time
  at speed 1 (steps × step time + the 20 ms decode).
- Round-robin and "lowest 0.7·GPU-load + 0.3·CPU-load" are evaluated by a discrete-event
  simulation of the same jobs arriving at the same moments; the real dispatcher is also
  simulated (the real `choose()`, the speeds its heartbeats measured), which checks the
  model against the real run. GPU-load is a heartbeat's utilisation (100 while the GPU is
  busy at the heartbeat, else 0, refreshed every HEARTBEAT_INTERVAL); CPU-load is the host's,
  equal for GPUs of one host; ties go at random, as such a policy has no other order.
"""
from __future__ import annotations

import random
import time
from datetime import datetime

from bench.harness import API, short_job, stack, wait_until
from common.dispatch import JobSpec, choose

SPEEDS = (2.0, 1.0, 1.0, 0.5)
STEP_SECONDS, DECODE_SECONDS = 0.02, 0.02
HEARTBEAT = 2.0
WARMUP = 4  # measured jobs per GPU before the burst
GOAL_RATIO = 1.05


def job_mix(n: int, seed: int = 7) -> list[int]:
    """Sampler steps per job: mostly small, some medium, a few large (one scene each)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(rng.randint(4, 10) if r < 0.6 else rng.randint(20, 30) if r < 0.9 else rng.randint(60, 80))
    return out


def work(steps: int) -> float:
    return steps * STEP_SECONDS + DECODE_SECONDS  # seconds at speed 1


# -- the discrete-event model ------------------------------------------------------------------
def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares: seconds = a · steps + b, one GPU's real cost per step and per prompt."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    a = sum((x - mx) * (y - my) for x, y in points) / var if var else my / mx
    return a, my - a * mx


def effective_bound(steps: list[int], per_gpu: list[tuple[float, float]]) -> float:
    """Lower bound with the simulators' fitted costs: GPU g does 1/a_g steps a second, and a job
    costs it s + b_g/a_g steps, at least s + min(b/a), so total steps ≤ T · Σ 1/a_g."""
    least_fixed = min(b / a for a, b in per_gpu)
    return sum(n + least_fixed for n in steps) / sum(1 / a for a, _ in per_gpu)


def simulate(policy: str, steps: list[int], arrivals: list[float], queues: list[str], speeds: list[float],
             beats: dict[str, dict] | None = None, costs: list[tuple[float, float]] | None = None,
             seed: int = 1) -> dict:
    """Policies: "round-robin", "gpu-cpu-load", "real dispatcher" (choose() on the heartbeats'
    measured speeds) and "real dispatcher, true speeds" (choose() told the simulators' real speeds).
    A job takes a·steps + b on GPU g, (a, b) = costs[g] as fitted from the real run, else nominal."""
    """Each job is placed when it arrives; each GPU runs its queue in order, without gaps."""
    rng = random.Random(seed)
    free_at = [0.0] * len(queues)
    placed: list[list[tuple[float, float, float]]] = [[] for _ in queues]  # (start, end, cost) per GPU
    choice = []
    for i, (n, t) in enumerate(zip(steps, arrivals)):
        cost = n / 16  # the service's cost model: steps × 256² / 1024²
        if policy == "round-robin":
            g = i % len(queues)
        elif policy == "gpu-cpu-load":
            tick = (t // HEARTBEAT) * HEARTBEAT  # the newest heartbeat any dispatcher could have seen
            util = [100.0 if any(s <= tick < e for s, e, _ in placed[k]) else 0.0 for k in range(len(queues))]
            scores = [0.7 * u + 0.3 * 50.0 for u in util]  # one host: CPU load is the same for all
            best = min(scores)
            g = rng.choice([k for k, v in enumerate(scores) if v == best])
        else:  # the real one: common.dispatch.choose on what the registry would answer at time t
            workers = [{**beats[q], "queue": q, "comfyui_ok": True, "draining": False,
                        "load": sum(c for s, e, c in placed[k] if e > t)} for k, q in enumerate(queues)]
            if policy.endswith("true speeds"):  # what a perfect speed estimate would give
                for w, v in zip(workers, speeds):
                    w["rates"] = {"storydiffusion": {"seconds_per_unit": 16 * STEP_SECONDS / v}}
            g = queues.index(choose(workers, JobSpec(workflow="storydiffusion", cost=cost,
                                                     checkpoint=beats[queues[0]].get("checkpoint"))))
        start = max(free_at[g], t)
        free_at[g] = start + (costs[g][0] * n + costs[g][1] if costs else work(n) / speeds[g])
        placed[g].append((start, free_at[g], cost))
        choice.append(g)
    return {"makespan": max(free_at) - min(arrivals), "per_gpu_busy": [round(sum(e - s for s, e, _ in p), 3) for p in placed],
            "jobs_per_gpu": [choice.count(k) for k in range(len(queues))]}


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run(quick: bool = False) -> dict:
    count = 40 if quick else 200
    steps = job_mix(count)
    queues = [f"gpu.bench.{k}" for k in range(len(SPEEDS))]
    with stack("dispatch") as s:
        sims = [s.sim(STEP_SECONDS, speed) for speed in SPEEDS]
        for sim, queue in zip(sims, queues):
            s.worker(sim, queue=queue)
        s.api()
        s.ready()
        # Warm-up as on a fleet that has run a while: a first (cold) job, then jobs of the same mix,
        # pinned, so each GPU has measured its speed on the kind of work it will get.
        cold = [s.submit(short_job(steps=4, gpu=q))["task_id"] for q in queues]
        s.wait_records(cold, timeout=60)
        warm = [s.submit(short_job(steps=n, gpu=q))["task_id"] for q in queues for n in job_mix(WARMUP, seed=99)]
        s.wait_records(warm, timeout=120)

        def measured():
            workers = s.http.get(s.url + API + "/workers", timeout=5).json()["workers"]
            return workers if len(workers) == len(queues) and all(w.get("rates") for w in workers) else None
        beats = {w["queue"]: w for w in wait_until(measured, 3 * HEARTBEAT + 5, interval=0.2,
                                                     what="measured speeds in every heartbeat")}
        t_start = time.time()
        tasks, arrivals = [], []
        for n in steps:
            arrivals.append(time.time() - t_start)
            tasks.append(s.submit(short_job(steps=n))["task_id"])
        records = s.wait_records(tasks, timeout=60 + sum(map(work, steps)))
        busy = {b["prompt_id"]: b for sim in sims for b in sim.record()["busy"]}
    bad = [r["status"] for r in records if r["status"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[:3]}")
    lower_bound = sum(map(work, steps)) / sum(SPEEDS)
    real = max(_ts(r["finished_at"]) for r in records) - t_start
    gpu_makespan = max(busy[r["prompt_id"]]["end"] for r in records) - t_start
    per_gpu = {q: [] for q in queues}
    for r, n in zip(records, steps):
        b = busy[r["prompt_id"]]
        per_gpu[r["gpu"]].append([round(b["start"] - t_start, 3), round(b["end"] - t_start, 3), n])
    # Each simulator's real cost per step and per prompt on this machine, from its busy record.
    fitted = [fit([(n, end - start) for start, end, n in per_gpu[q]]) if len(per_gpu[q]) >= 3
              else (STEP_SECONDS / v, DECODE_SECONDS / v) for q, v in zip(queues, SPEEDS)]
    bound_effective = effective_bound(steps, fitted)
    model = {p: simulate(p, steps, arrivals, queues, list(SPEEDS), beats, fitted)
             for p in ("real dispatcher", "real dispatcher, true speeds", "round-robin", "gpu-cpu-load")}
    ratios = {p: round(m["makespan"] / lower_bound, 3) for p, m in model.items()}
    ratios_effective = {p: round(m["makespan"] / bound_effective, 3) for p, m in model.items()}
    ratio = round(real / lower_bound, 3)
    met = ratio <= GOAL_RATIO and ratio < ratios["round-robin"] and ratio < ratios["gpu-cpu-load"]
    return {
        "title": "Dispatch quality",
        "line": (f"makespan {real:.2f} s = {ratio:.3f} × the lower bound {lower_bound:.2f} s (real run); "
                 f"round-robin {ratios['round-robin']:.2f} ×, 0.7·GPU+0.3·CPU load {ratios['gpu-cpu-load']:.2f} × "
                 f"(model; the model gives the real dispatcher {ratios['real dispatcher']:.3f} ×); goal ≤ {GOAL_RATIO} × and best"),
        "value": {"ratio_to_lower_bound": ratio, "makespan_s": round(real, 3)},
        "goal": f"≤ {GOAL_RATIO} × the lower bound, and better than round-robin and 0.7·GPU+0.3·CPU load",
        "met": met,
        "baseline": {"name": "lower bound: total work / total speed", "seconds": round(lower_bound, 3)},
        "gpu_makespan_s": round(gpu_makespan, 3),
        "effective_bound": {"seconds": round(bound_effective, 3), "ratio": round(real / bound_effective, 3),
                            "model_ratio": ratios_effective,
                            "fitted_seconds_per_step": [round(a, 5) for a, _ in fitted],
                            "fitted_seconds_per_prompt": [round(b, 4) for _, b in fitted],
                            "nominal_seconds_per_step": [round(STEP_SECONDS / v, 5) for v in SPEEDS],
                            "nominal_seconds_per_prompt": [round(DECODE_SECONDS / v, 4) for v in SPEEDS]},
        "model_ratio": ratios,
        "model": model,
        "real_jobs_per_gpu": [len(per_gpu[q]) for q in queues],
        "measured_seconds_per_unit": {q: beats[q]["rates"]["storydiffusion"]["seconds_per_unit"] for q in queues},
        "true_seconds_per_unit": {q: round(16 * STEP_SECONDS / v, 4) for q, v in zip(queues, SPEEDS)},
        "setup": {"jobs": count, "speeds": list(SPEEDS), "step_seconds": STEP_SECONDS,
                  "steps": "60% 4-10, 30% 20-30, 10% 60-80 (seeded)", "submit": "one caller, back to back",
                  "submit_seconds": round(arrivals[-1], 3),
                  "warmup": f"1 cold + {WARMUP} pinned jobs of the same mix per GPU"},
        "series": {"per_gpu": per_gpu, "queues": queues, "speeds": list(SPEEDS)},
    }
