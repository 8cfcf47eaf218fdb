"""`python -m workers`: one Celery worker for this machine's GPU queue (see README, settings).
`python -m workers webhooks`: the webhook worker (workers/webhooks.py), on WEBHOOK_QUEUE.

The same as `celery -A workers.celery_app worker -Q <GPU_QUEUE> --concurrency
<WORKER_CONCURRENCY> -E`: the app's thread pool (workers/pool.py), so the worker answers control
commands and keeps the next prompt queued in ComfyUI while one runs.
"""
from __future__ import annotations

import sys

from common.settings import get_settings
from workers.celery_app import app


def main(argv: list[str]) -> None:
    if argv[:1] == ["webhooks"]:
        from workers.webhooks import main as webhooks_main

        return webhooks_main(argv[1:])
    settings = get_settings()
    queue = settings.queue_name
    app.worker_main([
        "worker", "-Q", queue, "-n", f"{queue}@%h",
        "--concurrency", str(settings.worker_concurrency), "-E", "--loglevel", settings.log_level,
        # Workers coordinate through Redis records, not Celery's worker-to-worker chatter.
        "--without-mingle", "--without-gossip", *argv,
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
