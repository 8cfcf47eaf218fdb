"""Choosing the GPU for a job: a pure scoring function over the fleet registry.

Order of concerns: the expected time at which this job would finish on that GPU (its
backlog plus this job, in cost units, times the GPU's measured seconds per unit for this
workflow, plus a checkpoint load when that model is not warm there), then GPU memory
headroom, then current utilisation. Only healthy GPUs count: alive, ComfyUI answering,
not draining, not excluded (a GPU that just failed this job), and matching a pin.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

DEFAULT_SECONDS_PER_UNIT = 1.0
# What loading a checkpoint the GPU does not hold costs, when the GPU has not measured it.
DEFAULT_CHECKPOINT_LOAD_SECONDS = 15.0


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


def eligible(worker: dict, job: JobSpec) -> bool:
    if not healthy(worker) or worker["queue"] in job.exclude:
        return False
    if job.gpu and worker["queue"] != job.gpu:
        return False
    if job.host and worker.get("host") != job.host:
        return False
    return True


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


def expected_finish(worker: dict, job: JobSpec, default_rate: float) -> float:
    rate = measured_rate(worker, job.workflow) or default_rate
    seconds = (float(worker.get("load", 0.0)) + job.cost) * rate
    if job.checkpoint and worker.get("checkpoint") != job.checkpoint:
        seconds += float(worker.get("checkpoint_load_seconds") or DEFAULT_CHECKPOINT_LOAD_SECONDS)
    return seconds


def memory_headroom(worker: dict) -> float:
    gpu = worker.get("gpu") or {}
    total, free = gpu.get("memory_total_mb"), gpu.get("memory_free_mb")
    return free / total if total and free is not None else 0.0


def score(worker: dict, job: JobSpec, default_rate: float) -> tuple:
    utilisation = (worker.get("gpu") or {}).get("utilization") or 0.0
    return (round(expected_finish(worker, job, default_rate), 6), -round(memory_headroom(worker), 3),
            utilisation, worker["queue"])


def choose(workers: list[dict], job: JobSpec) -> str | None:
    """The queue of the best GPU for `job`, or None when no healthy GPU fits it. O(GPUs)."""
    candidates = [w for w in workers if eligible(w, job)]
    if not candidates:
        return None
    default_rate = fleet_rate(workers, job.workflow)
    return min(candidates, key=lambda w: score(w, job, default_rate))["queue"]
