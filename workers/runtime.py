"""What one worker process holds for its life: Redis, the task store, storage, the ComfyUI
client, the jobs it is running, and two background threads (heartbeat, cancel listener)."""
from __future__ import annotations

import logging
import os
import threading
import time
from functools import cache

import redis

from common.registry import Registry
from common.settings import Settings, get_settings
from common.storage import make_storage
from common.task_store import CANCEL_CHANNEL, TaskStore, now_iso
from workers.comfy_client import ComfyClient, ComfyError

log = logging.getLogger("comfy.worker")


class WorkerRuntime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        self.store = TaskStore(self.redis, settings.result_ttl)
        self.registry = Registry(self.redis, settings.heartbeat_ttl)
        self.storage = make_storage(settings)
        self.client = ComfyClient(settings.comfyui_url, timeout=settings.comfyui_timeout)
        self.queue = settings.queue_name
        self.started_at = now_iso()
        self._active: dict[str, str | None] = {}  # task id → ComfyUI prompt id (None until submitted)
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # Jobs this process runs -------------------------------------------------------------
    def job_started(self, task_id: str) -> None:
        with self._lock:
            self._active[task_id] = None

    def job_submitted(self, task_id: str, prompt_id: str) -> None:
        with self._lock:
            self._active[task_id] = prompt_id

    def job_ended(self, task_id: str) -> None:
        with self._lock:
            self._active.pop(task_id, None)
            self._cancelled.discard(task_id)

    def active(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._active)

    def cancel_local(self, task_id: str) -> bool:
        """Tell ComfyUI to drop this job's prompt, if this process runs it and has submitted it."""
        with self._lock:
            prompt_id = self._active.get(task_id)
            if prompt_id is None or task_id in self._cancelled:
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

    # Background threads -------------------------------------------------------------------
    def start_background(self) -> None:
        if self._threads:
            return
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._cancel_loop, "cancel-listener")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.withdraw(self.queue)
        except redis.RedisError:
            pass
        self.client.close()

    def heartbeat(self) -> dict:
        try:
            self.client.queue()
            comfy_ok = True
        except ComfyError:
            comfy_ok = False
        return {
            "queue": self.queue, "host": self.settings.worker_host, "gpu_index": self.settings.gpu_index,
            "pid": os.getpid(), "comfyui_url": self.settings.comfyui_url, "comfyui_ok": comfy_ok,
            "running": sorted(self.active()), "concurrency": self.settings.worker_concurrency,
            "started_at": self.started_at,
        }

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.registry.publish(self.heartbeat())
                self._sweep_cancels()
            except Exception:  # noqa: BLE001 - the heartbeat must outlive Redis or ComfyUI hiccups
                log.exception("heartbeat failed")
            self._stop.wait(self.settings.heartbeat_interval)

    def _sweep_cancels(self) -> None:
        # Pub/sub messages are fire-and-forget; a cancel published while this process was
        # reconnecting is caught here from the task records.
        running = [t for t, p in self.active().items() if p is not None]
        if not running:
            return
        for task_id, record in zip(running, self.store.get_many(running)):
            if record and record.get("cancel_requested"):
                self.cancel_local(task_id)

    def _cancel_loop(self) -> None:
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        task_id = message["data"].decode()
                        if task_id in self.active():
                            threading.Thread(target=self.cancel_local, args=(task_id,), daemon=True).start()
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(1.0)
            finally:
                pubsub.close()


@cache
def get_runtime() -> WorkerRuntime:
    return WorkerRuntime(get_settings())
