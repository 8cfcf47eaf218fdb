"""Dispatch scoring and failover rules: pure functions, table tests."""

import pytest

from common.dispatch import JobSpec, choose, expected_finish, fleet_rate
from workers.monitor import needs_moving


def gpu(queue, load=0.0, rate=None, comfyui_ok=True, draining=False, host="a", checkpoint=None,
        free=0.5, util=0.0, workflow="storydiffusion"):
    return {"queue": queue, "host": host, "load": load, "comfyui_ok": comfyui_ok, "draining": draining,
            "checkpoint": checkpoint,
            "rates": {workflow: {"seconds_per_unit": rate, "jobs": 5}} if rate else {},
            "gpu": {"memory_total_mb": 1000.0, "memory_free_mb": 1000.0 * free, "utilization": util}}


JOB = JobSpec(workflow="storydiffusion", cost=10.0)

CASES = [
    ("idle beats busy", [gpu("g.a", load=20), gpu("g.b", load=0)], JOB, "g.b"),
    ("faster GPU wins at equal backlog", [gpu("g.slow", rate=2.0), gpu("g.fast", rate=0.5)], JOB, "g.fast"),
    ("a fast GPU with a short backlog beats an idle slow one",
     [gpu("g.slow", rate=4.0), gpu("g.fast", load=10, rate=1.0)], JOB, "g.fast"),
    ("but not with a long one", [gpu("g.slow", rate=1.5), gpu("g.fast", load=40, rate=1.0)], JOB, "g.slow"),
    ("unmeasured GPUs count at the fleet median", [gpu("g.new", load=5), gpu("g.known", load=10, rate=3.0)],
     JOB, "g.new"),
    ("ComfyUI down is never chosen", [gpu("g.down", comfyui_ok=False), gpu("g.up", load=100)], JOB, "g.up"),
    ("draining is never chosen", [gpu("g.drain", draining=True), gpu("g.up", load=100)], JOB, "g.up"),
    ("excluded after a failure", [gpu("g.a"), gpu("g.b", load=50)],
     JobSpec(workflow="storydiffusion", cost=1.0, exclude=frozenset({"g.a"})), "g.b"),
    ("pinned GPU even when busier", [gpu("g.a", load=50), gpu("g.b")],
     JobSpec(workflow="storydiffusion", gpu="g.a"), "g.a"),
    ("pinned host", [gpu("g.a", host="h1"), gpu("g.b", host="h2", load=9)],
     JobSpec(workflow="storydiffusion", host="h2"), "g.b"),
    ("warm checkpoint breaks a near tie", [gpu("g.cold", checkpoint="other.safetensors"),
                                           gpu("g.warm", load=1, checkpoint="m.safetensors")],
     JobSpec(workflow="storydiffusion", cost=1.0, checkpoint="m.safetensors"), "g.warm"),
    ("memory headroom breaks an exact tie", [gpu("g.full", free=0.1), gpu("g.roomy", free=0.9)], JOB, "g.roomy"),
    ("utilisation breaks what is left", [gpu("g.hot", util=90.0), gpu("g.cool", util=5.0)], JOB, "g.cool"),
    ("no healthy GPU", [gpu("g.down", comfyui_ok=False)], JOB, None),
    ("pin to a GPU that is not there", [gpu("g.a")], JobSpec(workflow="storydiffusion", gpu="g.zzz"), None),
    ("empty fleet", [], JOB, None),
]


@pytest.mark.parametrize("case, workers, job, expected", CASES, ids=[c[0] for c in CASES])
def test_dispatch_chooses(case, workers, job, expected):
    assert choose(workers, job) == expected


def test_expected_finish_is_backlog_plus_job_times_rate():
    worker = gpu("g", load=30.0, rate=0.2)
    assert expected_finish(worker, JOB, default_rate=99.0) == pytest.approx((30.0 + 10.0) * 0.2)
    assert fleet_rate([gpu("a", rate=1.0), gpu("b", rate=3.0), gpu("c")], "storydiffusion") == 2.0


def test_waiting_jobs_leave_dead_or_draining_queues():
    assert needs_moving(None) and needs_moving({"draining": True}) and not needs_moving({"draining": False})


# ---- A GPU's fixed time per prompt, and the baseline policies --------------------------------------

def test_a_gpu_with_a_long_fixed_time_per_prompt_looks_slower_for_short_jobs():
    # Same per-unit speed; g.b spends 2 s per prompt on top (decode, saving): for a queue of small
    # jobs that dominates, and the rate alone could not see it.
    a = {**gpu("g.a", load=2.0), "jobs": 4, "rates": {"w": {"seconds_per_unit": 1.0, "seconds_per_prompt": 0.1}}}
    b = {**gpu("g.b", load=1.0), "jobs": 2, "rates": {"w": {"seconds_per_unit": 1.0, "seconds_per_prompt": 2.0}}}
    small = JobSpec(workflow="w", cost=0.5)
    assert expected_finish(a, small, 1.0) == pytest.approx(2.5 + 5 * 0.1)
    assert expected_finish(b, small, 1.0) == pytest.approx(1.5 + 3 * 2.0)
    assert choose([a, b], small) == "g.a"


def test_the_speed_model_learns_the_fixed_part_and_the_rate():
    from workers.runtime import SpeedModel

    model = SpeedModel()
    model.add(2.0, 0.5 + 2.0 * 0.25)
    assert model.estimate() == {"seconds_per_unit": pytest.approx(0.5), "seconds_per_prompt": 0.0}  # one cost seen
    for cost in (1.0, 4.0, 8.0, 2.0, 6.0):
        model.add(cost, 0.5 + cost * 0.25)
    assert model.estimate() == {"seconds_per_unit": pytest.approx(0.25), "seconds_per_prompt": pytest.approx(0.5)}
    for cost in (1.0, 4.0, 8.0, 2.0, 6.0, 3.0, 7.0, 1.0, 5.0, 2.0, 8.0, 4.0):  # the GPU got twice as slow
        model.add(cost, 2 * (0.5 + cost * 0.25))
    estimate = model.estimate()
    assert estimate["seconds_per_unit"] == pytest.approx(0.5, rel=0.05)
    assert estimate["seconds_per_prompt"] == pytest.approx(1.0, rel=0.1)


def test_round_robin_and_load_baselines():
    import random

    fleet = [gpu("g.b", util=90), gpu("g.a", util=10), gpu("g.c", comfyui_ok=False)]
    assert [choose(fleet, JOB, policy="round_robin", turn=t) for t in range(4)] == ["g.a", "g.b", "g.a", "g.b"]
    assert choose(fleet, JOB, policy="gpu_cpu_load", rng=random.Random(1)) == "g.a"
    tied = [gpu("g.x"), gpu("g.y")]
    picks = {choose(tied, JOB, policy="gpu_cpu_load", rng=random.Random(seed)) for seed in range(20)}
    assert picks == {"g.x", "g.y"}  # ties at random: such a policy has no other order
