"""Choosing the GPU queue for a job (pure). The fleet issue grows this into full scoring."""
from __future__ import annotations


def load(worker: dict) -> float:
    """Jobs ahead of a new one on this GPU, per prompt slot the worker keeps in ComfyUI."""
    busy = int(worker.get("waiting", 0)) + len(worker.get("running", []))
    return busy / max(int(worker.get("concurrency", 1)), 1)


def choose_queue(workers: list[dict]) -> str | None:
    """The healthy worker with the least work ahead; ties go to the queue name, for stable tests."""
    healthy = [w for w in workers if w.get("comfyui_ok")]
    if not healthy:
        return None
    return min(healthy, key=lambda w: (load(w), w["queue"]))["queue"]
