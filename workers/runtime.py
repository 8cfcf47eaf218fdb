"""What one worker process holds for its life: Redis, the task store, storage, the ComfyUI
client, the jobs it runs, what it measured, and its background threads: the heartbeat, the
ComfyUI probe whose latest findings it reports, the failover monitor, the cancel listener and
the canceller.
Each is its own thread so that neither a ComfyUI slow to answer (every call may wait up to
COMFYUI_TIMEOUT) nor a long monitor round delays a beat past HEARTBEAT_TTL: a worker that is
alive stays alive in the fleet's eyes, and says so while its ComfyUI does not answer."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from functools import cache

import psutil
import redis
import requests
from celery.worker import state as celery_state

from common import redis_conn
from common.registry import Registry
from common.settings import Settings, get_settings
from common.storage import make_storage
from common.task_store import CANCEL_CHANNEL, TaskStore, now_iso
from common.webhooks import Notifier
from workers.celery_app import app as celery_app
from workers.comfy_client import ComfyClient, ComfyError
from workers.gpu_probe import GpuProbe, host_stats
from workers.monitor import Monitor

log = logging.getLogger("comfy.worker")
RATE_SMOOTHING = 0.3  # weight of the newest job in a GPU's speed estimate
# While its ComfyUI has not answered yet, a worker asks it this often (a refused connection costs
# nothing) and beats at once when it does: a starting GPU counts as capacity (dispatch, the
# autoscaler's spread) as soon as it can take a job, not up to HEARTBEAT_INTERVAL later.
STARTUP_PROBE_INTERVAL = 0.2


class SpeedModel:
    """seconds = fixed + cost × per_unit, by least squares over exponentially weighted samples
    (the newest weighs RATE_SMOOTHING), so a GPU's speed follows it as it changes. Until its
    jobs differ in cost, nothing tells the fixed part from the rest: all of it is per unit."""

    def __init__(self):
        self.w = self.x = self.y = self.xx = self.xy = 0.0
        self.jobs = 0

    def add(self, cost: float, seconds: float) -> None:
        keep = 1.0 - RATE_SMOOTHING if self.jobs else 0.0
        weight = RATE_SMOOTHING if self.jobs else 1.0
        self.w, self.x, self.y = keep * self.w + weight, keep * self.x + weight * cost, keep * self.y + weight * seconds
        self.xx, self.xy = keep * self.xx + weight * cost * cost, keep * self.xy + weight * cost * seconds
        self.jobs += 1

    def estimate(self) -> dict:
        mean_x, mean_y = self.x / self.w, self.y / self.w
        spread = self.xx / self.w - mean_x * mean_x
        if spread > 1e-9 * max(mean_x * mean_x, 1e-12):
            per_unit = (self.xy / self.w - mean_x * mean_y) / spread
            fixed = mean_y - per_unit * mean_x
            if per_unit > 0 and fixed >= 0:
                return {"seconds_per_unit": per_unit, "seconds_per_prompt": fixed}
        return {"seconds_per_unit": mean_y / mean_x, "seconds_per_prompt": 0.0}


class WorkerRuntime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.instance = uuid.uuid4().hex  # this process; a restarted worker is another instance
        self.redis = redis_conn.connect(settings, health_check_interval=30, client_name="comfy-worker")
        # Webhooks are queued for the webhook worker (common/webhooks.py), never sent from here.
        self.notifier = Notifier(celery_app, settings.webhook_queue)
        self.store = TaskStore(self.redis, settings.result_ttl, settings.events_ttl, notify=self.notifier.on_status,
                               outage_tolerance=settings.redis_outage_tolerance)
        self.registry = Registry(self.redis, settings.heartbeat_ttl)
        self.storage = make_storage(settings)
        self.client = ComfyClient(settings.comfyui_url, timeout=settings.comfyui_timeout,
                                  stall_timeout=settings.comfyui_stall_timeout,
                                  unreachable_deadline=settings.comfyui_unreachable_deadline)
        self.probe = GpuProbe(settings.gpu_index, comfy_stats=self._comfy_system_stats)
        self.queue = settings.queue_name
        self.started_at = now_iso()
        self.draining = False
        self.checkpoint: str | None = None  # the model the GPU holds after our last job
        self.rates: dict[str, dict] = {}  # workflow → measured seconds per cost unit and per prompt
        self._speed: dict[str, SpeedModel] = {}
        self.comfy_queue: int | None = None
        self.checkpoints: list[str] | None = None  # what its ComfyUI offers (None: not read yet)
        self._checkpoints_read = float("-inf")
        # Cold start (heartbeat's cold_start_seconds): this process's start → its ComfyUI first
        # answered, plus the first model load. The process's own start, not started_at (set once
        # Celery is up): booting the worker is part of bringing a GPU up.
        self._process_started = psutil.Process().create_time()
        self._ready_seconds: float | None = None
        self._comfy_ok = False  # the last finished probe found ComfyUI answering
        self._probe_since: float | None = None  # monotonic start of the probe in flight, if any
        self._gpu = None  # GpuStats of the last probe
        self._beat_now = threading.Event()  # wakes the heartbeat at once (ComfyUI answered first)
        self._first_cold_job: tuple[str, float, float] | None = None  # workflow, cost, seconds
        self._active: dict[str, str | None] = {}  # task id → ComfyUI prompt id (None until submitted)
        self._cancelled: set[str] = set()  # cancels sent to ComfyUI for jobs still active here
        self._cancel_pending: set[str] = set()  # cancels asked before the prompt reached ComfyUI
        self._revokes_seen: set[str] = set()
        self._to_cancel: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # the canceller's work
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.monitor = None

    # Jobs this process runs -------------------------------------------------------------
    def job_started(self, task_id: str) -> None:
        with self._lock:
            self._active[task_id] = None

    def job_submitted(self, task_id: str, prompt_id: str) -> None:
        with self._lock:
            self._active[task_id] = prompt_id
            pending = task_id in self._cancel_pending
        if pending:
            self.cancel_local(task_id)

    def job_ended(self, task_id: str) -> None:
        with self._lock:
            self._active.pop(task_id, None)
            self._cancelled.discard(task_id)
            self._cancel_pending.discard(task_id)

    def cancel_was_sent(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._cancelled

    def active(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._active)

    def job_measured(self, workflow: str, seconds: float, cost: float, checkpoint: str | None) -> None:
        """Learn this GPU's speed from a finished job (GPU time only: start to success in ComfyUI):
        seconds ≈ fixed per prompt + cost × seconds per unit, fitted over recent jobs.

        A job that had to load its checkpoint first is not a sample of the GPU's speed.
        """
        with self._lock:
            cold = bool(checkpoint) and checkpoint != self.checkpoint
            if checkpoint:
                self.checkpoint = checkpoint
            if cold and self._first_cold_job is None and seconds > 0:
                self._first_cold_job = (workflow, cost, seconds)  # its model load: the cold start's second part
            if cold or cost <= 0 or seconds <= 0:
                return
            model = self._speed.setdefault(workflow, SpeedModel())
            model.add(cost, seconds)
            self.rates[workflow] = {**model.estimate(), "jobs": model.jobs, "last_seconds": round(seconds, 3)}

    def cancel_local(self, task_id: str) -> bool:
        """Tell ComfyUI to drop this job's prompt, if this process runs it and has submitted it."""
        with self._lock:
            if task_id not in self._active:
                return False
            prompt_id = self._active[task_id]
            if prompt_id is None:  # not in ComfyUI yet: cancelled as soon as it is submitted
                self._cancel_pending.add(task_id)
                return False
            if task_id in self._cancelled:
                return False
            self._cancelled.add(task_id)
        try:
            outcome = self.client.cancel(prompt_id)
            log.info("cancel task=%s prompt=%s: %s", task_id, prompt_id, outcome)
            return True
        except ComfyError as exc:
            with self._lock:
                self._cancelled.discard(task_id)  # let the next sweep try again
            log.warning("cancel task=%s prompt=%s failed: %s", task_id, prompt_id, exc)
            return False

    # Heartbeat ----------------------------------------------------------------------------
    def _comfy_system_stats(self) -> dict:
        return self.client.system_stats().raw

    def _read_checkpoints(self) -> None:
        """The checkpoint files its ComfyUI can load, every CHECKPOINTS_REFRESH seconds: dispatch
        sends a job only to GPUs that have its model, and the fleet remembers them (registry)."""
        if time.monotonic() - self._checkpoints_read < self.settings.checkpoints_refresh:
            return
        try:
            nodes = self.client.object_info("CheckpointLoaderSimple")
        except ComfyError as exc:
            log.warning("could not read ComfyUI's checkpoints: %s", exc)
            return
        self._checkpoints_read = time.monotonic()
        self.checkpoints = checkpoint_names(nodes)

    def _model_load_seconds(self) -> float | None:
        """What this GPU's first model load took: the first cold job's GPU time less what the warm
        speed model predicts for it (until that workflow has a warm measurement, the whole cold
        job: an upper bound); None before any cold job. Dispatch charges it to a job whose
        checkpoint is not the one loaded, and it is the second part of the cold start."""
        with self._lock:
            if self._first_cold_job is None:
                return None
            workflow, cost, seconds = self._first_cold_job
            model = self._speed.get(workflow)
            warm = 0.0
            if model is not None and model.jobs:
                rate = model.estimate()
                warm = rate["seconds_per_prompt"] + cost * rate["seconds_per_unit"]
            return round(max(seconds - warm, 0.0), 3)

    def _cold_start_seconds(self) -> float | None:
        """Seconds this GPU took to come up: process start → ComfyUI answered, plus its first
        model load; None until both are known (the fleet keeps its last value meanwhile)."""
        load = self._model_load_seconds()
        if self._ready_seconds is None or load is None:
            return None
        return round(self._ready_seconds + load, 3)

    def probe_comfyui(self) -> None:
        """Ask ComfyUI how it is: its queue, its checkpoints and (when no NVIDIA source answers)
        the GPU through it. Runs on the probe thread (and once as the worker starts), never on
        the heartbeat's: each call may wait up to COMFYUI_TIMEOUT."""
        with self._lock:
            self._probe_since = time.monotonic()
        first_answer = False
        try:
            remaining = self.client.prompt_queue_remaining()
            comfy_ok = True
            if self._ready_seconds is None:
                self._ready_seconds = max(time.time() - self._process_started, 0.0)
            if not self._comfy_ok:
                first_answer = True
                # A job taken before ComfyUI was up waits on the websocket, whose reconnect backoff
                # has grown meanwhile: it connects now, not up to the backoff's 5 s later.
                self.client.wake()
            self._read_checkpoints()
        except ComfyError:
            remaining, comfy_ok = None, False
        gpu = self.probe.read()
        with self._lock:
            self.comfy_queue, self._comfy_ok, self._gpu, self._probe_since = remaining, comfy_ok, gpu, None
        if first_answer:
            self._beat_now.set()  # the fleet learns at once that this GPU can take jobs

    def comfyui_ok(self) -> bool:
        """ComfyUI answered the last probe, and the probe now in flight (if any) has not waited
        longer than HEARTBEAT_TTL: an answer older than a heartbeat is believed is stale."""
        with self._lock:
            pending = self._probe_since
            return self._comfy_ok and (pending is None or time.monotonic() - pending < self.settings.heartbeat_ttl)

    def heartbeat(self) -> dict:
        """What this worker tells the fleet now, from the last probe's findings: no ComfyUI call."""
        comfy_ok = self.comfyui_ok()
        with self._lock:
            rates = {k: dict(v) for k, v in self.rates.items()}
            running = sorted(self._active)
            checkpoint, gpu, comfy_queue = self.checkpoint, self._gpu, self.comfy_queue
        return {
            "queue": self.queue, "instance": self.instance, "host": self.settings.worker_host,
            "gpu_index": self.settings.gpu_index, "pid": os.getpid(), "comfyui_url": self.settings.comfyui_url,
            "comfyui_ok": comfy_ok, "comfyui_queue": comfy_queue if comfy_ok else None,
            "running": running, "concurrency": self.settings.worker_concurrency, "draining": self.draining,
            "gpu": gpu.as_dict() if gpu is not None else None, "host_stats": host_stats().as_dict(),
            "checkpoint": checkpoint, "checkpoints": self.checkpoints,
            "rates": rates, "started_at": self.started_at, "cold_start_seconds": self._cold_start_seconds(),
            "checkpoint_load_seconds": self._model_load_seconds(),
        }

    def publish_heartbeat(self) -> None:
        self.registry.publish(self.heartbeat())

    # Background threads ---------------------------------------------------------------------
    def start_background(self, celery_app) -> None:
        if self._threads:
            return
        from workers.tasks import collect  # the job path's own way of storing outputs and finishing

        self.monitor = Monitor(self.store, self.registry, celery_app, self.instance, self.settings.max_attempts,
                               self.settings.heartbeat_interval, comfy_cancel=_cancel_elsewhere,
                               notifier=self.notifier, webhook_resend_after=self.settings.webhook_resend_after,
                               grace=self.settings.reconcile_grace, job_timeout=self.settings.job_timeout,
                               collect=lambda record: collect(self, record))
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._probe_loop, "comfyui-probe"),
                             (self._monitor_loop, "monitor"), (self._cancel_loop, "cancel-listener"),
                             (self._canceller, "canceller")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """End of a warm shutdown: leave the fleet. A GPU that leaves with nothing of its own
        left behind is forgotten (removed on purpose: no "worker down" alert); one that still
        has jobs stays known, so the monitor moves them and the alert tells the operator."""
        self._stop.set()
        self._to_cancel.put(None)  # wakes the canceller to see the stop
        self._beat_now.set()  # and the heartbeat
        try:
            self.registry.withdraw(self.queue)
            if not self.store.taken(self.queue) and not self.store.waiting(self.queue):
                self.registry.forget(self.queue)
        except redis.RedisError:
            pass
        self.client.close()

    def _heartbeat_loop(self) -> None:
        """A beat every HEARTBEAT_INTERVAL (Redis only), and one at once when the probe asks."""
        while not self._stop.is_set():
            self._beat_now.clear()
            try:
                self.publish_heartbeat()
            except Exception:  # noqa: BLE001 - the heartbeat must outlive Redis hiccups
                log.exception("heartbeat failed")
            self._beat_now.wait(self.settings.heartbeat_interval)

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_comfyui()
            except Exception:  # noqa: BLE001 - the probe must outlive ComfyUI's and the GPU's hiccups
                log.exception("ComfyUI probe failed")
            self._wait_next_probe()

    def _monitor_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sweep_cancels()
                self.monitor.run_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive Redis or ComfyUI hiccups
                log.exception("monitor round failed")
            self._stop.wait(self.settings.heartbeat_interval)

    def _wait_next_probe(self) -> None:
        """HEARTBEAT_INTERVAL, cut short the moment a ComfyUI that had not answered yet does."""
        deadline = time.monotonic() + self.settings.heartbeat_interval
        while self._ready_seconds is None:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(STARTUP_PROBE_INTERVAL, left)):
                return
            if self._comfyui_answers(timeout=min(max(deadline - time.monotonic(), 0.05), 1.0)):
                return  # probe now (probe_comfyui() asks it properly, measures the ready time, beats)
        self._stop.wait(max(deadline - time.monotonic(), 0.0))

    def _comfyui_answers(self, timeout: float) -> bool:
        """The start-up probe: a short-timeout GET, so a ComfyUI that drops packets (rather than
        refusing) never stretches the probe's period past HEARTBEAT_INTERVAL by much."""
        try:
            response = requests.get(f"{self.client.base_url}/prompt", timeout=timeout)
            return response.ok and "exec_info" in response.json()  # what probe_comfyui() reads from it
        except (requests.RequestException, ValueError, TypeError):
            return False

    def _sweep_cancels(self) -> None:
        # Pub/sub messages are fire-and-forget; a cancel published while this process was
        # reconnecting is caught here from the task records.
        running = list(self.active())
        if not running:
            return
        for task_id, record in zip(running, self.store.get_many(running)):
            if record and record.get("cancel_requested"):
                self.cancel_local(task_id)

    def _watch_revokes(self) -> None:
        """A Celery revoke (CLI, Flower's Revoke or Terminate) is a cancel request like DELETE.
        Celery keeps revoked ids in memory only; with the thread pool a revoke does nothing to
        a running job (celery#5350), so each new id is cancelled here through the task store:
        a job still in Celery ends cancelled at once, one a worker has is deleted from
        ComfyUI's queue or interrupted by that worker. Every worker gets the broadcast; the
        transitions let exactly one of them act."""
        new = [t for t in list(celery_state.revoked) if t not in self._revokes_seen]
        for task_id in new:
            self._revokes_seen.add(task_id)
            record = self.store.get(task_id)
            if record is None or record.get("status") in ("succeeded", "failed", "cancelled"):
                continue
            result = self.store.cancel(task_id, record)
            log.info("task %s revoked through Celery: %s", task_id, result.outcome)
            if task_id in self.active():
                self._to_cancel.put(task_id)

    def _canceller(self) -> None:
        """Sends the cancels the listener hears to ComfyUI, in a thread already running (one
        started per cancel costs its start on every cancel's path), so the listener goes back
        to listening at once, ComfyUI slow to answer or not."""
        while not self._stop.is_set():
            task_id = self._to_cancel.get()
            if task_id is None:
                continue
            try:
                self.cancel_local(task_id)
            except Exception:  # noqa: BLE001 - the next cancel must still go out (the sweep retries this one)
                log.exception("cancel of task %s failed", task_id)

    def _cancel_loop(self) -> None:
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.25)
                    if message and message["type"] == "message":
                        task_id = message["data"].decode()
                        if task_id in self.active():
                            self._to_cancel.put(task_id)
                    self._watch_revokes()
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(1.0)
            finally:
                pubsub.close()


def checkpoint_names(nodes: dict) -> list[str] | None:
    """The choices of CheckpointLoaderSimple's `ckpt_name` in /object_info (both the list form
    `[[names], {...}]` and the newer `["COMBO", {"options": [names]}]`); None if absent."""
    node = nodes.get("CheckpointLoaderSimple")
    spec = ((node.input if node else {}).get("required") or {}).get("ckpt_name") if node else None
    if not spec:
        return None
    if isinstance(spec[0], list):
        return sorted(str(n) for n in spec[0])
    options = spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], dict) else None
    return sorted(str(n) for n in options) if isinstance(options, list) else None


def _cancel_elsewhere(comfyui_url: str, prompt_id: str) -> None:
    """Best effort: drop a dead worker's prompt from its ComfyUI, so it does not run twice."""
    try:
        with ComfyClient(comfyui_url, timeout=3.0) as client:
            client.cancel(prompt_id)
    except Exception as exc:  # noqa: BLE001 - that ComfyUI may be as dead as its worker
        log.info("could not cancel prompt %s on %s: %s", prompt_id, comfyui_url, exc)


@cache
def get_runtime() -> WorkerRuntime:
    return WorkerRuntime(get_settings())
