"""Figure 11: autoscaling over a bursty day, against fixed fleets (issue 17, item 6).

One "day", scaled down from hours to seconds so the three fleets run here one after another:
idle → a burst (200 jobs; --quick 40) → a trickle (a job every 3 s) → idle. Each job is one
StoryDiffusion scene of 20 steps at 0.05 s (≈ 1 s of simulated GPU), and a GPU's cold start is
simulated: its ComfyUI listens only after --slow-start 2 s, and its first job loads the model
(--load-seconds 1, twice for StoryDiffusion: checkpoint and pipeline), on top of the worker's
own start on these shared cores. The same day runs for real three times:

- autoscaled 0…8: the local autoscaler (deploy/autoscale.py, `make run`'s) acting every 0.5 s on
  the fleet's decision (common/fleet.py), from zero GPUs, its pairs forked from a zygote as
  `make run`'s are (deploy/zygote.py);
- fixed fleets of 2 and 8 GPUs (the same code, held at SCALE_MIN_GPUS = SCALE_MAX_GPUS), warm.

Measured per fleet: each job's wait, submit (`created_ms`) → ComfyUI started it
(`comfy_started_ms`); GPU-seconds paid, each GPU's up time within the day (its start to its
stop, cold start included; a fixed fleet pays the whole day). Before the day, each fleet runs a
warm-up ("yesterday"): the autoscaled one has had one GPU, which learned the speed and cold start
and went again; its time is not counted. Goal: p95 wait ≤ 1.1 × the fixed 8-GPU fleet's, at
≤ 0.5 × its GPU-seconds.
"""
from __future__ import annotations

import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.harness import Stack, pct, short_job, wait_until
from common import keys, redis_conn
from common.settings import get_settings
from deploy.autoscale import Autoscaler
from deploy.zygote import SUPPORTED as FORK_SUPPORTED, Zygote
from tests.support.procs import SimProcess, free_port

STEP, STEPS, LOAD, SLOW_START = 0.05, 20, 1.0, 2.0
TARGET_WAIT, DOWN_DELAY, PRIOR_COLD = 5.0, 5.0, 10.0
TICK = 0.5  # AUTOSCALE_INTERVAL's default
GOAL_WAIT_RATIO, GOAL_GPU_RATIO = 1.1, 0.5


def day(quick: bool) -> dict:
    if quick:
        return {"burst_at": 3.0, "burst": 40, "trickle": [15.0 + 2 * i for i in range(5)], "length": 40.0}
    return {"burst_at": 5.0, "burst": 200, "trickle": [40.0 + 3 * i for i in range(10)], "length": 100.0}


class BenchPairs:
    """Simulator + worker pairs of a bench stack (deploy/autoscale.py's Pairs), forked from a
    zygote as `make run`'s are (deploy/devstack.py, deploy/zygote.py)."""

    def __init__(self, stack: Stack):
        self.stack, self.pairs = stack, {}
        self.zygote = Zygote(stack.workdir / "zygote.log").start() if FORK_SUPPORTED else None

    def start(self, index: int, queue: str) -> None:
        sim = SimProcess(port=free_port(), workdir=self.stack.workdir, zygote=self.zygote,
                         args=["--step-seconds", str(STEP), "--load-seconds", str(LOAD),
                               "--slow-start", str(SLOW_START)]).start(wait=False)  # comes up beside its worker
        self.stack.fleet.sims.append(sim)
        self.pairs[queue] = (sim, self.stack.worker(sim, queue=queue, zygote=self.zygote, GPU_INDEX=str(index)))

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()

    def retire(self, queue: str) -> None:
        self.pairs[queue][1].send(signal.SIGTERM)  # Celery's warm shutdown

    def worker_exited(self, queue: str) -> bool:
        return not self.pairs[queue][1].alive()

    def stop(self, queue: str) -> None:
        self.pairs.pop(queue)[0].kill(signal.SIGTERM)


