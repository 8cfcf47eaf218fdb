"""Faults on demand (POST /sim/faults) and the busy/idle record (GET /sim/record).

Neither exists in ComfyUI; they let tests break the "GPU server" on purpose and let
benchmarks measure how busy it was kept.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FaultState:
    fail_at_step: int | None = None          # every stepping node raises at this step
    stall: bool = False                      # the running node freezes (HTTP keeps answering)
    speed: float = 1.0                       # GPU speed factor for sampler steps
    drop_websockets_at_step: int | None = None   # one-shot
    crash_at_step: int | None = None             # one-shot

    def public(self) -> dict:
        return asdict(self)


# key -> (accepted types, allows null)
_FIELDS = {
    "fail_at_step": (int, True),
    "stall": (bool, False),
    "speed": ((int, float), False),
    "drop_websockets_at_step": (int, True),
    "crash_at_step": (int, True),
}
_ACTIONS = {"drop_websockets", "crash", "reset"}


def parse_request(body) -> tuple[dict, list[str]]:
    """Check a /sim/faults body; returns (changes, problems)."""
    if not isinstance(body, dict):
        return {}, ["the body must be a JSON object"]
    problems = []
    for key, value in body.items():
        if key == "remove_checkpoint":  # a model file deleted from disk (reset restores it)
            if not isinstance(value, str) or not value:
                problems.append("remove_checkpoint must be a checkpoint file name")
            continue
        if key in _ACTIONS:
            if not isinstance(value, bool):
                problems.append(f"{key} must be true or false")
            continue
        if key not in _FIELDS:
            problems.append(f"unknown fault {key!r}")
            continue
        types, nullable = _FIELDS[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) and types is not bool or not isinstance(value, types):
            problems.append(f"{key} has the wrong type")
        elif key == "speed" and value <= 0:
            problems.append("speed must be > 0")
    return body if not problems else {}, problems


class Faults:
    def __init__(self, baseline: FaultState) -> None:
        self._baseline = baseline
        self.state = FaultState(**asdict(baseline))
        self.resumed = asyncio.Event()
        self.resumed.set()

    def apply(self, changes: dict) -> None:
        if changes.get("reset"):
            self.state = FaultState(**asdict(self._baseline))
        for key in _FIELDS:
            if key in changes:
                value = changes[key]
                setattr(self.state, key, float(value) if key == "speed" else value)
        if self.state.stall:
            self.resumed.clear()
        else:
            self.resumed.set()

    def take_step_trigger(self, name: str, step: int) -> bool:
        """True once when a one-shot step fault fires."""
        if getattr(self.state, name) == step:
            setattr(self.state, name, None)
            return True
        return False


def output_prefixes(prompt: dict) -> list[str]:
    """Every `filename_prefix` in a prompt: the service names a job's outputs after its task id,
    so this tells which job a prompt belongs to without asking the service."""
    found = []
    for node in prompt.values():
        value = (node.get("inputs") or {}).get("filename_prefix") if isinstance(node, dict) else None
        if isinstance(value, str):
            found.append(value)
    return sorted(set(found))


@dataclass
class Record:
    """What benchmarks read: when the GPU was busy, and what was cancelled.

    With `journal` set (--record-file), each event is also appended there as a JSON line as it
    happens: the memory record dies with the process, the journal survives a SIGKILL and a
    restart on the same file (chaos runs count executions across crashes with it)."""
    busy: list = field(default_factory=list)
    deleted: list = field(default_factory=list)
    interrupts: list = field(default_factory=list)
    submitted: list = field(default_factory=list)
    queued_at: dict = field(default_factory=dict)  # prompt id → when /prompt accepted it
    running: dict | None = None
    journal: Path | None = None

    def __post_init__(self) -> None:
        self._journal = None
        if self.journal is not None:
            # Line-buffered: every line reaches the kernel when written, so a SIGKILL loses none.
            self._journal = open(self.journal, "a", buffering=1, encoding="utf-8")
            self._write({"e": "boot", "pid": os.getpid()})

    def _write(self, entry: dict) -> None:
        if self._journal is not None:
            self._journal.write(json.dumps({"t": time.time(), **entry}) + "\n")

    def queued(self, prompt_id: str, prompt: dict) -> None:
        self.submitted.append(prompt_id)
        self.queued_at[prompt_id] = time.time()
        self._write({"e": "queued", "prompt_id": prompt_id, "prefixes": output_prefixes(prompt)})

    def started(self, prompt_id: str, start: float) -> None:
        self.running = {"prompt_id": prompt_id, "start": start}
        self._write({"e": "started", "prompt_id": prompt_id, "start": start})

    def ended(self, prompt_id: str, start: float, end: float, outcome: str) -> None:
        self.running = None
        self.busy.append({"prompt_id": prompt_id, "start": start, "end": end, "outcome": outcome})
        self._write({"e": "ended", "prompt_id": prompt_id, "start": start, "end": end, "outcome": outcome})

    def removed(self, prompt_ids: list) -> None:
        self.deleted.extend(prompt_ids)
        for prompt_id in prompt_ids:
            self._write({"e": "deleted", "prompt_id": prompt_id})

    def interrupt(self, requested: str | None, interrupted: str | None) -> None:
        self.interrupts.append({"t": time.time(), "requested_prompt_id": requested,
                                "interrupted_prompt_id": interrupted})

    def public(self) -> dict:
        return {"busy": self.busy, "deleted": self.deleted, "interrupts": self.interrupts,
                "submitted": self.submitted, "queued_at": self.queued_at, "running": self.running}
