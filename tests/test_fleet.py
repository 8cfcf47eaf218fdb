"""The fleet: dispatch, failover and scaling with real workers, simulators and Redis.

Each test asserts every job's final state and that no job shows two result sets.
"""
from __future__ import annotations

import json
import signal
import statistics
import time

import pytest
import redis
import requests

from common import keys
from tests.support.api import story, submit, wait_status
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(150)

FAST_FAILOVER = {"COMFYUI_UNREACHABLE_DEADLINE": "3", "COMFYUI_STALL_TIMEOUT": "5", "MAX_ATTEMPTS": "3"}


def record(fleet, task_id: str) -> dict:
    from common.task_store import read_record

    return read_record(redis.Redis.from_url(fleet.redis.url), task_id) or {}


def all_done(fleet, tasks, timeout=60.0) -> list[dict]:
    return [wait_status(fleet.url, t["task_id"], timeout=timeout) for t in tasks]


def assert_one_result_set(fleet, docs):
    for doc in docs:
        images = doc["result"]["images"]
        assert len(images) == len(doc["params"]["scenes"]) if "scenes" in doc["params"] else len(images) == 1
        for image in images:
            assert requests.get(fleet.url + image["url"], timeout=5).status_code == 200


def job(steps=10, **fields):
    return story(scenes=["[Lena] reads a letter"], steps=steps, **fields)


def test_dispatch_prefers_the_idle_and_the_faster_gpu(fleet_factory):
    fleet = fleet_factory()
    slow, fast = fleet.add_sim("--step-seconds", "0.03"), fleet.add_sim("--step-seconds", "0.03", "--speed", "3")
    fleet.add_worker(slow, queue="gpu.test.slow")
    fleet.add_worker(fast, queue="gpu.test.fast")
    fleet.wait_workers()
    fleet.start_api()
    # Idle first: with nothing measured, two jobs in a row land on two GPUs.
    first, second = submit(fleet.url, job()), submit(fleet.url, job())
    assert {record(fleet, first["task_id"])["queue"], record(fleet, second["task_id"])["queue"]} == {
        "gpu.test.slow", "gpu.test.fast"}
    all_done(fleet, [first, second])
    # A job on a warm GPU measures its speed (a cold one also loaded its checkpoint).
    all_done(fleet, [submit(fleet.url, job(gpu=queue)) for queue in ("gpu.test.slow", "gpu.test.fast")])
    # The heartbeats now carry each GPU's speed: a burst favours the fast one.
    wait_until(lambda: all(w.get("rates") for w in requests.get(fleet.url + "/api/v1/workers", timeout=5).json()[
        "workers"]), 10, what="measured rates in the heartbeats")
    burst = [submit(fleet.url, job()) for _ in range(8)]
    docs = all_done(fleet, burst)
    on_fast = sum(d["gpu"] == "gpu.test.fast" for d in docs)
    assert on_fast >= 5, [d["gpu"] for d in docs]
    assert all(d["status"] == "succeeded" for d in docs)
    workers = requests.get(fleet.url + "/api/v1/workers", timeout=5).json()["workers"]
    assert {w["queue"] for w in workers} == {"gpu.test.slow", "gpu.test.fast"}
    for worker in workers:
        assert worker["gpu"]["source"] == "comfyui" and worker["gpu"]["memory_total_mb"] > 0
        assert worker["host_stats"]["ram_total_mb"] > 0 and worker["comfyui_ok"] is True


