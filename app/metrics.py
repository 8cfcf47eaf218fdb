"""GET /metrics: Prometheus text built at scrape time from Redis (see common/metrics.py).

Reading the shared Redis figures rather than keeping counters in process memory makes the
endpoint correct under any number of gunicorn processes, API replicas and worker hosts.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from common import keys, metrics, webhooks
from common.fleet import Assessment, assess
from common.registry import WORKERS

blueprint = Blueprint("metrics", __name__)
MIB = 1024 * 1024


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCollector:
    def __init__(self, services):
        self.svc = services

    def collect(self):
        svc = self.svc
        client = svc.redis
        known = [_text(q) for q in client.zrange(WORKERS, 0, -1, withscores=False)]
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(metrics.COUNTERS)
        pipe.get(metrics.LAST_SUCCESS)
        pipe.zrange(WORKERS, 0, -1, withscores=True)
        pipe.hgetall(keys.KNOWN_WORKERS)
        # Every queue's counts in one read (kept by the task store's scripts with its indexes);
        # per queue only its oldest waiting job, for its age.
        pipe.hgetall(keys.QUEUE_COUNTS)
        for name in metrics.HISTOGRAMS:
            pipe.hgetall(metrics.histogram_key(name))
        for queue in known:
            pipe.zrange(keys.waiting(queue), 0, 0, withscores=True)
        results = pipe.execute()
        counters, last_success, seen, labels, queue_counts = results[:5]
        histograms = dict(zip(metrics.HISTOGRAMS, results[5:5 + len(metrics.HISTOGRAMS)]))
        oldest = results[5 + len(metrics.HISTOGRAMS):]
        yield from self._counters(counters, self._workflows())
        yield from self._histograms(histograms)
        yield from self._queues(known, {_text(q): v for q, v in queue_counts.items()}, oldest)
        alive = svc.registry.alive()
        yield from self._fleet(alive, {_text(q): s for q, s in seen}, {_text(q): _text(v) for q, v in labels.items()})
        yield from self._scaling(assess(client, svc.registry, svc.settings, workers=alive))
        if last_success is not None:
            yield GaugeMetricFamily("comfy_last_success_timestamp_seconds",
                                    "Unix time of the last job that succeeded.", value=float(last_success))

    def _workflows(self) -> list[str]:
        names = list(self.svc.catalog)
        if self.svc.settings.allow_raw_workflows:
            names.append("raw")
        return names

    @staticmethod
    def _counters(raw: dict, workflows: list[str]):
        families = {
            "submitted": CounterMetricFamily("comfy_jobs_submitted", "Jobs accepted.", labels=["workflow"]),
            "succeeded": CounterMetricFamily("comfy_jobs_succeeded", "Jobs that succeeded.", labels=["workflow"]),
            "failed": CounterMetricFamily("comfy_jobs_failed", "Jobs that failed, by error source and code.",
                                          labels=["workflow", "source", "code"]),
            "cancelled": CounterMetricFamily("comfy_jobs_cancelled", "Jobs cancelled.", labels=["workflow"]),
            "webhook": CounterMetricFamily("comfy_webhook_attempts", "Webhook delivery attempts by event type and "
                                           "outcome (delivered, retrying, failed: given up, rejected: URL no "
                                           "longer allowed).", labels=["event", "outcome"]),
        }
        # Every known label set from 0 (increase() counts nothing for a series' first sample),
        # then whatever Redis holds (including label sets not known here).
        values: dict[tuple[str, ...], float] = {}
        for workflow in workflows:
            for kind in ("submitted", "succeeded", "cancelled"):
                values[(kind, workflow)] = 0.0
            for source, code in metrics.KNOWN_FAILURES:
                values[("failed", workflow, source, code)] = 0.0
        for event in (*webhooks.FINAL, *webhooks.OPTIONAL_EVENTS):
            for outcome in metrics.WEBHOOK_OUTCOMES:
                values[("webhook", event, outcome)] = 0.0
        for field, value in raw.items():
            values[tuple(_text(field).split("|"))] = float(value)
        for (kind, *labels), value in values.items():
            family = families.get(kind)
            if family is not None and len(labels) == len(family._labelnames):
                family.add_metric(labels, value)
        yield from families.values()

    @staticmethod
    def _histograms(raw_by_name: dict):
        help_text = {
            "queue_wait": "Seconds from submission until ComfyUI started executing the job.",
            "run": "Seconds ComfyUI spent executing the job.",
            "overhead": "Seconds the service added: end to end minus waiting and running.",
            "end_to_end": "Seconds from submission to the job's final state.",
        }
        for name, raw in raw_by_name.items():
            family = HistogramMetricFamily(f"comfy_job_{name}_seconds", help_text[name], labels=["workflow"])
            per_workflow: dict[str, dict[str, float]] = defaultdict(dict)
            for field, value in raw.items():
                workflow, key = _text(field).rsplit("|", 1)
                per_workflow[workflow][key] = float(value)
            for workflow, values in sorted(per_workflow.items()):
                cumulative, buckets = 0.0, []
                for bound in [*map(str, metrics.HISTOGRAMS[name]), "+Inf"]:
                    cumulative += values.get(bound, 0.0)
                    buckets.append((bound, cumulative))
                family.add_metric([workflow], buckets, values.get("sum", 0.0))
            yield family

    @staticmethod
    def _queues(known: list[str], counts: dict, oldest_waiting: list):
        depth = GaugeMetricFamily("comfy_queue_depth", "Jobs queued per GPU queue (in Celery or inside ComfyUI's "
                                  "queue): status queued.", labels=["queue"])
        oldest = GaugeMetricFamily("comfy_queue_oldest_job_age_seconds",
                                   "Age of the oldest job no worker has taken yet, per GPU queue (0 when none).",
                                   labels=["queue"])
        running = GaugeMetricFamily("comfy_jobs_running", "Jobs ComfyUI is executing, per GPU queue (from its "
                                    "execution_start): status running.", labels=["queue"])
        now_ms = time.time() * 1000
        for queue, first in zip(known, oldest_waiting):
            waiting, handed, executing, _ = (max(n, 0) for n in keys.parse_counters(counts.get(queue)))
            depth.add_metric([queue], float(waiting + handed))
            oldest.add_metric([queue], max(now_ms - first[0][1], 0) / 1000 if first else 0.0)
            running.add_metric([queue], float(executing))
        yield depth
        yield oldest
        yield running

    @staticmethod
    def _fleet(alive: list[dict], last_seen: dict[str, float], last_labels: dict[str, str]):
        now = time.time()
        up = GaugeMetricFamily("comfy_worker_up", "1 while a GPU worker's heartbeat is alive.", labels=["queue", "host"])
        comfy = GaugeMetricFamily("comfy_comfyui_up", "1 while the worker's ComfyUI answers.", labels=["queue", "url"])
        age = GaugeMetricFamily("comfy_gpu_heartbeat_age_seconds", "Seconds since a worker's last heartbeat.",
                                labels=["queue"])
        gpu_labels = ["queue", "host", "gpu"]
        util = GaugeMetricFamily("comfy_gpu_utilization_percent", "GPU utilisation.", labels=gpu_labels)
        used = GaugeMetricFamily("comfy_gpu_memory_used_bytes", "GPU memory in use.", labels=gpu_labels)
        total = GaugeMetricFamily("comfy_gpu_memory_total_bytes", "GPU memory in all.", labels=gpu_labels)
        temp = GaugeMetricFamily("comfy_gpu_temperature_celsius", "GPU temperature.", labels=gpu_labels)
        alive_queues = set()
        for beat in alive:
            queue, host = beat["queue"], beat.get("host", "")
            alive_queues.add(queue)
            up.add_metric([queue, host], 1.0)
            comfy.add_metric([queue, beat.get("comfyui_url", "")], 1.0 if beat.get("comfyui_ok") else 0.0)
            gpu = beat.get("gpu") or {}
            labels = [queue, host, str(gpu.get("name") or "")]
            for family, key, scale in ((util, "utilization", 1), (used, "memory_used_mb", MIB),
                                       (total, "memory_total_mb", MIB), (temp, "temperature_c", 1)):
                if gpu.get(key) is not None:
                    family.add_metric(labels, float(gpu[key]) * scale)
        for queue, seen in last_seen.items():
            age.add_metric([queue], max(now - seen, 0.0))
            if queue not in alive_queues:
                # The host its last heartbeat named (the queue's name need not contain it).
                try:
                    host = json.loads(last_labels[queue]).get("host", "")
                except (KeyError, ValueError, AttributeError):
                    host = ""
                up.add_metric([queue, host], 0.0)
        workers = GaugeMetricFamily("comfy_workers_alive", "GPU workers with a live heartbeat.", value=len(alive))
        yield from (up, comfy, age, util, used, total, temp, workers)

    @staticmethod
    def _scaling(assessment: Assessment):
        decision = assessment.decision
        yield GaugeMetricFamily("comfy_fleet_desired_gpus", "GPUs the fleet should have now (common/scaling.py; "
                                "GET /api/v1/fleet says why): what KEDA scales the GPU StatefulSet to.",
                                value=float(decision.desired))
        yield GaugeMetricFamily("comfy_fleet_current_gpus", "Live GPUs that are not draining (ready or starting).",
                                value=float(decision.current))
        yield GaugeMetricFamily("comfy_fleet_work_seconds", "Predicted GPU seconds of every job waiting or running, "
                                "stranded ones included.", value=assessment.state.work_seconds)
        yield GaugeMetricFamily("comfy_fleet_cold_start_seconds", "Seconds a GPU takes from start to its first job "
                                "(measured, else SCALE_COLD_START).", value=assessment.state.cold_start)


@blueprint.get("/metrics")
def scrape():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(current_app.extensions["comfy"]))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4; charset=utf-8")
