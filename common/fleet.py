"""The scaling decision's inputs, read from Redis in O(GPUs), and the decision itself.

One call, `assess`, serves the API (`GET /api/v1/fleet`, the `comfy_fleet_*` gauges) and any
autoscaler in the same process tree (`make run AUTOSCALE=true`): every replica and every
reader computes the same answer from the same Redis, with no state of its own.

Each live GPU's remaining work is its queue's backlog in cost units (kept by the task store in
`keys.QUEUE_COUNTS`, returned by the registry as `load`) times its measured seconds per unit, or the fleet's median
when it has no history. Work on the queue of a GPU that is down (known, no live heartbeat) is
stranded: it counts at the fleet's median speed. With WAIT_FOR_GPUS a job that no live GPU can
take waits on such a queue: that is how the decision sees demand on a fleet scaled to zero. How long a GPU has been idle is kept in Redis
(`keys.FLEET_IDLE_SINCE`): the first reader that sees it without a job notes the time, the
first that sees it busy again clears it. The fleet's last measured cold start and median speed
are kept too (`keys.FLEET_LEARNED`), so a fleet scaled to zero still prices a burst with them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import redis

from common import keys
from common.dispatch import DEFAULT_SECONDS_PER_UNIT, fleet_seconds_per_unit, gpu_seconds_per_unit
from common.registry import Registry
from common.scaling import COLD_START_FIELD, Decision, FleetState, Gpu, Policy, decide
from common.settings import Settings


@dataclass(frozen=True)
class Assessment:
    state: FleetState
    policy: Policy
    decision: Decision
    seconds_per_unit: float  # what a GPU without history is assumed to take (fleet median)
    draining: tuple[str, ...]


def policy_from(settings: Settings) -> Policy:
    return Policy(target_wait=settings.scale_target_wait, min_gpus=settings.scale_min_gpus,
                  max_gpus=settings.scale_max_gpus, scale_down_delay=settings.scale_down_delay)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 and number == number and number != float("inf") else None


def assess(client: redis.Redis, registry: Registry, settings: Settings, workers: list[dict] | None = None,
           now: float | None = None) -> Assessment:
    """Read the fleet (reusing `workers`, the registry's `alive()`, when the caller has it) and
    decide. Two round trips besides the registry's read."""
    now = time.time() if now is None else now
    workers = registry.alive() if workers is None else workers
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.WORKERS, 0, -1)
    pipe.hkeys(keys.KNOWN_WORKERS)  # a GPU that left cleanly is forgotten there but stays known here
    pipe.hgetall(keys.FLEET_IDLE_SINCE)
    pipe.hgetall(keys.FLEET_LEARNED)
    registered, labelled, idle_since, learned = pipe.execute()
    known = sorted({*map(_text, registered), *map(_text, labelled)})
    idle_since = {_text(q): _number(t) for q, t in idle_since.items()}
    learned = {_text(k): _number(v) for k, v in learned.items()}

    alive = {w["queue"] for w in workers}
    down = [q for q in known if q not in alive]
    measured_rate = fleet_seconds_per_unit(workers)
    rate = measured_rate or learned.get("seconds_per_unit") or DEFAULT_SECONDS_PER_UNIT
    colds = [c for c in (_number(w.get(COLD_START_FIELD)) for w in workers) if c is not None]
    measured_cold = statistics.median(colds) if colds else None
    cold = measured_cold if measured_cold is not None else learned.get("cold_start_seconds")
    cold = settings.scale_cold_start if cold is None else cold

    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.QUEUE_COUNTS, down or [""])  # HMGET needs a field: none down, one no queue has
    gpus = []
    for beat in workers:
        queue = beat["queue"]
        load = max(float(beat.get("load") or 0.0), 0.0)
        busy = bool(beat.get("waiting") or beat.get("running")) or load > 0
        own_rate = gpu_seconds_per_unit(beat)
        ready = bool(beat.get("comfyui_ok"))
        if busy or not ready:  # a GPU still starting is not idle: its idle clock starts once it can take jobs
            idle = 0.0
            if queue in idle_since:
                pipe.hdel(keys.FLEET_IDLE_SINCE, queue)
        else:
            since = idle_since.get(queue)
            if since is None:
                pipe.hsetnx(keys.FLEET_IDLE_SINCE, queue, repr(now))
                since = now
            idle = max(now - since, 0.0)
        gpus.append(Gpu(queue=queue, work_seconds=load * (own_rate or rate), busy=busy, idle_seconds=idle,
                        ready=ready, draining=bool(beat.get("draining")),
                        seconds_per_unit=own_rate, checkpoint=beat.get("checkpoint")))
    gone = [q for q in idle_since if q not in alive]  # a GPU that left: its next start is not idle
    if gone:
        pipe.hdel(keys.FLEET_IDLE_SINCE, *gone)
    news = {}
    if measured_rate is not None and measured_rate != learned.get("seconds_per_unit"):
        news["seconds_per_unit"] = repr(measured_rate)
    if measured_cold is not None and measured_cold != learned.get("cold_start_seconds"):
        news["cold_start_seconds"] = repr(measured_cold)
    if news:
        pipe.hset(keys.FLEET_LEARNED, mapping=news)
    replies = pipe.execute()
    stranded = sum(max(keys.parse_counters(r)[3], 0) for r in replies[0][:len(down)]) / 1000 * rate

    state = FleetState(gpus=tuple(sorted(gpus, key=lambda g: g.queue)), cold_start=cold, stranded_seconds=stranded)
    policy = policy_from(settings)
    return Assessment(state=state, policy=policy, decision=decide(state, policy), seconds_per_unit=rate,
                      draining=tuple(g.queue for g in state.gpus if g.draining))


def document(assessment: Assessment) -> dict:
    """The fleet as `GET /api/v1/fleet` answers it (common/documents.py: FleetDocument)."""
    state, decision, policy = assessment.state, assessment.decision, assessment.policy
    return {
        "current": decision.current, "desired": decision.desired, "action": decision.action,
        "reason": decision.reason, "retire_first": decision.retire_first, "retire": list(decision.retire),
        "work_seconds": round(state.work_seconds, 3), "stranded_seconds": round(state.stranded_seconds, 3),
        "cold_start_seconds": round(state.cold_start, 3), "seconds_per_unit": round(assessment.seconds_per_unit, 6),
        "target_wait_seconds": policy.target_wait, "min_gpus": policy.min_gpus, "max_gpus": policy.max_gpus,
        "scale_down_delay_seconds": policy.scale_down_delay,
        "gpus": [{"queue": g.queue, "state": _gpu_state(g), "work_seconds": round(g.work_seconds, 3),
                  "idle_seconds": round(g.idle_seconds, 3), "seconds_per_unit": g.seconds_per_unit,
                  "checkpoint": g.checkpoint} for g in state.gpus],
    }


def _gpu_state(gpu: Gpu) -> str:
    if gpu.draining:
        return "draining"
    if not gpu.ready:
        return "starting"
    return "busy" if gpu.busy else "idle"