def test_pinned_job_runs_on_its_gpu_an_unknown_pin_is_422_and_a_down_one_503(fleet_factory):
    fleet = fleet_factory()
    for index in range(2):
        fleet.add_worker(fleet.add_sim("--step-seconds", "0.02"))
    fleet.wait_workers()
    fleet.start_api()
    pinned = [submit(fleet.url, job(gpu="gpu.test.1")) for _ in range(3)]
    assert {d["gpu"] for d in all_done(fleet, pinned)} == {"gpu.test.1"}
    # A GPU or host the fleet never had is the caller's mistake, and the answer lists what exists.
    for pin in ({"gpu": "gpu.nowhere.9"}, {"host": "nowhere"}):
        refused = requests.post(fleet.url + "/api/v1/generate", json=job(**pin), timeout=5)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unknown_gpu" and error["source"] == "service"
        assert error["details"]["available"]["gpus"] == ["gpu.test.0", "gpu.test.1"]
    # A known GPU that is down now is the service's condition: 503, retry later.
    fleet.workers[0].stop()  # warm shutdown: it leaves the fleet at once
    wait_until(lambda: len(requests.get(fleet.url + "/api/v1/workers", timeout=5).json()["workers"]) == 1, 20,
               what="worker 0 gone")
    down = requests.post(fleet.url + "/api/v1/generate", json=job(gpu="gpu.test.0"), timeout=5)
    assert down.status_code == 503 and down.json()["error"]["code"] == "gpu_unavailable", down.text


def test_worker_killed_mid_job_its_comfyui_finishes_and_the_outputs_are_collected(fleet_factory):
    fleet = fleet_factory(**FAST_FAILOVER)
    sims, workers = fleet.start_gpus(2, "--step-seconds", "0.05")
    task = submit(fleet.url, job(steps=60))
    running = wait_status(fleet.url, task["task_id"], statuses=("running",))
    victim = next(w for w in workers if w.queue == running["gpu"])
    victim.stop(signal.SIGKILL)

    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["gpu"] == victim.queue  # ComfyUI kept running it; nothing ran twice
    final = record(fleet, task["task_id"])
    assert final["attempts"] == 1 and final["collect_attempts"] == 1 and not final.get("attempt_log")
    assert_one_result_set(fleet, [done])
    ran = [b for sim in sims for b in sim.record()["busy"] if b["prompt_id"] == final["prompt_id"]]
    assert len(ran) == 1 and ran[0]["outcome"] == "success"
    assert sum(len(sim.record()["submitted"]) for sim in sims) == 1


def test_worker_and_its_comfyui_killed_mid_job_the_job_runs_again_elsewhere(fleet_factory):
    fleet = fleet_factory(**FAST_FAILOVER)
    sims, workers = fleet.start_gpus(2, "--step-seconds", "0.05")
    task = submit(fleet.url, job(steps=40))
    running = wait_status(fleet.url, task["task_id"], statuses=("running",))
    victim = next(w for w in workers if w.queue == running["gpu"])
    victim_sim = sims[workers.index(victim)]
    victim.stop(signal.SIGKILL)
    victim_sim.kill()

    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["gpu"] != victim.queue
    final = record(fleet, task["task_id"])
    assert final["attempts"] == 2
    assert [a["code"] for a in final["attempt_log"]] == ["worker_lost"]
    assert_one_result_set(fleet, [done])


def test_a_live_worker_that_dropped_its_job_is_caught_and_the_job_moved(fleet_factory):
    """The worker survives but no longer has the job (its task died outside the job's own
    handling); ComfyUI lost the prompt too: the monitor notices within the grace and moves it."""
    fleet = fleet_factory(**FAST_FAILOVER, RECONCILE_GRACE="2")
    sims, workers = fleet.start_gpus(2, "--step-seconds", "0.05")
    task = submit(fleet.url, job(steps=40))
    running = wait_status(fleet.url, task["task_id"], statuses=("running",))
    victim_sim = sims[[w.queue for w in workers].index(running["gpu"])]
    # Freeze the worker so it cannot notice, make ComfyUI forget the prompt, then forge what a
    # dropped job looks like: its worker alive and heartbeating, the job not in its running list.
    worker = workers[[w.queue for w in workers].index(running["gpu"])]
    worker.send(signal.SIGSTOP)
    try:
        victim_sim.restart()
        client = redis.Redis.from_url(fleet.redis.url)
        beat = json.loads(client.hget("cs:workers:beats", running["gpu"]))
        beat["running"] = []
        alive_until = __import__("time").time() + 30  # a heartbeat from the future: alive a while
        client.hset("cs:workers:beats", running["gpu"], json.dumps(beat))
        client.hset("cs:workers:beat_times", running["gpu"], repr(alive_until))
        client.zadd("cs:workers", {running["gpu"]: alive_until})
        moved = wait_until(lambda: record(fleet, task["task_id"]).get("attempt_log"), 15, what="the job moved")
        assert [a["code"] for a in moved] == ["job_dropped"]
    finally:
        worker.send(signal.SIGCONT)
    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded" and done["gpu"] != running["gpu"], done


