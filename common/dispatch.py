"""Choosing the GPU for a job: a pure scoring function over the fleet registry.

Order of concerns: the expected time at which this job would finish on that GPU (its
backlog plus this job, in cost units, times the GPU's measured seconds per unit for this
workflow, plus a checkpoint load when that model is not warm there), then GPU memory
headroom, then current utilisation. Only healthy GPUs count: alive, ComfyUI answering,
not draining, not excluded (a GPU that just failed this job), and matching a pin.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

DEFAULT_SECONDS_PER_UNIT = 1.0
# What loading a checkpoint the GPU does not hold costs, when the GPU has not measured it.
DEFAULT_CHECKPOINT_LOAD_SECONDS = 15.0
TIE_SECONDS = 1e-6  # expected finishes this close are a tie: memory headroom, then utilisation decide


@dataclass(frozen=True)
class JobSpec:
    workflow: str
    cost: float = 1.0
    checkpoint: str | None = None
    gpu: str | None = None  # pin: exactly this queue
    host: str | None = None  # pin: any GPU of this host
    exclude: frozenset[str] = field(default_factory=frozenset)


def healthy(worker: dict) -> bool:
    return bool(worker.get("comfyui_ok")) and not worker.get("draining", False)


def has_checkpoint(worker: dict, job: JobSpec) -> bool:
    """The GPU's ComfyUI offers the job's checkpoint (a GPU that has not said yet is given the
    benefit of the doubt: ComfyUI's own validation names a missing model)."""
    offered = worker.get("checkpoints")
    return not job.checkpoint or offered is None or job.checkpoint in offered


def matches(worker: dict, job: JobSpec) -> bool:
    """Pins and model: whether this GPU could ever run the job, healthy or not."""
    if job.gpu and worker["queue"] != job.gpu:
        return False
    if job.host and worker.get("host") != job.host:
        return False
    return has_checkpoint(worker, job)


def eligible(worker: dict, job: JobSpec) -> bool:
    # healthy() inlined: this runs once per GPU per submission.
    return bool(worker.get("comfyui_ok")) and not worker.get("draining", False) \
        and worker["queue"] not in job.exclude and matches(worker, job)


def known_checkpoints(known: dict[str, dict]) -> set[str]:
    """Every checkpoint any GPU the fleet has had offered (registry labels, kept after it left)."""
    return {c for labels in known.values() for c in (labels.get("checkpoints") or ())}


def waiting_queue(known: dict[str, dict], job: JobSpec) -> str | None:
    """Where a job waits that no live GPU can take: the queue of the GPU the fleet had most
    recently that could run it (an autoscaler brings that GPU, or another, back; the monitor
    moves waiting jobs to a live GPU that fits). None when no GPU it ever had fits."""
    fitting = [(labels.get("last_seen") or 0, queue) for queue, labels in known.items()
               if matches({**labels, "queue": queue}, job)]
    return max(fitting)[1] if fitting else None


def measured_rate(worker: dict, workflow: str) -> float | None:
    rate = (worker.get("rates") or {}).get(workflow)
    return float(rate["seconds_per_unit"]) if rate and rate.get("seconds_per_unit") else None


def fleet_rate(workers: list[dict], workflow: str) -> float:
    """What a GPU with no history of this workflow is assumed to take: the fleet's median."""
    known = [r for r in (measured_rate(w, workflow) for w in workers) if r is not None]
    return statistics.median(known) if known else DEFAULT_SECONDS_PER_UNIT


def gpu_seconds_per_unit(worker: dict) -> float | None:
    """The GPU's measured seconds per cost unit over every workflow it ran, weighted by its jobs
    (a queue's backlog is one total in cost units, not split by workflow); None without history."""
    samples = [(float(r["seconds_per_unit"]), max(int(r.get("jobs") or 1), 1))
               for r in (worker.get("rates") or {}).values() if isinstance(r, dict) and r.get("seconds_per_unit")]
    if not samples:
        return None
    return sum(rate * jobs for rate, jobs in samples) / sum(jobs for _, jobs in samples)


def fleet_seconds_per_unit(workers: list[dict]) -> float | None:
    """What a GPU with no history is assumed to take per cost unit: the fleet's median; None
    when no GPU has any."""
    known = [r for r in map(gpu_seconds_per_unit, workers) if r is not None]
    return statistics.median(known) if known else None


def expected_finish(worker: dict, job: JobSpec, default_rate: float | None) -> float | None:
    """Seconds until this job would be done there: every job on the GPU and this one, each its
    fixed time per prompt plus its cost at the GPU's rate, plus a checkpoint load if needed.
    A GPU that has not measured this workflow runs at `default_rate` (None: returns None).
    The GPU's fixed seconds per prompt (decode, saving, hand-over) is learned beside its rate.
    (Runs once per GPU per submission: reads the measured rate in one lookup.)"""
    measured = (worker.get("rates") or {}).get(job.workflow)
    rate = float(measured.get("seconds_per_unit") or 0) if measured else 0.0
    fixed = float(measured.get("seconds_per_prompt") or 0) if measured else 0.0
    if not rate:
        if default_rate is None:
            return None
        rate = default_rate
    seconds = (float(worker.get("load", 0.0)) + job.cost) * rate + (int(worker.get("jobs", 0)) + 1) * fixed
    if job.checkpoint and worker.get("checkpoint") != job.checkpoint:
        seconds += float(worker.get("checkpoint_load_seconds") or DEFAULT_CHECKPOINT_LOAD_SECONDS)
    return seconds


def memory_headroom(worker: dict) -> float:
    gpu = worker.get("gpu") or {}
    total, free = gpu.get("memory_total_mb"), gpu.get("memory_free_mb")
    return free / total if total and free is not None else 0.0


def tie_break(worker: dict) -> tuple:
    """How `choose` ranks GPUs whose expected finishes tie (within TIE_SECONDS)."""
    utilisation = (worker.get("gpu") or {}).get("utilization") or 0.0
    return (-round(memory_headroom(worker), 3), utilisation, worker["queue"])


POLICIES = ("expected_finish", "round_robin", "gpu_cpu_load")


def choose(workers: list[dict], job: JobSpec, policy: str = "expected_finish", turn: int = 0,
           rng: random.Random | None = None) -> str | None:
    """The queue of the best GPU for `job`, or None when no healthy GPU fits it. O(GPUs), one
    pass: `tie_break` runs only for GPUs whose expected finishes tie.

    `expected_finish` (the service's): earliest expected finish. The two others exist to be
    measured against it (bench/dispatch.py runs each for real): `round_robin` takes the
    `turn`-th eligible GPU in queue order; `gpu_cpu_load` the lowest 0.7·GPU utilisation +
    0.3·host CPU from the heartbeats, ties at random."""
    if policy not in ("round_robin", "gpu_cpu_load"):
        return _earliest_finish(workers, job)
    candidates = sorted((w for w in workers if eligible(w, job)), key=lambda w: w["queue"])
    if not candidates:
        return None
    if policy == "round_robin":
        return candidates[turn % len(candidates)]["queue"]

    def load(w: dict) -> float:
        return 0.7 * float((w.get("gpu") or {}).get("utilization") or 0) + \
            0.3 * float((w.get("host_stats") or {}).get("cpu_percent") or 0)
    lowest = min(load(w) for w in candidates)
    return (rng or random).choice([w for w in candidates if load(w) == lowest])["queue"]


def _earliest_finish(workers: list[dict], job: JobSpec) -> str | None:
    default_rate = None  # the fleet's median: read once, and only if a GPU has not measured this workflow
    best, tied = float("inf"), []
    for worker in workers:
        if not eligible(worker, job):
            continue
        finish = expected_finish(worker, job, default_rate)
        if finish is None:
            default_rate = fleet_rate(workers, job.workflow)
            finish = expected_finish(worker, job, default_rate)
        if finish < best - TIE_SECONDS:
            best, tied = finish, [worker]
        elif finish <= best + TIE_SECONDS:
            best = min(best, finish)
            tied.append(worker)
    if len(tied) > 1:
        return min(tied, key=tie_break)["queue"]
    return tied[0]["queue"] if tied else None
