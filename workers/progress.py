"""Turning ComfyUI's per-node events into one job-wide progress figure (pure).

ComfyUI reports progress per node (value/max of the node running now). Callers want one
percentage that only goes up. Each node gets a weight: a sampler weighs its step count,
everything else 1, so the bar moves with the work that takes the time.
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


def node_weight(node: dict) -> int:
    steps = node.get("inputs", {}).get("steps")
    if "Sampler" in node.get("class_type", "") and isinstance(steps, int) and steps > 0:
        return steps
    return 1


class ProgressTracker:
    def __init__(self, graph: dict):
        self.weights = {node_id: node_weight(node) for node_id, node in graph.items()}
        self.total = sum(self.weights.values()) or 1
        self.done: set[str] = set()
        self.node: str | None = None
        self.value, self.max = 0, 1
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
            self.node, self.value, self.max = node, 0, 1
        return self._snapshot()

    def step(self, node: str, value: int, maximum: int) -> Progress:
        if node != self.node:
            self.executing(node)
        self.value, self.max = int(value), max(int(maximum), 1)
        return self._snapshot()

    def finished(self) -> Progress:
        self._finish_current()
        self.percent = 100.0
        return Progress(100.0, self.node, self.value, self.max)

    def _snapshot(self) -> Progress:
        done = sum(self.weights.get(n, 0) for n in self.done)
        if self.node is not None and self.node not in self.done:
            done += self.weights.get(self.node, 1) * min(self.value / self.max, 1.0)
        # Never report 100 before the run has really ended, and never go backwards.
        self.percent = max(self.percent, min(round(100.0 * done / self.total, 1), 99.9))
        return Progress(self.percent, self.node, self.value, self.max)