def test_comfyui_crash_mid_job_moves_the_job_then_gives_up_naming_the_attempts(fleet_factory):
    fleet = fleet_factory(**{**FAST_FAILOVER, "MAX_ATTEMPTS": "2"})
    sims = [fleet.add_sim("--step-seconds", "0.03") for _ in range(3)]
    for sim in sims:
        fleet.add_worker(sim)
    fleet.wait_workers()
    fleet.start_api()

    sims[0].faults(crash_at_step=3)
    first = submit(fleet.url, job(steps=20))
    doc = wait_status(fleet.url, first["task_id"], timeout=60)
    assert doc["status"] == "succeeded", doc
    log = record(fleet, first["task_id"])["attempt_log"]
    # It only moved if it started on the crashing GPU; either way it succeeded once.
    assert all(a["code"] in ("unreachable", "prompt_lost", "timeout") for a in log)

    # Every GPU that is left crashes at step 3: two attempts, then a clear failure.
    for sim in sims[1:]:
        sim.faults(crash_at_step=3)
    doomed = submit(fleet.url, job(steps=20))
    failed = wait_status(fleet.url, doomed["task_id"], timeout=90)
    assert failed["status"] == "failed", failed
    error = failed["error"]
    assert error["source"] == "comfyui" and "2 attempts" in error["message"]
    assert len(error["details"]["attempts"]) == 2
    assert len({a["gpu"] for a in error["details"]["attempts"]}) == 2  # two different GPUs named


def test_comfyui_restarted_mid_job_lost_prompt_is_retried(fleet_factory):
    fleet = fleet_factory(**{**FAST_FAILOVER, "COMFYUI_UNREACHABLE_DEADLINE": "30"})
    sim = fleet.add_sim("--step-seconds", "0.05")
    other = fleet.add_sim("--step-seconds", "0.05")
    fleet.add_worker(sim, queue="gpu.test.a")
    fleet.add_worker(other, queue="gpu.test.b")
    fleet.wait_workers()
    fleet.start_api()
    task = submit(fleet.url, job(steps=40))
    running = wait_status(fleet.url, task["task_id"], statuses=("running",))
    restarted = sim if running["gpu"] == "gpu.test.a" else other
    wait_until(lambda: restarted.record()["running"], 10, what="the prompt running in ComfyUI")
    restarted.restart()  # comes back empty: the prompt is neither queued nor in history
    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert [a["code"] for a in record(fleet, task["task_id"])["attempt_log"]] == ["prompt_lost"]


def test_silent_gpu_its_waiting_jobs_move_and_it_gets_nothing_new(fleet_factory):
    fleet = fleet_factory(**FAST_FAILOVER)
    sims, workers = fleet.start_gpus(2, "--step-seconds", "0.03")
    tasks = [submit(fleet.url, job(steps=15)) for _ in range(10)]
    wait_until(lambda: redis.Redis.from_url(fleet.redis.url).zcard("cs:queued:gpu.test.1") >= 2, 10,
               what="jobs waiting on gpu.test.1")
    workers[1].send(signal.SIGSTOP)  # hung: alive but silent, like a frozen machine
    try:
        r = redis.Redis.from_url(fleet.redis.url)
        wait_until(lambda: r.zcard("cs:queued:gpu.test.1") == 0, 15, what="the stranded jobs to move")
        fresh = submit(fleet.url, job(steps=5))
        assert record(fleet, fresh["task_id"])["queue"] == "gpu.test.0"
        docs = all_done(fleet, [*tasks, fresh], timeout=90)
    finally:
        workers[1].send(signal.SIGCONT)
    assert all(d["status"] == "succeeded" for d in docs), [d["status"] for d in docs]
    assert_one_result_set(fleet, docs)
    # Once it answers again it is healthy and takes work again.
    wait_until(lambda: any(w["queue"] == "gpu.test.1" for w in requests.get(
        fleet.url + "/api/v1/workers", timeout=5).json()["workers"]), 15, what="gpu.test.1 back")


