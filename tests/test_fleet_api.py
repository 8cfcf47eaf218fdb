"""The scaling decision where engines act on it: its inputs read from a real Redis
(common/fleet.py), then GET /api/v1/fleet and the comfy_fleet_* gauges of a real fleet moving
with a backlog and going back down."""
from __future__ import annotations

import time

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from common import keys
from common.fleet import assess, document
from common.registry import Registry
from common.settings import Settings
from tests.support.api import submit, wait_status
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(120)


def beat(queue: str, **fields) -> dict:
    return {"queue": queue, "host": "h", "gpu_index": 0, "comfyui_url": "http://127.0.0.1:1", "comfyui_ok": True,
            "running": [], "draining": False, **fields}


def settings(redis_url: str, **env) -> Settings:
    return Settings(REDIS_URL=redis_url, LOG_DIR="", SCALE_TARGET_WAIT="60", SCALE_COLD_START="120",
                    SCALE_DOWN_DELAY="300", SCALE_MAX_GPUS="8", **env)


def test_inputs_from_redis_price_work_by_each_gpus_speed_and_count_work_stranded_on_a_down_gpu(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    registry = Registry(client, ttl=30)
    cfg = settings(redis_server.url)
    # Two live GPUs: one measured at 2 s per unit holding 150 units, one without history.
    registry.publish(beat("gpu.h.0", rates={"sdxl": {"seconds_per_unit": 2.0, "jobs": 3}}, checkpoint="sdxl"))
    registry.publish(beat("gpu.h.1"))
    client.hset(keys.QUEUE_COUNTS, "gpu.h.0", keys.counters_text(1, 0, 0, 150_000))  # load: thousandths of a unit
    client.zadd(keys.waiting("gpu.h.0"), {"t1": 1})
    # A GPU that is down (known, no heartbeat) with 30 units waiting on its queue.
    client.zadd(keys.WORKERS, {"gpu.h.9": time.time() - 3600})
    client.hset(keys.QUEUE_COUNTS, "gpu.h.9", keys.counters_text(0, 0, 0, 30_000))

    result = assess(client, registry, cfg, now=1000.0)
    gpus = {g.queue: g for g in result.state.gpus}
    assert gpus["gpu.h.0"].work_seconds == 300.0 and gpus["gpu.h.0"].busy
    assert not gpus["gpu.h.1"].busy and gpus["gpu.h.1"].idle_seconds == 0.0
    assert result.seconds_per_unit == 2.0  # the fleet's median, for GPUs and queues without history
    assert result.state.stranded_seconds == 60.0 and result.state.work_seconds == 360.0
    assert result.state.cold_start == 120.0  # no GPU measured one: SCALE_COLD_START
    # 360 s is exactly what 2 warm GPUs clear within 60 + 120 s: nothing to add.
    assert (result.decision.current, result.decision.desired) == (2, 2)

    later = assess(client, registry, cfg, now=1400.0)  # the idle GPU has been idle since t=1000
    assert {g.queue: g.idle_seconds for g in later.state.gpus}["gpu.h.1"] == 400.0
    assert later.decision.desired == 2  # 360 s of work needs ceil(360 / 180) = 2: nothing goes

    client.delete(keys.QUEUE_COUNTS, keys.waiting("gpu.h.0"))
    idle = assess(client, registry, cfg, now=1500.0)
    assert (idle.decision.desired, idle.decision.retire) == (1, ("gpu.h.1",))  # gpu.h.0 idle only since now
    doc = document(idle)
    assert doc["retire_first"] == "gpu.h.1" and doc["action"] == "down"
    assert {g["queue"]: g["state"] for g in doc["gpus"]} == {"gpu.h.0": "idle", "gpu.h.1": "idle"}


def test_a_measured_cold_start_is_used_and_outlives_the_fleet_and_stranded_work_starts_one(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    registry = Registry(client, ttl=30)
    cfg = settings(redis_server.url)
    registry.publish(beat("gpu.h.0", cold_start_seconds=40.0, rates={"sdxl": {"seconds_per_unit": 0.5, "jobs": 1}}))
    registry.publish(beat("gpu.h.1", cold_start_seconds=60.0, comfyui_ok=False))  # still starting
    first = assess(client, registry, cfg, now=10.0)
    assert first.state.cold_start == 50.0  # the median of what the heartbeats report
    assert [g.ready for g in first.state.gpus] == [True, False]
    assert document(first)["gpus"][1]["state"] == "starting"

    for queue in ("gpu.h.0", "gpu.h.1"):  # the fleet scales to zero: no heartbeat left
        registry.withdraw(queue)
    client.zadd(keys.WORKERS, {"gpu.h.0": 0, "gpu.h.1": 0})
    client.hset(keys.QUEUE_COUNTS, "gpu.h.0", keys.counters_text(0, 0, 0, 300_000))  # 400 units wait on GPUs that are gone
    # WAIT_FOR_GPUS queues a job on a GPU the fleet had, even one that left cleanly (forgotten in
    # the registry's sorted set, still in its labels).
    client.hset(keys.KNOWN_WORKERS, "gpu.h.7", "{}")
    client.hset(keys.QUEUE_COUNTS, "gpu.h.7", keys.counters_text(0, 0, 0, 100_000))
    empty = assess(client, registry, Settings(REDIS_URL=redis_server.url, LOG_DIR="", SCALE_TARGET_WAIT="60"),
                   workers=[], now=20.0)
    assert empty.state.cold_start == 50.0 and empty.seconds_per_unit == 0.5  # remembered
    assert empty.state.stranded_seconds == 200.0
    assert (empty.decision.current, empty.decision.desired, empty.decision.action) == (0, 4, "up")
    assert client.hgetall(keys.FLEET_IDLE_SINCE) == {}  # GPUs that left hold no idle time


def gauges(base: str) -> dict[str, float]:
    text = requests.get(base + "/metrics", timeout=5).text
    return {family.name: family.samples[0].value for family in text_string_to_metric_families(text)
            if family.name.startswith("comfy_fleet_")}


def fleet_doc(base: str) -> dict:
    response = requests.get(base + "/api/v1/fleet", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_route_and_the_gauge_rise_with_a_backlog_and_go_back_down(fleet_factory):
    import jsonschema

    fleet = fleet_factory(SCALE_TARGET_WAIT="2", SCALE_COLD_START="1", SCALE_DOWN_DELAY="1", SCALE_MIN_GPUS="0",
                          SCALE_MAX_GPUS="4")
    fleet.start_gpus(1, "--step-seconds", "0.1", "--load-seconds", "0.2")
    schema = requests.get(fleet.url + "/openapi.json", timeout=5).json()["components"]["schemas"]
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Fleet", "components": {"schemas": schema}})

    # Idle for SCALE_DOWN_DELAY: the one GPU may go (minimum 0).
    wait_until(lambda: fleet_doc(fleet.url)["desired"] == 0, 10, what="an idle fleet to want 0 GPUs")
    idle = fleet_doc(fleet.url)
    validator.validate(idle)
    assert (idle["current"], idle["action"], idle["retire_first"]) == (1, "down", "gpu.test.0")
    assert gauges(fleet.url)["comfy_fleet_desired_gpus"] == 0

    # A backlog: 6 jobs of 10 units (10 steps at 1024²) on one GPU that has no measured speed yet.
    tasks = [submit(fleet.url, {"workflow": "sdxl", "prompt": f"a lighthouse {i}", "width": 1024, "height": 1024,
                                "steps": 10}) for i in range(6)]
    busy = fleet_doc(fleet.url)
    validator.validate(busy)
    assert busy["desired"] == 4 and busy["action"] == "up" and "SCALE_MAX_GPUS" in busy["reason"], busy
    assert busy["work_seconds"] >= 40 and busy["retire"] == [] and busy["gpus"][0]["state"] == "busy"
    metrics = gauges(fleet.url)
    assert (metrics["comfy_fleet_desired_gpus"], metrics["comfy_fleet_current_gpus"]) == (4, 1)
    assert metrics["comfy_fleet_work_seconds"] >= 40

    for task in tasks:
        assert wait_status(fleet.url, task["task_id"], timeout=60)["status"] == "succeeded"
    wait_until(lambda: gauges(fleet.url)["comfy_fleet_desired_gpus"] == 0, 15, what="the gauge back at 0")
    after = fleet_doc(fleet.url)
    assert (after["desired"], after["work_seconds"], after["retire_first"]) == (0, 0, "gpu.test.0")
    assert after["gpus"][0]["seconds_per_unit"] > 0  # measured from the backlog's jobs


def test_a_gpu_still_starting_is_not_idle_so_a_slow_cold_start_is_not_retired_before_it_can_work(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    registry = Registry(client, ttl=30)
    cfg = settings(redis_server.url)  # SCALE_DOWN_DELAY 300
    registry.publish(beat("gpu.h.0", comfyui_ok=False))  # its ComfyUI does not answer yet
    now = time.time()
    assess(client, registry, cfg, now=now)
    starting = assess(client, registry, cfg, now=now + 600)
    assert starting.state.gpus[0].idle_seconds == 0 and starting.decision.retire == ()
    registry.publish(beat("gpu.h.0", comfyui_ok=True))
    assess(client, registry, cfg, now=now + 601)  # ready: its idle clock starts now
    assert assess(client, registry, cfg, now=now + 604).state.gpus[0].idle_seconds == pytest.approx(3.0)
    assert assess(client, registry, cfg, now=now + 902).decision.retire == ("gpu.h.0",)
