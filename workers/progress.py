"""Turning ComfyUI's per-node events into one job-wide progress figure (pure).

ComfyUI reports progress per node (value/max of the node running now). Callers want one
percentage that only goes up. Each node gets a weight: a sampler weighs its step count
(times the number of rounds it runs, when the workflow says its progress restarts, as the
StoryDiffusion sampler does once per scene), everything else 1, so the bar moves with the
work that takes the time.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    percent: float
    node: str | None
    step: int
    max: int

    def as_dict(self) -> dict:
        return {"percent": self.percent, "node": self.node, "step": self.step, "max": self.max}


def node_weight(node: dict, rounds: int = 1) -> int:
    steps = node.get("inputs", {}).get("steps")
    if "Sampler" in node.get("class_type", "") and isinstance(steps, int) and steps > 0:
        return steps * max(rounds, 1)
    return 1


class ProgressTracker:
    def __init__(self, graph: dict, repeats: dict[str, int] | None = None):
        self.repeats = {k: max(int(v), 1) for k, v in (repeats or {}).items()}
        self.weights = {node_id: node_weight(node, self.repeats.get(node_id, 1)) for node_id, node in graph.items()}
        self.total = sum(self.weights.values()) or 1
        self.done: set[str] = set()
        self.node: str | None = None
        self.value, self.max, self.round = 0, 1, 0
        self.percent = 0.0

    def _finish_current(self) -> None:
        if self.node is not None:
            self.done.add(self.node)

    def cached(self, nodes) -> Progress:
        self.done.update(n for n in nodes if n in self.weights)
        return self._snapshot()

    def executing(self, node: str) -> Progress:
        if node != self.node:
            self._finish_current()
            self.node, self.value, self.max, self.round = node, 0, 1, 0
        return self._snapshot()

    def step(self, node: str, value: int, maximum: int) -> Progress:
        if node != self.node:
            self.executing(node)
        elif int(value) < self.value:
            self.round += 1  # the node started its next round (next scene)
        self.value, self.max = int(value), max(int(maximum), 1)
        return self._snapshot()

    def finished(self) -> Progress:
        self._finish_current()
        self.percent = 100.0
        return Progress(100.0, self.node, self.value, self.max)

    def _snapshot(self) -> Progress:
        done = sum(self.weights.get(n, 0) for n in self.done)
        if self.node is not None and self.node not in self.done:
            rounds = self.repeats.get(self.node, 1)
            fraction = (min(self.round, rounds - 1) + min(self.value / self.max, 1.0)) / rounds
            done += self.weights.get(self.node, 1) * fraction
        # Never report 100 before the run has really ended, and never go backwards.
        self.percent = max(self.percent, min(round(100.0 * done / self.total, 1), 99.9))
        return Progress(self.percent, self.node, self.value, self.max)
