"""The GPU worker's Celery pool: Celery's thread pool, plus an answer to "terminate".

A Celery revoke (CLI, Flower's Revoke or Terminate) is a cancel request like DELETE: the
worker's cancel watcher (workers/runtime.py) reads the revoked ids Celery keeps in memory and
cancels those jobs through ComfyUI (delete the queued prompt, interrupt the running one). With
`terminate=True` Celery also asks the pool to kill the job; the stock thread pool cannot and
raises NotImplementedError (celery#8147). Killing a thread would be wrong anyway: the prompt
runs in ComfyUI, not here. So terminate does nothing but log, and the cancel does the work.
"""
from __future__ import annotations

import logging

from celery.concurrency.thread import ApplyResult, TaskPool

log = logging.getLogger("comfy.worker")


class _Result(ApplyResult):
    def terminate(self, signal=None) -> None:
        log.info("terminate requested: the job is cancelled through ComfyUI, not by killing a thread")


class CancellingThreadPool(TaskPool):
    def on_apply(self, *args, **kwargs) -> ApplyResult:
        return _Result(super().on_apply(*args, **kwargs).f)

    def terminate_job(self, pid, signal=None) -> None:
        log.info("terminate requested (pid %s, signal %s): cancelling through ComfyUI instead", pid, signal)