def _job(n: int, **fields) -> dict:
    return short_job(steps=STEPS, **fields) | {"scenes": [f"[Lena] reads letter {n}"]}


def fleet_run(name: str, low: int, high: int, plan: dict) -> dict:
    scale_env = {"SCALE_MIN_GPUS": str(low), "SCALE_MAX_GPUS": str(high), "SCALE_TARGET_WAIT": str(TARGET_WAIT),
                 "SCALE_DOWN_DELAY": str(DOWN_DELAY), "SCALE_COLD_START": str(PRIOR_COLD), "WAIT_FOR_GPUS": "true"}
    s = Stack(f"autoscale-{name}", **scale_env)
    pairs = None
    try:
        s.api()
        settings = get_settings().model_copy(update={
            "redis_url": s.fleet.redis.url, "heartbeat_ttl": 10.0, "scale_min_gpus": low, "scale_max_gpus": high,
            "scale_target_wait": TARGET_WAIT, "scale_down_delay": DOWN_DELAY, "scale_cold_start": PRIOR_COLD,
            "wait_for_gpus": True})
        notes: list[str] = []
        pairs = BenchPairs(s)
        scaler = Autoscaler(pairs, redis_conn.connect(settings), settings, "bench",
                            say=lambda m: notes.append(f"{time.time():.1f} {m}"))
        stop = threading.Event()
        errors: list[str] = []

        def ticks():
            while not stop.is_set():
                try:
                    scaler.tick()
                except Exception as exc:  # noqa: BLE001 - reported with the figure
                    errors.append(f"{type(exc).__name__}: {exc}")
                stop.wait(TICK)
        scaler.bootstrap()
        thread = threading.Thread(target=ticks, daemon=True, name="autoscaler")
        thread.start()

        def ready(count: int) -> bool:
            return sum(1 for w in scaler.registry.alive() if w.get("comfyui_ok")) >= count
        # Yesterday: models loaded where a fleet is warm; the autoscaled one learns speed and cold start, then goes to zero.
        wait_until(lambda: ready(max(low, 1)), 60, interval=0.5, what=f"{max(low, 1)} GPUs ready")
        queues = sorted(scaler.up)
        warm = [s.submit(_job(i, gpu=q))["task_id"] for i, q in enumerate(queues)]
        warm += [s.submit(_job(100 + i, gpu=q))["task_id"] for i, q in enumerate(queues)]
        s.wait_records(warm, timeout=60)
        if low == 0:
            wait_until(lambda: not scaler.up and not scaler.retiring, 60, interval=0.5, what="the fleet at zero")

        t0 = time.time()
        tasks: list[str] = []
        spans_before = len(scaler.spans)

        def at(offset: float) -> None:
            time.sleep(max(t0 + offset - time.time(), 0))
        at(plan["burst_at"])
        with ThreadPoolExecutor(4) as pool:
            tasks += pool.map(lambda n: s.submit(_job(n))["task_id"], range(plan["burst"]))
        for i, offset in enumerate(plan["trickle"]):
            at(offset)
            tasks.append(s.submit(_job(1000 + i))["task_id"])
        records = s.wait_records(tasks, timeout=300)
        at(plan["length"])
        t_end = time.time()
        stop.set()
        thread.join(10)
        if errors:
            raise RuntimeError(f"autoscaler ticks failed: {errors[:3]}")
        cold = s.redis.hget(keys.FLEET_LEARNED, "cold_start_seconds")  # what the heartbeats measured
    finally:
        s.stop()
        if pairs is not None:
            pairs.close()
    failed = [r.get("error") for r in records if r["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(records)} jobs did not succeed ({name}): {failed[:2]}")
    waits = [(r["comfy_started_ms"] - r["created_ms"]) / 1000 for r in records]
    first: dict[str, float] = {}  # each GPU's first job of the day started in ComfyUI
    for r in records:
        first[r["queue"]] = min(first.get(r["queue"], float("inf")), r["comfy_started_ms"] / 1000)
    day_spans = scaler.spans if low else scaler.spans[spans_before:]  # the autoscaled fleet's warm-up GPU is yesterday's
    # The cold start as the day saw it: a GPU started within the day, to its first job starting.
    up_to_first = [first[sp.queue] - sp.started for sp in day_spans if sp.started >= t0 and sp.queue in first]
    gpu_seconds = sum(max(min(sp.stopped or t_end, t_end) - max(sp.started, t0), 0.0) for sp in day_spans)
    return {"fleet": name, "min": low, "max": high, "jobs": len(records), "day_seconds": round(t_end - t0, 1),
            "wait_s": {"p50": round(pct(waits, 50), 2), "p95": round(pct(waits, 95), 2), "max": round(max(waits), 2)},
            "gpu_seconds": round(gpu_seconds, 1), "gpus_started": len(day_spans),
            "spans": [{"queue": sp.queue, "start": round(sp.started - t0, 1),
                       "first_job": round(first[sp.queue] - t0, 1) if sp.queue in first else None,
                       "stop": None if sp.stopped is None else round(sp.stopped - t0, 1)} for sp in day_spans],
            "measured_cold_start_s": round(float(cold), 2) if cold else None,
            "start_to_first_job_s": round(statistics.median(up_to_first), 2) if up_to_first else None,
            "log": [n for n in notes if "scale" in n][-40:]}


def run(quick: bool = False) -> dict:
    plan = day(quick)
    auto = fleet_run("autoscaled 0…8", 0, 8, plan)
    two = fleet_run("fixed 2", 2, 2, plan)
    eight = fleet_run("fixed 8", 8, 8, plan)
    wait_ratio = auto["wait_s"]["p95"] / max(eight["wait_s"]["p95"], 1e-9)
    gpu_ratio = auto["gpu_seconds"] / max(eight["gpu_seconds"], 1e-9)
    met = wait_ratio <= GOAL_WAIT_RATIO and gpu_ratio <= GOAL_GPU_RATIO
    return {
        "title": "Autoscaling over a bursty day",
        "line": (f"autoscaled p95 wait {auto['wait_s']['p95']:.1f} s = {wait_ratio:.2f}× the fixed 8-GPU fleet's "
                 f"({eight['wait_s']['p95']:.1f} s; fixed 2: {two['wait_s']['p95']:.1f} s), at "
                 f"{auto['gpu_seconds']:.0f} GPU-s = {gpu_ratio:.2f}× its {eight['gpu_seconds']:.0f} "
                 f"(fixed 2: {two['gpu_seconds']:.0f}); goal ≤ {GOAL_WAIT_RATIO:g}× wait at ≤ {GOAL_GPU_RATIO:g}× GPU-s"),
        "value": {"p95_wait_ratio": round(wait_ratio, 3), "gpu_seconds_ratio": round(gpu_ratio, 3)},
        "goal": f"p95 wait ≤ {GOAL_WAIT_RATIO:g}× fixed 8, GPU-seconds ≤ {GOAL_GPU_RATIO:g}× fixed 8",
        "met": met,
        "baseline": {"name": "fixed fleets of 8 and 2 warm GPUs, the same day, same run"},
        "fleets": [auto, two, eight],
        "setup": {"day": plan, "job": f"StoryDiffusion, 1 scene 256², {STEPS} steps at {STEP} s",
                  "cold_start": f"simulator --slow-start {SLOW_START:g} s, --load-seconds {LOAD:g} s, plus the worker's start",
                  "scaling": {"SCALE_TARGET_WAIT": TARGET_WAIT, "SCALE_DOWN_DELAY": DOWN_DELAY,
                              "SCALE_COLD_START (prior)": PRIOR_COLD, "AUTOSCALE_INTERVAL": TICK},
                  "scaled_down": "a day in seconds, not hours: the proportions (burst drain against cold start) "
                                 "decide the figure, not the length"},
    }
