"""Reconciliation decisions (common/reconcile.py), pure: which taken jobs are suspect, and what
to do with one given what its ComfyUI says of its prompt."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from common import reconcile as r

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


RUNNING = {"task_id": "t1", "state": "running", "status": "running", "worker": "w1", "handed_at": ago(31),
           "started_at": ago(30), "attempts": 1}
HANDED = {**RUNNING, "state": "handed", "status": "queued", "started_at": None}
HOLDS = {"instance": "w1", "running": ["t1"]}

SUSPECTS = [
    ("its worker holds it", RUNNING, HOLDS, False),
    ("its worker holds it, waiting inside ComfyUI", HANDED, HOLDS, False),
    ("heartbeat expired", RUNNING, None, True),
    ("a new process took the queue", RUNNING, {"instance": "w2", "running": ["t1"]}, True),
    ("the live worker dropped it", RUNNING, {"instance": "w1", "running": []}, True),
    ("the live worker dropped it before ComfyUI started it", HANDED, {"instance": "w1", "running": ["t9"]}, True),
    ("just taken: the heartbeat may predate it", {**HANDED, "handed_at": ago(1)}, None, False),
    ("waiting in Celery is not a taken job", {**RUNNING, "state": "waiting", "status": "queued"}, None, False),
    ("a finished job is settled", {**RUNNING, "state": "succeeded", "status": "succeeded"}, None, False),
]


@pytest.mark.parametrize("case, record, beat, expected", SUSPECTS, ids=[c[0] for c in SUSPECTS])
def test_suspects(case, record, beat, expected):
    assert r.suspect(record, beat, NOW, grace=5.0) is expected


def settle(record=RUNNING, comfy=r.ABSENT, alive=True, **kw):
    return r.settle(record, comfy, now=NOW, max_attempts=3, job_timeout=kw.get("job_timeout", 3600),
                    worker_alive=alive)


@pytest.mark.parametrize("comfy", [r.RUNNING, r.PENDING])
def test_comfyui_still_holding_the_prompt_is_waited_for(comfy):
    assert settle(comfy=comfy).action == r.WAIT
    assert settle(comfy=comfy, alive=False).action == r.WAIT  # its worker died: ComfyUI finishes it anyway


def test_a_prompt_running_past_the_job_timeout_is_stopped():
    decision = settle(comfy=r.RUNNING, job_timeout=10)
    assert (decision.action, decision.code) == (r.TIMEOUT, "job_timeout")


def test_a_finished_prompt_is_collected_not_run_again():
    for alive in (True, False):
        assert settle(comfy=r.SUCCEEDED, alive=alive).action == r.COLLECT
    assert settle(HANDED, comfy=r.SUCCEEDED).action == r.COLLECT  # it even finished before we saw it start


def test_a_failed_prompt_fails_the_job_without_a_rerun():
    assert settle(comfy=r.FAILED).action == r.FAIL


@pytest.mark.parametrize("comfy", [r.ABSENT, r.UNREACHABLE, r.INTERRUPTED])
def test_a_lost_prompt_runs_again_elsewhere_until_attempts_run_out(comfy):
    dropped = settle(comfy=comfy)
    assert (dropped.action, dropped.code) == (r.REQUEUE, "job_dropped")
    dead = settle(comfy=comfy, alive=False)
    assert (dead.action, dead.code) == (r.REQUEUE, "worker_lost")
    spent = settle({**RUNNING, "attempts": 3}, comfy=comfy, alive=False)
    assert (spent.action, spent.code) == (r.GIVE_UP, "worker_lost")


def test_a_lost_job_whose_cancel_was_asked_ends_cancelled():
    assert settle({**RUNNING, "cancel_requested": True}, comfy=r.ABSENT).action == r.CANCEL
    assert settle({**RUNNING, "cancel_requested": True}, comfy=r.INTERRUPTED).action == r.CANCEL


def test_collecting_that_keeps_failing_stops_after_max_attempts():
    decision = settle({**RUNNING, "collect_attempts": 3}, comfy=r.SUCCEEDED)
    assert (decision.action, decision.code) == (r.GIVE_UP, "collect_failed")
