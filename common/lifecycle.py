"""A job's life, declared as data: its states, the transitions between them, and who may make
each one. Pure: no Redis here. The task store (common/task_store.py) applies a transition
atomically with the sources this table gives; routes, the Celery task and the monitor name a
transition and never a status.

States are finer than the public statuses a caller sees:

| state     | status    | where the job is                                                   |
|-----------|-----------|--------------------------------------------------------------------|
| waiting   | queued    | a Celery message on its GPU's queue; no worker has it yet          |
| handed    | queued    | its GPU's worker took it and queued it inside ComfyUI (`gpu` set)  |
| running   | running   | ComfyUI is executing it (from ComfyUI's `execution_start`)         |
| succeeded | succeeded | final                                                              |
| failed    | failed    | final                                                              |
| cancelled | cancelled | final                                                              |
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    WAITING = "waiting"
    HANDED = "handed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Status(str, Enum):
    """What callers see (the task document, events, webhooks, metrics)."""
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


STATUS_OF: dict[State, Status] = {
    State.WAITING: Status.QUEUED,
    State.HANDED: Status.QUEUED,
    State.RUNNING: Status.RUNNING,
    State.SUCCEEDED: Status.SUCCEEDED,
    State.FAILED: Status.FAILED,
    State.CANCELLED: Status.CANCELLED,
}
FINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
FINAL_STATUSES = frozenset(STATUS_OF[s] for s in FINAL_STATES)
FINAL = tuple(sorted(str(s) for s in FINAL_STATUSES))  # ("cancelled", "failed", "succeeded")
ACTIVE_STATES = frozenset(State) - FINAL_STATES


@dataclass(frozen=True)
class Transition:
    name: str
    sources: frozenset[State]
    target: State | None  # None: the state stays (fields and events only)
    by: str  # who makes it: api, worker, monitor (documentation; the table in docs/architecture.md)
    owned: bool  # the worker instance that took the job must be the one asking
    event: str | None  # the event appended to the job's log when it applies
    doc: str


def _t(name, sources, target, by, owned, event, doc) -> Transition:
    return Transition(name, frozenset(sources), target, by, owned, event, doc)


W, H, R = State.WAITING, State.HANDED, State.RUNNING
TRANSITIONS: dict[str, Transition] = {t.name: t for t in (
    _t("submit", (), W, "api", False, "queued", "accepted and put on a GPU's Celery queue"),
    _t("hand", (W,), H, "worker", False, "queued",
       "a worker of that queue took the message; the prompt goes into its ComfyUI's queue"),
    _t("start", (H,), R, "worker", True, "started", "ComfyUI began executing the prompt (execution_start)"),
    _t("progress", (R,), None, "worker", True, "progress", "ComfyUI reported progress"),
    _t("output", (R,), None, "worker", True, "output", "an output file is stored and servable"),
    _t("succeed", (R,), State.SUCCEEDED, "worker", True, "succeeded", "every output is stored"),
    _t("fail", (W, H, R), State.FAILED, "worker, monitor, api", True, "failed",
       "ComfyUI refused or failed it, it timed out, or it ran out of attempts"),
    _t("request_cancel", (H, R), None, "api, worker", False, None,
       "a cancel is asked of the worker that has the job (DELETE or a Celery revoke)"),
    _t("cancel_waiting", (W,), State.CANCELLED, "api, worker", False, "cancelled",
       "cancelled before any worker took it: it never reaches a GPU"),
    _t("cancel_run", (H, R), State.CANCELLED, "worker", True, "cancelled",
       "ComfyUI deleted the queued prompt or interrupted the running one, at our request"),
    _t("collect", (H, R), None, "monitor", True, None,
       "its worker no longer follows it and ComfyUI finished it: the monitor collects the outputs"),
    _t("requeue", (W, H, R), W, "worker, monitor", True, "queued",
       "moved to a GPU's queue again: its worker or ComfyUI was lost, or its GPU stopped taking jobs"),
)}


def transition(name: str) -> Transition:
    return TRANSITIONS[name]


def allowed(name: str, state: State | str | None) -> bool:
    """Whether transition `name` may apply to a job in `state` (None: no job yet)."""
    spec = TRANSITIONS[name]
    if state is None:
        return not spec.sources
    return State(state) in spec.sources


def apply(name: str, state: State | str | None, *, owner_matches: bool = True) -> State | None:
    """The state after transition `name`, or None when it is refused (pure: what the Lua
    script decides in Redis, for the same inputs). An owned transition whose asking worker is
    not the job's owner is refused: a worker that lost a job to failover cannot touch it."""
    spec = TRANSITIONS[name]
    if not allowed(name, state):
        return None
    if spec.owned and state is not None and State(state) in (State.HANDED, State.RUNNING) and not owner_matches:
        return None
    return spec.target or State(state)


def status_of(state: State | str) -> Status:
    return STATUS_OF[State(state)]


def state_of(record: dict) -> State:
    """A record's state; records written before states existed have only a status."""
    if record.get("state"):
        return State(record["state"])
    return {"queued": State.WAITING, "running": State.RUNNING}.get(record.get("status"), None) or State(
        record["status"])


def table_markdown() -> str:
    """The transition table as docs/architecture.md shows it (a test keeps the two equal)."""
    lines = ["| transition | from | to | by | owner only | event | when |", "|---|---|---|---|---|---|---|"]
    for t in TRANSITIONS.values():
        sources = ", ".join(str(s) for s in State if s in t.sources) or "(new)"
        target = str(t.target) if t.target else "(same)"
        lines.append(f"| `{t.name}` | {sources} | {target} | {t.by} | {'yes' if t.owned else 'no'} | "
                     f"{t.event or '-'} | {t.doc} |")
    return "\n".join(lines)
