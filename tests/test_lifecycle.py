"""The job lifecycle as declared (common/lifecycle.py): every allowed transition, every refused
one, and the Redis script deciding exactly as the table does. The first part needs no Redis."""
from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import pytest
import redis

from common import lifecycle
from common.lifecycle import FINAL_STATES, TRANSITIONS, State, Status, apply
from common.task_store import TaskStore

REPO = Path(__file__).resolve().parent.parent
ACTIVE = [State.WAITING, State.HANDED, State.RUNNING]
EXPECTED = {  # transition → {source: target}; anything else is refused
    "submit": {None: State.WAITING},
    "hand": {State.WAITING: State.HANDED},
    "start": {State.HANDED: State.RUNNING},
    "progress": {State.RUNNING: State.RUNNING},
    "output": {State.RUNNING: State.RUNNING},
    "succeed": {State.RUNNING: State.SUCCEEDED},
    "fail": {s: State.FAILED for s in ACTIVE},
    "request_cancel": {State.HANDED: State.HANDED, State.RUNNING: State.RUNNING},
    "cancel_waiting": {State.WAITING: State.CANCELLED},
    "cancel_run": {State.HANDED: State.CANCELLED, State.RUNNING: State.CANCELLED},
    "requeue": {s: State.WAITING for s in ACTIVE},
    "collect": {State.HANDED: State.HANDED, State.RUNNING: State.RUNNING},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("state", [None, *State], ids=lambda s: str(s))
def test_each_transition_applies_from_its_sources_only(name, state):
    assert apply(name, state) == EXPECTED[name].get(state)


def test_the_table_declares_exactly_these_transitions():
    assert set(TRANSITIONS) == set(EXPECTED)


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_a_finished_job_never_changes(state):
    assert [name for name in TRANSITIONS if apply(name, state) is not None] == []


def test_cancel_and_hand_over_cannot_both_win():
    # The API's cancel first: no worker can take the job afterwards.
    assert apply("cancel_waiting", State.WAITING) == State.CANCELLED
    assert apply("hand", State.CANCELLED) is None
    # The worker's hand-over first: the API can no longer end it alone; it asks the worker.
    assert apply("hand", State.WAITING) == State.HANDED
    assert apply("cancel_waiting", State.HANDED) is None
    assert apply("request_cancel", State.HANDED) == State.HANDED
    assert apply("cancel_run", State.HANDED) == State.CANCELLED


def test_cancel_and_start_cannot_both_win():
    assert apply("cancel_run", State.HANDED) == State.CANCELLED
    assert apply("start", State.CANCELLED) is None
    assert apply("start", State.HANDED) == State.RUNNING
    assert apply("cancel_waiting", State.RUNNING) is None


@pytest.mark.parametrize("name", sorted(n for n, t in TRANSITIONS.items() if t.owned))
def test_a_worker_that_lost_the_job_cannot_touch_it(name):
    for state in (State.HANDED, State.RUNNING):
        if EXPECTED[name].get(state) is not None:
            assert apply(name, state, owner_matches=False) is None, (name, state)


def test_a_job_waiting_inside_comfyui_is_queued_not_running():
    assert lifecycle.status_of(State.WAITING) == lifecycle.status_of(State.HANDED) == Status.QUEUED
    assert lifecycle.status_of(State.RUNNING) == Status.RUNNING
    assert TRANSITIONS["start"].event == "started" and TRANSITIONS["start"].sources == {State.HANDED}


def test_every_state_is_reachable_and_every_active_one_can_end():
    reachable, frontier = set(), [apply("submit", None)]
    while frontier:
        state = frontier.pop()
        if state in reachable:
            continue
        reachable.add(state)
        frontier += [t for t in (apply(name, state) for name in TRANSITIONS) if t is not None]
    assert reachable == set(State)
    for state in ACTIVE:
        assert {apply(name, state) for name in TRANSITIONS} & FINAL_STATES, state


def test_records_from_before_states_existed_map_onto_them():
    assert lifecycle.state_of({"status": "queued"}) == State.WAITING
    assert lifecycle.state_of({"status": "running"}) == State.RUNNING
    assert lifecycle.state_of({"status": "queued", "state": "handed"}) == State.HANDED


def test_architecture_doc_shows_the_table_the_code_declares():
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert lifecycle.table_markdown() in doc


def test_no_module_builds_a_redis_key_by_hand():
    """Every `cs:` key comes from common/keys.py (tests and benchmarks may read them)."""
    offenders = []
    for folder in ("app", "common", "workers", "workflows", "deploy"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "keys.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"""["']cs:""", code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_api_imports_nothing_from_the_workers():
    offenders = [f"{p.relative_to(REPO)}" for p in (REPO / "app").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+workers\b", p.read_text(), re.M)]
    assert offenders == []


# ---- The Redis script decides as the table does --------------------------------------------------

def test_the_store_and_the_table_agree_on_random_histories(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)
    rng = random.Random(13)
    names = [n for n in TRANSITIONS if n != "submit"]
    for _ in range(60):
        task_id = str(uuid.uuid4())
        store.create({"task_id": task_id, "workflow": "w", "queue": "gpu.a.0", "owner": "o", "params": {},
                      "created_at": "2026-01-01T00:00:00Z", "cost": 2.0}, {"graph": {}})
        state = State.WAITING
        for _ in range(8):
            name = rng.choice(names)
            mine = rng.random() < 0.8  # sometimes a worker that is not the owner asks
            expected = apply(name, state, owner_matches=mine or state not in (State.HANDED, State.RUNNING))
            done = store.apply(name, task_id, queue="gpu.a.0", owner="o", instance="w1" if mine else "w2",
                               fields={"worker": "w1"} if name == "hand" else None)
            assert done.applied == (expected is not None), (name, state, mine)
            assert done.before == state
            state = expected or state
            assert lifecycle.state_of(store.get(task_id)) == state
    # Whatever happened, the queue's indexes and cost total hold exactly the unfinished jobs.
    unfinished = [r for r in store.get_many(m.decode() for m in client.smembers("cs:active")) if r]
    assert sorted(store.waiting("gpu.a.0") + store.taken("gpu.a.0")) == sorted(r["task_id"] for r in unfinished)
    assert int(client.get("cs:loadsum:gpu.a.0") or 0) == 2000 * len(unfinished)


def test_every_file_the_architecture_doc_names_exists():
    doc = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:app|common|workers|workflows|deploy|comfyui_sim|bench)/[\w/.<>-]+\.py)`", doc))
    assert len(named) > 15
    assert sorted(p for p in named if "<" not in p and not (REPO / p).exists()) == []
