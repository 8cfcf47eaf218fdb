"""The local autoscaler (`make run` with AUTOSCALE=true, and the benchmark's autoscaled fleet):
starts and stops ComfyUI + worker pairs on this machine from the fleet's scaling decision, the
one `GET /api/v1/fleet` answers and KEDA scales on (`common/fleet.py:assess`).

Each tick it reads the decision and acts on it:
- Up: `desired − current` pairs, less those it started whose heartbeat is not in yet (a pair
  counts as soon as it is started, so a slow start is not started twice). Each pair gets the
  lowest free GPU index and its queue `gpu.<host>.<index>`, like a StatefulSet's ordinal: a GPU
  the fleet had comes back under its name, and jobs waiting on its queue (WAIT_FOR_GPUS) are its.
- Down: each GPU in `decision.retire` that it started gets SIGTERM, Celery's warm shutdown (the
  worker finishes what runs, takes nothing new; the monitor moves what waits); its ComfyUI is
  stopped once the worker has exited. The name is free again after that.
- Spread: a GPU it brought up starts with nothing while a burst waits on the queue of the GPU
  that came up first (jobs wait on one GPU's queue at zero GPUs, and the monitor moves them to
  the first live one): each ready GPU without a job takes its share of the jobs still waiting in
  Celery elsewhere, the newest first, through the `requeue` transition (a job a worker took
  meanwhile is not moved; the stale message is dropped by the worker that reads it).
- A fleet that has never had a GPU starts one: a job is accepted at zero GPUs only when it can
  wait on the queue of a GPU the fleet has had (WAIT_FOR_GPUS); that GPU goes again once idle
  past SCALE_DOWN_DELAY, like any other.

Processes are the caller's (`Pairs`): devstack supervises them, the benchmark starts its own;
both fork them from a zygote (deploy/zygote.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import redis

from common.dispatch import matches
from common.fleet import assess
from common.jobs import job_spec, requeue
from common.lifecycle import State, state_of
from common.producer import make_celery
from common.registry import Registry
from common.scaling import Decision
from common.settings import Settings
from common.task_store import TaskStore


class Pairs(Protocol):
    def start(self, index: int, queue: str) -> None:
        """Start a ComfyUI (or simulator) and its worker on `queue` with GPU_INDEX `index`."""

    def retire(self, queue: str) -> None:
        """Begin the worker's warm shutdown (SIGTERM)."""

    def worker_exited(self, queue: str) -> bool:
        """The retiring worker has exited."""

    def stop(self, queue: str) -> None:
        """Stop the pair's ComfyUI; its worker has exited."""


@dataclass
class Span:
    """One pair's life, for the log and the benchmark's GPU-seconds."""
    queue: str
    started: float  # time.time() it was started
    retired: float | None = None  # SIGTERM sent to its worker
    stopped: float | None = None  # its ComfyUI stopped

    def seconds(self, now: float) -> float:
        return (self.stopped or now) - self.started


class Autoscaler:
    def __init__(self, pairs: Pairs, client: redis.Redis, settings: Settings, host: str,
                 say: Callable[[str], None] = print):
        self.pairs, self.client, self.settings, self.host, self.say = pairs, client, settings, host, say
        self.registry = Registry(client, settings.heartbeat_ttl)
        self.store = TaskStore(client, settings.result_ttl, settings.events_ttl)
        self.celery = make_celery(settings)  # sends only, as the API does
        self.up: dict[str, Span] = {}  # started, not retiring
        self.retiring: dict[str, Span] = {}
        self.spans: list[Span] = []  # every pair it started, in order
        self.last: Decision | None = None

    def queue(self, index: int) -> str:
        return f"gpu.{self.host}.{index}"

    def _free_index(self) -> int:
        taken = {*self.up, *self.retiring}
        index = 0
        while self.queue(index) in taken:
            index += 1
        return index

    def _start(self, why: str) -> str:
        index = self._free_index()
        queue = self.queue(index)
        self.pairs.start(index, queue)
        span = Span(queue, time.time())
        self.up[queue] = span
        self.spans.append(span)
        self.say(f"scale up: started {queue} ({why})")
        return queue

    def bootstrap(self) -> None:
        """A fleet that has never had a GPU starts one (see the module's text)."""
        if not self.up and not self.registry.known() and self.settings.scale_max_gpus >= 1:
            self._start("the fleet has never had a GPU: a job can wait only for a GPU it has had")

    def tick(self) -> Decision:
        for queue, span in list(self.retiring.items()):
            if self.pairs.worker_exited(queue):
                self.pairs.stop(queue)
                span.stopped = time.time()
                del self.retiring[queue]
                self.say(f"scale down: {queue} stopped after {span.stopped - span.retired:.1f} s of draining "
                         f"({span.seconds(span.stopped):.1f} s up)")
        workers = self.registry.alive()
        assessment = assess(self.client, self.registry, self.settings, workers=workers)
        decision = self.last = assessment.decision
        alive = {g.queue for g in assessment.state.gpus}
        self.spread(workers)
        pending = [q for q in self.up if q not in alive]  # started, no heartbeat yet
        for queue in decision.retire:
            span = self.up.pop(queue, None)
            if span is None:
                continue  # not one of ours (COMFYUI_URLS, another host): left to its owner
            self.pairs.retire(queue)
            span.retired = time.time()
            self.retiring[queue] = span
            self.say(f"scale down: retiring {queue} (desired {decision.desired} of {decision.current}: "
                     f"{decision.reason})")
        # A retiring GPU still runs (and is paid for) until its worker exits: never more than the
        # maximum up at once.
        room = self.settings.scale_max_gpus - len(self.up) - len(self.retiring)
        for _ in range(min(decision.desired - decision.current - len(pending), room)):
            self._start(f"desired {decision.desired}, {decision.current} up, {len(pending)} starting: "
                        f"{decision.reason}")
        return decision

    def spread(self, workers: list[dict]) -> int:
        """Give each ready GPU without a job its share of what waits in Celery elsewhere."""
        ready = [w for w in workers if w.get("comfyui_ok") and not w.get("draining")]
        idle = [w for w in ready if not w.get("jobs")]
        if not idle:
            return 0
        waiting = {w["queue"]: self.store.waiting(w["queue"]) for w in ready}  # oldest first
        share = sum(map(len, waiting.values())) // len(ready)
        moved = 0
        for target in idle:
            for _ in range(share):
                source = max(waiting, key=lambda q: len(waiting[q]))
                if len(waiting[source]) <= share:
                    break
                record = self.store.get(waiting[source].pop())  # the newest waits longest there
                if (record is None or state_of(record) != State.WAITING or record.get("queue") != source
                        or not matches(target, job_spec(record))):
                    continue
                if requeue(self.store, self.registry, self.celery, record, to=target["queue"], must_move=True,
                           reason={"code": "rebalanced", "gpu": source,
                                   "message": f"{target['queue']} came up with nothing to do"}):
                    moved += 1
        if moved:
            self.say(f"spread: moved {moved} waiting job(s) to {', '.join(w['queue'] for w in idle)}")
        return moved

    @property
    def draining(self) -> bool:
        return bool(self.retiring)
