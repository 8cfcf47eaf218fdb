"""Reconciliation: is every job a worker has taken accounted for by reality? (pure)

A job whose record says `handed` or `running` must be held by its worker (the live worker
instance that took it lists it in its heartbeat's `running`) or by its ComfyUI (`/queue`, or
`/history` of its prompt). The failover monitor (workers/monitor.py) asks `suspect()` of every
taken job each round, reads ComfyUI only for the suspects, and acts on `settle()`:

| ComfyUI says                              | action                                                         |
|-------------------------------------------|----------------------------------------------------------------|
| running or pending (it still holds it)    | wait, unless it ran past JOB_TIMEOUT: then stop it and fail it |
| finished successfully                     | collect its outputs and finish the job: no second run (failed after MAX_ATTEMPTS collections) |
| finished with an execution error          | fail it with ComfyUI's error (a rerun would fail the same way) |
| interrupted, or nothing (lost, unreachable) | cancelled if a cancel was asked; else a new attempt on another GPU, up to MAX_ATTEMPTS, then failed |
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from common.lifecycle import State, state_of

# What ComfyUI knows of a prompt.
RUNNING, PENDING, SUCCEEDED, FAILED, INTERRUPTED, ABSENT, UNREACHABLE = (
    "running", "pending", "succeeded", "failed", "interrupted", "absent", "unreachable")

# Actions.
WAIT, COLLECT, FAIL, CANCEL, REQUEUE, GIVE_UP, TIMEOUT = (
    "wait", "collect", "fail", "cancel", "requeue", "give_up", "timeout")


@dataclass(frozen=True)
class Decision:
    action: str
    code: str  # why, as the attempt log and the error say it
    message: str


def _age_seconds(iso: str | None, now: datetime) -> float:
    if not iso:
        return float("inf")
    return (now - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds()


def held_by_worker(record: dict, beat: dict | None) -> bool:
    """Its worker is alive (the same process that took it) and says it has the job."""
    return (beat is not None and beat.get("instance") == record.get("worker")
            and record.get("task_id") in (beat.get("running") or ()))


def worker_gone(record: dict, beat: dict | None) -> bool:
    """The process that took the job is no longer alive: no heartbeat, or another process's."""
    return beat is None or beat.get("instance") != record.get("worker")


def suspect(record: dict, beat: dict | None, now: datetime, grace: float) -> bool:
    """A taken job its worker does not account for, past `grace` since it was taken (which
    covers a heartbeat published just before the hand-over)."""
    if state_of(record) not in (State.HANDED, State.RUNNING):
        return False
    if _age_seconds(record.get("handed_at") or record.get("started_at"), now) < grace:
        return False
    return not held_by_worker(record, beat)


def settle(record: dict, comfy: str, *, now: datetime, max_attempts: int, job_timeout: float,
           worker_alive: bool) -> Decision:
    """What to do with a suspect job, given what its ComfyUI says of its prompt (`comfy`)."""
    who = "its worker dropped it" if worker_alive else "its worker died"
    if comfy in (RUNNING, PENDING):
        if _age_seconds(record.get("started_at") or record.get("handed_at"), now) > job_timeout:
            return Decision(TIMEOUT, "job_timeout", f"the job ran longer than JOB_TIMEOUT ({job_timeout:g} s) "
                            f"after {who}, and was stopped")
        return Decision(WAIT, "comfyui_holds_it", f"{who}; ComfyUI still has the prompt ({comfy})")
    if comfy == SUCCEEDED:
        if int(record.get("collect_attempts") or 0) >= max_attempts:  # collecting kills its collector
            return Decision(GIVE_UP, "collect_failed", f"{who} after ComfyUI finished the prompt, and collecting "
                            f"its outputs failed {record.get('collect_attempts')} times")
        return Decision(COLLECT, "collected", f"{who} after ComfyUI finished the prompt; outputs collected")
    if comfy == FAILED:
        return Decision(FAIL, "execution_error", f"{who}; ComfyUI failed the prompt")
    if record.get("cancel_requested"):
        return Decision(CANCEL, "cancelled", f"{who}; the cancel asked for is done")
    code = "worker_lost" if not worker_alive else "job_dropped"
    where = {INTERRUPTED: "ComfyUI interrupted the prompt", ABSENT: "ComfyUI has no trace of the prompt",
             UNREACHABLE: "its ComfyUI does not answer"}.get(comfy, comfy)
    if int(record.get("attempts") or 0) >= max_attempts:
        return Decision(GIVE_UP, code, f"{who} and {where}, on each of its {record.get('attempts')} attempts")
    return Decision(REQUEUE, code, f"{who} and {where}")
