"""The Celery application of the GPU workers: the shared configuration (common/producer.py)
with the GPU job included. `celery -A workers.celery_app ...` (control, inspect, Flower) and
`python -m workers` use it."""
from __future__ import annotations

from common.producer import RUN_WORKFLOW, make_celery  # noqa: F401 - the task name lives with enqueueing

app = make_celery(include=("workers.tasks",))
