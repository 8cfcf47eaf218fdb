"""Job metrics kept in Redis, so every API process and worker host adds to the same figures.

Counters and histogram buckets are Redis hash fields, incremented once per job event by the
process whose state change applied: the task store's scripts apply them in the same step as
the transition (`submitted_field`, `finished_ops`).
`/metrics` turns them into Prometheus families at scrape time (`app/metrics.py`); gauges
(queue depth, GPUs, workers, ComfyUI up) come from the fleet registry at the same moment.
"""
from __future__ import annotations

import bisect
import time

import redis

from common import keys

COUNTERS = keys.METRIC_COUNTERS
LAST_SUCCESS = keys.METRIC_LAST_SUCCESS

# Every (source, code) a job can fail with. `/metrics` exports each, per known workflow, from 0:
# Prometheus' increase() only counts from a series' first sample, so a counter that appeared at
# its first increment would hide that first failure from the error-rate alert.
# tests/test_metrics_series.py checks this list against the codes the code base can produce.
KNOWN_FAILURES = (
    ("service", "broker_unavailable"),
    ("service", "collect_failed"),
    ("service", "job_dropped"),
    ("service", "job_timeout"),
    ("service", "payload_missing"),
    ("service", "worker_lost"),
    ("comfyui", "comfyui_error"),
    ("comfyui", "execution_error"),
    ("comfyui", "interrupted"),
    ("comfyui", "prompt_lost"),
    ("comfyui", "protocol_error"),
    ("comfyui", "server_error"),
    ("comfyui", "timeout"),
    ("comfyui", "unreachable"),
    ("comfyui", "validation_error"),
    ("comfyui", "wait_timeout"),
)
# Outcomes of a webhook attempt (workers/webhooks.py); the event types are common/webhooks.py's.
WEBHOOK_OUTCOMES = ("delivered", "retrying", "failed", "rejected")

# Seconds; GPU jobs run from seconds to many minutes, service overhead in milliseconds.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
OVERHEAD_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
HISTOGRAMS = {
    "queue_wait": DURATION_BUCKETS,  # created → ComfyUI starts executing it
    "run": DURATION_BUCKETS,  # ComfyUI execution start → end
    "overhead": OVERHEAD_BUCKETS,  # end to end, minus both of the above
    "end_to_end": DURATION_BUCKETS,  # created → final state recorded
}


def histogram_key(name: str) -> str:
    return keys.metric_histogram(name)


def _observe(ops: list, name: str, workflow: str, seconds: float) -> None:
    buckets = HISTOGRAMS[name]
    index = bisect.bisect_left(buckets, seconds)
    le = str(buckets[index]) if index < len(buckets) else "+Inf"
    key = histogram_key(name)
    ops.append(("hincrby", key, f"{workflow}|{le}", 1))  # per bucket here; cumulated when exported
    ops.append(("hincrbyfloat", key, f"{workflow}|sum", repr(float(seconds))))
    ops.append(("hincrby", key, f"{workflow}|count", 1))


def webhook_attempt(client: redis.Redis, kind: str, outcome: str) -> None:
    """One webhook attempt: delivered, retrying (will be tried again), failed (given up) or
    rejected (its URL is no longer allowed)."""
    client.hincrby(COUNTERS, f"webhook|{kind}|{outcome}", 1)


def submitted_field(workflow: str) -> str:
    return f"submitted|{workflow}"


def finished_ops(record: dict, status: str, error: dict | None = None, *, started_ms: float | None = None,
                 finished_ms: float | None = None, now_ms: float | None = None) -> list[tuple]:
    """What a job's final state adds to the figures, as operations the task store's transition
    script applies in the same step as the change (so a job is counted once, by whoever ended
    it): its final-state counter and its timings (pure)."""
    workflow = record.get("workflow", "unknown")
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    ops: list[tuple] = []
    if status == "failed":
        error = error or {}
        ops.append(("hincrby", COUNTERS, f"failed|{workflow}|{error.get('source', 'service')}|"
                                         f"{error.get('code', 'unknown')}", 1))
    else:
        ops.append(("hincrby", COUNTERS, f"{status}|{workflow}", 1))
    if status == "succeeded":
        ops.append(("set", LAST_SUCCESS, "", repr(now_ms / 1000)))
    created = record.get("created_ms")
    started = started_ms or record.get("comfy_started_ms")
    ended = finished_ms or record.get("comfy_finished_ms")
    if created:
        end_to_end = max(now_ms - created, 0) / 1000
        _observe(ops, "end_to_end", workflow, end_to_end)
        if started and ended and status == "succeeded":
            wait, run = max(started - created, 0) / 1000, max(ended - started, 0) / 1000
            _observe(ops, "queue_wait", workflow, wait)
            _observe(ops, "run", workflow, run)
            _observe(ops, "overhead", workflow, max(end_to_end - wait - run, 0.0))
    return ops