def test_job_longer_than_the_visibility_timeout_runs_once(fleet_factory):
    fleet = fleet_factory(VISIBILITY_TIMEOUT="1")
    (sim,), _ = fleet.start_gpus(1, "--step-seconds", "0.13")
    task = submit(fleet.url, job(steps=100))  # ~13 s: Redis redelivers the unacked message meanwhile
    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "succeeded"
    prompt = record(fleet, task["task_id"])["prompt_id"]
    assert sim.record()["submitted"] == [prompt]
    assert record(fleet, task["task_id"])["attempts"] == 1


def test_a_job_that_kills_its_gpu_every_time_stops_after_max_attempts(fleet_factory):
    fleet = fleet_factory(**{**FAST_FAILOVER, "MAX_ATTEMPTS": "2"})
    sim = fleet.add_sim("--step-seconds", "0.05")
    worker = fleet.add_worker(sim)
    fleet.wait_workers()
    fleet.start_api()
    task = submit(fleet.url, job(steps=100))
    for attempt in (1, 2):
        wait_until(lambda: record(fleet, task["task_id"]).get("attempts") == attempt
                   and record(fleet, task["task_id"])["status"] == "running", 30, what=f"attempt {attempt}")
        # The job takes its whole GPU host down: worker and ComfyUI; the supervisor restarts both.
        worker.stop(signal.SIGKILL)
        sim.restart()
        worker.start()
    done = wait_status(fleet.url, task["task_id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "worker_lost" and "2 attempts" in done["error"]["message"]


def test_added_worker_takes_work_without_restarting_anything(fleet_factory):
    fleet = fleet_factory()
    fleet.add_worker(fleet.add_sim("--step-seconds", "0.03"))
    fleet.wait_workers()
    fleet.start_api()
    # The first GPU must still be busy when the new one joins: idle, having warmed its checkpoint,
    # it would rightly get the next jobs (the new GPU would have to load it first). A worker boots
    # in seconds or, on a loaded host, many: a long job holds it until the test cancels it.
    blocker = submit(fleet.url, story(scenes=["[Lena] reads a letter"] * 24, steps=100))  # ~72 s at 0.03 s/step
    before = [submit(fleet.url, job(steps=20)) for _ in range(3)]
    fleet.add_worker(fleet.add_sim("--step-seconds", "0.03"), queue="gpu.test.new")
    fleet.wait_workers(2)
    after = [submit(fleet.url, job(steps=20)) for _ in range(4)]
    requests.delete(f"{fleet.url}/api/v1/tasks/{blocker['task_id']}", timeout=10)
    assert wait_status(fleet.url, blocker["task_id"])["status"] == "cancelled"
    docs = all_done(fleet, [*before, *after])
    assert all(d["status"] == "succeeded" for d in docs)
    assert any(d["gpu"] == "gpu.test.new" for d in docs[3:])


def test_gpu_never_waits_for_the_service_between_jobs(fleet_factory):
    fleet = fleet_factory()
    (sim,), _ = fleet.start_gpus(1, "--step-seconds", "0.02")
    docs = all_done(fleet, [submit(fleet.url, job(steps=10)) for _ in range(6)])
    assert all(d["status"] == "succeeded" for d in docs)
    rec = sim.record()
    busy = sorted(rec["busy"], key=lambda b: b["start"])
    # Each next prompt was already inside ComfyUI before the previous one ended...
    for previous, following in zip(busy, busy[1:]):
        assert rec["queued_at"][following["prompt_id"]] < previous["end"]
    # ...so the GPU went straight on to it.
    gaps = [following["start"] - previous["end"] for previous, following in zip(busy, busy[1:])]
    assert statistics.median(gaps) < 0.01, gaps


def test_warm_shutdown_drains_the_worker_and_moves_what_waits(fleet_factory):
    fleet = fleet_factory()
    sims, workers = fleet.start_gpus(2, "--step-seconds", "0.03")
    tasks = [submit(fleet.url, job(steps=30)) for _ in range(10)]
    r = redis.Redis.from_url(fleet.redis.url)
    # Both of its slots taken (one prompt running, the next inside ComfyUI's queue; "running" alone is 2
    # only in the instant between one prompt's start and the previous one's end being recorded).
    def taken() -> set[str]:
        return {m.decode() for m in [*r.smembers("cs:running:gpu.test.1"), *r.zrange("cs:handed:gpu.test.1", 0, -1)]}
    wait_until(lambda: len(taken()) == 2 and r.zcard("cs:queued:gpu.test.1") >= 1, 15,
               what="gpu.test.1 busy with jobs waiting behind")
    running_there = taken()
    workers[1].proc.send_signal(signal.SIGTERM)  # warm shutdown, as `celery control shutdown` or a deploy does
    docs = all_done(fleet, tasks, timeout=90)
    workers[1].proc.wait(30)
    assert all(d["status"] == "succeeded" for d in docs), [d["status"] for d in docs]
    by_id = {d["task_id"]: d for d in docs}
    assert all(by_id[t]["gpu"] == "gpu.test.1" for t in running_there)  # finished where they ran
    assert sum(d["gpu"] == "gpu.test.0" for d in docs) >= 10 - len(running_there) - 2
    assert_one_result_set(fleet, docs)
    assert "gpu.test.1" not in {w["queue"] for w in requests.get(fleet.url + "/api/v1/workers", timeout=5).json()[
        "workers"]}


def test_a_waiting_job_whose_celery_message_was_lost_is_sent_again(fleet_factory):
    """A Redis failover can keep a job's record and lose its message: the job would wait for ever."""
    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.05")
    busy = [submit(fleet.url, job(steps=60)) for _ in range(2)]  # one runs, one waits inside ComfyUI
    waiting = submit(fleet.url, job(steps=2))
    client = redis.Redis.from_url(fleet.redis.url)
    wait_until(lambda: client.llen("gpu.test.0") == 1, 10, what="the third job's message in Celery's queue")
    assert client.lrem("gpu.test.0", 1, client.lindex("gpu.test.0", 0)) == 1  # the message is lost
    done = wait_status(fleet.url, waiting["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert [a["code"] for a in record(fleet, waiting["task_id"])["attempt_log"]] == ["message_lost"]
    assert all(wait_status(fleet.url, t["task_id"], timeout=30)["status"] == "succeeded" for t in busy)


def _hold_unacked(client, raw: bytes, queue: str, *, task_id: str | None = None, age: float = 60.0) -> str:
    """Leave `raw` (a queue's Celery message) in kombu's unacked hash as a worker that took it
    `age` seconds ago and never acknowledged it leaves it (killed before the hand-over, or its
    ack refused by a Redis in the middle of an outage); `task_id`: the message is that job's."""
    message = json.loads(raw)
    if task_id:
        message["headers"]["id"] = task_id
    tag = f"held-{message['headers']['id']}"
    message["properties"]["delivery_tag"] = tag
    client.hset(keys.CELERY_UNACKED, tag, json.dumps([message, "", queue]))
    client.zadd(keys.CELERY_UNACKED_INDEX, {tag: time.time() - age})
    return tag


def test_a_lost_message_is_sent_again_even_beside_a_finished_jobs_unacknowledged_one(fleet_factory):
    """A finished job's ack that a Redis outage refused stays in kombu's unacked hash for the
    visibility timeout (hours): it must not stand in for another job's lost message, and it is
    dropped."""
    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.05")
    first = submit(fleet.url, job(steps=2))
    assert wait_status(fleet.url, first["task_id"], timeout=30)["status"] == "succeeded"
    busy = [submit(fleet.url, job(steps=60)) for _ in range(2)]  # one runs, one waits inside ComfyUI
    waiting = submit(fleet.url, job(steps=2))
    client = redis.Redis.from_url(fleet.redis.url)
    wait_until(lambda: client.llen("gpu.test.0") == 1, 10, what="the third job's message in Celery's queue")
    raw = client.lindex("gpu.test.0", 0)
    refused = _hold_unacked(client, raw, "gpu.test.0", task_id=first["task_id"])  # the finished job's refused ack
    assert client.lrem("gpu.test.0", 1, raw) == 1  # and the waiting job's message is lost
    done = wait_status(fleet.url, waiting["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert [a["code"] for a in record(fleet, waiting["task_id"])["attempt_log"]] == ["message_lost"]
    assert not client.hexists(keys.CELERY_UNACKED, refused) and client.zscore(keys.CELERY_UNACKED_INDEX, refused) is None
    assert all(wait_status(fleet.url, t["task_id"], timeout=30)["status"] == "succeeded" for t in busy)


def test_a_waiting_job_whose_message_is_stranded_unacknowledged_is_sent_again(fleet_factory):
    """A worker killed between taking a message and handing its job over (a window of a few
    milliseconds no test can hit on cue, so its footprint is written here) leaves the message in
    kombu's unacked hash, restored only after the visibility timeout: the job, still waiting,
    is sent again instead, once, and the stranded message is dropped."""
    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.05")
    busy = [submit(fleet.url, job(steps=60)) for _ in range(2)]
    waiting = submit(fleet.url, job(steps=2))
    client = redis.Redis.from_url(fleet.redis.url)
    wait_until(lambda: client.llen("gpu.test.0") == 1, 10, what="the third job's message in Celery's queue")
    raw = client.lindex("gpu.test.0", 0)
    stranded = _hold_unacked(client, raw, "gpu.test.0")  # what the killed worker held
    assert client.lrem("gpu.test.0", 1, raw) == 1
    done = wait_status(fleet.url, waiting["task_id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert [a["code"] for a in record(fleet, waiting["task_id"])["attempt_log"]] == ["message_lost"]
    assert not client.hexists(keys.CELERY_UNACKED, stranded)
    assert all(wait_status(fleet.url, t["task_id"], timeout=30)["status"] == "succeeded" for t in busy)


def test_a_worker_whose_comfyui_hangs_keeps_beating_and_says_so(fleet_factory):
    """Each ComfyUI call may wait COMFYUI_TIMEOUT, here twice HEARTBEAT_TTL: the heartbeat never
    waits for one. A worker whose ComfyUI froze stays alive in the fleet's eyes at every moment
    and reports its ComfyUI down; once ComfyUI answers again, up."""
    from common.registry import Registry

    interval, ttl, comfy_timeout = 0.5, 3.0, 6.0
    fleet = fleet_factory(HEARTBEAT_INTERVAL=str(interval), HEARTBEAT_TTL=str(ttl), COMFYUI_TIMEOUT=str(comfy_timeout))
    sim = fleet.add_sim()
    fleet.add_worker(sim)
    fleet.wait_workers()
    registry = Registry(fleet.redis.client(), ttl)

    def beat() -> dict | None:
        return next((w for w in registry.alive() if w["queue"] == "gpu.test.0"), None)
    wait_until(lambda: (beat() or {}).get("comfyui_ok"), 30, what="a heartbeat with ComfyUI answering")
    # Frozen, not gone: the kernel still accepts connections, nothing answers them (a refused
    # connection fails at once and would prove nothing).
    sim.proc.send_signal(signal.SIGSTOP)
    try:
        # As many beats as two ComfyUI timeouts last: a beat that waited on one such call would
        # have left the worker dead (older than its TTL) at some point meanwhile.
        needed = int(2 * comfy_timeout / interval)
        times, lapses, down = set(), [], False
        deadline = time.monotonic() + 10 * comfy_timeout
        while (len(times) < needed or not down) and time.monotonic() < deadline:
            current = beat()
            if current is None:
                lapses.append(time.time() - max(times))  # seconds since its last beat
                break
            else:
                times.add(current["ts"])
                down = down or not current["comfyui_ok"]
            time.sleep(0.05)
        assert not lapses, f"the worker was dead to the fleet: no beat for {lapses[0]:.1f} s (TTL {ttl} s)"
        assert len(times) >= needed and down, (len(times), down)
    finally:
        sim.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: (beat() or {}).get("comfyui_ok"), 30, what="ComfyUI answering again")
