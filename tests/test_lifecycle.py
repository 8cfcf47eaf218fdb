"""The job lifecycle as declared (common/lifecycle.py): every allowed transition, every refused
one, and the Redis script deciding exactly as the table does. The first part needs no Redis."""
from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import pytest
import redis

from common import keys, lifecycle
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
    queues = ("gpu.a.0", "gpu.a.1")
    for _ in range(60):
        task_id, queue = str(uuid.uuid4()), rng.choice(queues)
        store.create({"task_id": task_id, "workflow": "w", "queue": queue, "owner": "o", "params": {},
                      "created_at": "2026-01-01T00:00:00Z", "cost": rng.choice((2.0, 0.125, 7.3))}, {"graph": {}})
        state = State.WAITING
        for _ in range(8):
            name = rng.choice(names)
            mine = rng.random() < 0.8  # sometimes a worker that is not the owner asks
            expected = apply(name, state, owner_matches=mine or state not in (State.HANDED, State.RUNNING))
            to_queue = rng.choice(queues) if name in ("requeue", "hand") else None  # moves between GPUs
            done = store.apply(name, task_id, queue=queue, owner="o", instance="w1" if mine else "w2",
                               to_queue=to_queue, fields={"worker": "w1"} if name == "hand" else None)
            assert done.applied == (expected is not None), (name, state, mine)
            assert done.before == state
            state = expected or state
            queue = to_queue if done.applied and to_queue else queue
            assert lifecycle.state_of(store.get(task_id)) == state
        _assert_counters_hold(client, store, queues)


def _assert_counters_hold(client, store: TaskStore, queues) -> None:
    """The queues' indexes, counters and cost totals hold exactly the unfinished jobs."""
    unfinished = [r for r in store.get_many(m.decode() for m in client.smembers("cs:active")) if r]
    counts = store.queue_counts()
    for queue in queues:
        mine = [r for r in unfinished if r["queue"] == queue]
        assert sorted(store.waiting(queue) + store.taken(queue)) == sorted(r["task_id"] for r in mine)
        assert counts.get(queue, (0, 0, 0, 0)) == (len(store.waiting(queue)), len(store.handed(queue)),
                                                   len(store.running(queue)),
                                                   sum(round(r["cost"] * 1000) for r in mine)), queue


def test_an_upgrade_adopts_the_old_cost_totals(redis_server):
    """Jobs submitted by a version that kept a queue's total in its own key: the monitor folds it
    into the counters hash, which then stays exact as those jobs move on."""
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)
    old = [str(uuid.uuid4()) for _ in range(3)]
    for task_id in old:  # what the old version wrote: the record, the index and its own total
        store.create({"task_id": task_id, "workflow": "w", "queue": "gpu.u.0", "owner": "o", "params": {},
                      "created_at": "2026-01-01T00:00:00Z", "cost": 1.5}, {"graph": {}})
    client.delete("cs:queues")
    client.set("cs:loadsum:gpu.u.0", 4500)
    store.apply("hand", old[0], queue="gpu.u.0", instance="w1", fields={"worker": "w1"})  # the new version moves one
    assert store.adopt_legacy_totals(["gpu.u.0", "gpu.u.1"]) == 1
    assert not client.exists("cs:loadsum:gpu.u.0")
    _assert_counters_hold(client, store, ["gpu.u.0"])
    assert store.adopt_legacy_totals(["gpu.u.0"]) == 0
    store.apply("cancel_waiting", old[1], queue="gpu.u.0")
    _assert_counters_hold(client, store, ["gpu.u.0"])


def test_transitions_in_one_round_trip_decide_as_one_by_one(redis_server):
    """`apply_in_turn` (a worker's last output with its `succeed`): each step is checked on its
    own, in order, and a Redis that forgot the script (a restart) is handled."""
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)

    def running_job() -> str:
        task_id = str(uuid.uuid4())
        store.create({"task_id": task_id, "workflow": "w", "queue": "gpu.a.0", "owner": "o", "params": {},
                      "created_at": "2026-01-01T00:00:00Z"}, {"graph": {}})
        store.apply("hand", task_id, queue="gpu.a.0", owner="o", instance="w1", fields={"worker": "w1"})
        store.apply("start", task_id, queue="gpu.a.0", owner="o", instance="w1")
        return task_id

    def steps(task_id: str, instance: str) -> list:
        call = {"queue": "gpu.a.0", "owner": "o", "instance": instance}
        return [("output", task_id, {**call, "event": {"index": 0}}), ("succeed", task_id, call)]

    mine = running_job()
    client.script_flush()
    stored, done = store.apply_in_turn(steps(mine, "w1"))
    assert stored.applied and done.applied and done.before == State.RUNNING
    assert lifecycle.state_of(store.get(mine)) == State.SUCCEEDED
    kinds = [fields[b"type"] for _, fields in client.xrange(keys.events(mine))]
    assert kinds[-2:] == [b"output", b"succeeded"]
    theirs = running_job()  # another worker owns it: both refused, nothing recorded
    stored, done = store.apply_in_turn(steps(theirs, "w2"))
    assert not stored.applied and not done.applied
    assert lifecycle.state_of(store.get(theirs)) == State.RUNNING


def _handed_job(store: TaskStore) -> str:
    """A job on gpu.a.0, handed to worker w1."""
    task_id = str(uuid.uuid4())
    store.create({"task_id": task_id, "workflow": "w", "queue": "gpu.a.0", "owner": "o", "params": {},
                  "created_at": "2026-01-01T00:00:00Z"}, {"graph": {}})
    store.apply("hand", task_id, queue="gpu.a.0", owner="o", instance="w1", fields={"worker": "w1"})
    return task_id


def test_a_cancel_of_a_handed_job_flags_it_and_tells_its_worker(redis_server):
    """TaskStore.cancel's short way (the record says a worker has it), also when Redis forgot
    the script; the last event id is where DELETE starts waiting."""
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)
    task_id = _handed_job(store)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CANCEL_CHANNEL)
    client.script_flush()
    result = store.cancel(task_id, store.get(task_id))
    assert (result.outcome, result.state, result.last_event) == ("requested", State.HANDED, store.last_event_id(task_id))
    assert store.get(task_id)["cancel_requested"] is True
    messages = [pubsub.get_message(timeout=1) for _ in range(3)]  # the first read takes the subscribe reply
    assert [m["data"].decode() for m in messages if m] == [task_id]


def test_a_cancel_that_finds_the_job_ended_tells_no_worker(redis_server):
    """The short way acts on a record read before: if the job ended meanwhile, `request_cancel`
    is refused and nothing is published (the script publishes only when the flag is set)."""
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)
    task_id = _handed_job(store)
    seen = store.get(task_id)  # handed, as DELETE read it
    store.apply("start", task_id, queue="gpu.a.0", owner="o", instance="w1")
    store.apply("succeed", task_id, queue="gpu.a.0", owner="o", instance="w1")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CANCEL_CHANNEL)
    assert pubsub.get_message(timeout=1) is None  # takes the subscribe reply
    result = store.cancel(task_id, seen)
    assert (result.outcome, result.state) == ("finished", State.SUCCEEDED)
    assert pubsub.get_message(timeout=0.5) is None and not store.get(task_id).get("cancel_requested")


def test_every_file_the_architecture_doc_names_exists():
    doc = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:app|common|workers|workflows|deploy|comfyui_sim|bench)/[\w/.<>-]+\.py)`", doc))
    assert len(named) > 15
    assert sorted(p for p in named if "<" not in p and not (REPO / p).exists()) == []
