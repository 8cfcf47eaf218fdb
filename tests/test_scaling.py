"""The scaling decision (common/scaling.py): the rule on single states, then on a small fleet
simulated over time (bursts, trickles, idle, cold starts, flapping)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from common.scaling import DOWN, HOLD, UP, FleetState, Gpu, Policy, decide, retire_order

T, C = 60.0, 120.0  # target wait, cold start
POLICY = Policy(target_wait=T, min_gpus=0, max_gpus=8, scale_down_delay=300.0)


def busy(queue: str, seconds: float, **kw) -> Gpu:
    return Gpu(queue=queue, work_seconds=seconds, busy=True, **kw)


def idle(queue: str, for_seconds: float, **kw) -> Gpu:
    return Gpu(queue=queue, idle_seconds=for_seconds, **kw)


# ---- The rule, one state at a time --------------------------------------------------------------

def test_no_work_no_gpu_stays_at_zero():
    decision = decide(FleetState(cold_start=C), POLICY)
    assert (decision.current, decision.desired, decision.action, decision.retire) == (0, 0, HOLD, ())


def test_a_burst_on_an_empty_fleet_asks_for_what_clears_it_within_the_target_wait():
    decision = decide(FleetState(stranded_seconds=300.0, cold_start=C), POLICY)
    assert (decision.desired, decision.action) == (5, UP)  # 300 s of work / 60 s per new GPU
    assert "300 s of GPU work" in decision.reason
    one_job = decide(FleetState(stranded_seconds=5.0, cold_start=C), POLICY)
    assert one_job.desired == 1  # any work needs a GPU, however small


def test_a_burst_one_warm_gpu_clears_within_target_wait_plus_cold_start_adds_no_gpu():
    # A new GPU would be ready after C; the warm one is done with 170 s of work by T + C = 180 s.
    assert decide(FleetState(gpus=(busy("gpu.a.0", 170.0),), cold_start=C), POLICY).desired == 1
    grown = decide(FleetState(gpus=(busy("gpu.a.0", 190.0),), cold_start=C), POLICY)
    assert (grown.desired, grown.action) == (2, UP)
    # The longer a cold start, the more a warm GPU is worth: the same burst adds nothing then.
    assert decide(FleetState(gpus=(busy("gpu.a.0", 350.0),), cold_start=300.0), POLICY).desired == 1
    assert decide(FleetState(gpus=(busy("gpu.a.0", 350.0),), cold_start=0.0), POLICY).desired == 6


def test_starting_gpus_count_so_the_answer_does_not_grow_while_they_come_up():
    work = 600.0
    before = decide(FleetState(gpus=(busy("gpu.a.0", work),), cold_start=C), POLICY)
    assert before.desired == 1 + 7  # (600 - 180) / 60
    starting = tuple(Gpu(queue=f"gpu.a.{i}", ready=False) for i in range(1, 8))
    during = decide(FleetState(gpus=(busy("gpu.a.0", work), *starting), cold_start=C), POLICY)
    assert (during.desired, during.action) == (8, HOLD)
    spread = tuple(busy(f"gpu.a.{i}", work / 8) for i in range(8))
    after = decide(FleetState(gpus=spread, cold_start=C), POLICY)
    assert (after.desired, after.action) == (8, HOLD)  # busy GPUs never go


def test_idle_gpus_go_only_after_the_delay_and_then_to_zero():
    fleet = tuple(idle(f"gpu.a.{i}", 299.0) for i in range(3))
    assert decide(FleetState(gpus=fleet, cold_start=C), POLICY).desired == 3
    fleet = tuple(idle(f"gpu.a.{i}", 301.0) for i in range(3))
    decision = decide(FleetState(gpus=fleet, cold_start=C), POLICY)
    assert (decision.desired, decision.action) == (0, DOWN)
    assert decision.retire == ("gpu.a.2", "gpu.a.1", "gpu.a.0") and decision.retire_first == "gpu.a.2"


def test_scaling_down_keeps_what_the_work_needs():
    fleet = (busy("gpu.a.0", 250.0), busy("gpu.a.1", 250.0), idle("gpu.a.2", 900.0), idle("gpu.a.3", 900.0))
    decision = decide(FleetState(gpus=fleet, cold_start=C), POLICY)
    assert (decision.desired, decision.retire) == (3, ("gpu.a.3",))  # 500 s needs ceil(500 / 180) = 3


def test_bounds():
    at_least_one = Policy(target_wait=T, min_gpus=1, max_gpus=3, scale_down_delay=300.0)
    decision = decide(FleetState(gpus=(idle("gpu.a.0", 9999.0), idle("gpu.a.1", 9999.0)), cold_start=C), at_least_one)
    assert (decision.desired, decision.retire) == (1, ("gpu.a.1",)) and "SCALE_MIN_GPUS" in decision.reason
    assert decide(FleetState(cold_start=C), at_least_one).desired == 1  # an empty fleet starts one
    capped = decide(FleetState(stranded_seconds=10_000.0, cold_start=C), at_least_one)
    assert (capped.desired, capped.action) == (3, UP) and "SCALE_MAX_GPUS" in capped.reason
    # A fleet above the maximum sheds its least loaded GPUs, busy or not.
    over = tuple(busy(f"gpu.a.{i}", 10.0 * (i + 1)) for i in range(5))
    assert decide(FleetState(gpus=over, cold_start=C), at_least_one).retire == ("gpu.a.0", "gpu.a.1")
    for bad in ({"target_wait": 0}, {"target_wait": T, "min_gpus": 3, "max_gpus": 2},
                {"target_wait": T, "scale_down_delay": -1}):
        with pytest.raises(ValueError):
            Policy(**bad)


def test_draining_gpus_are_neither_capacity_nor_candidates():
    fleet = (busy("gpu.a.0", 170.0, draining=True), idle("gpu.a.1", 9999.0, draining=True))
    decision = decide(FleetState(gpus=fleet, cold_start=C), POLICY)
    assert (decision.current, decision.desired, decision.retire) == (0, 3, ())  # 170 s on no GPU that stays


def test_retire_order_idle_then_least_work_then_shared_model_then_slowest_then_highest_name():
    gpus = [
        busy("gpu.a.0", 5.0),
        idle("gpu.a.1", 400.0, checkpoint="sdxl", seconds_per_unit=0.5),  # holds the only sdxl
        idle("gpu.a.2", 400.0, checkpoint="juggernaut", seconds_per_unit=0.5),
        idle("gpu.a.3", 400.0, checkpoint="juggernaut", seconds_per_unit=0.9),  # slower
        idle("gpu.a.4", 100.0),  # not idle long enough
        idle("gpu.a.9", 400.0, checkpoint="juggernaut", seconds_per_unit=0.5),
        idle("gpu.a.10", 400.0, checkpoint="juggernaut", seconds_per_unit=0.5),
    ]
    order = [g.queue for g in retire_order(gpus, 300.0)]
    assert order == ["gpu.a.3", "gpu.a.10", "gpu.a.9", "gpu.a.2", "gpu.a.1", "gpu.a.4", "gpu.a.0"]


# ---- A fleet over time --------------------------------------------------------------------------

@dataclass
class SimGpu:
    name: str
    ready_at: float
    jobs: list = field(default_factory=list)  # [submitted at, seconds left, started at]
    idle_since: float = 0.0


@dataclass
class Sim:
    """GPUs that take `cold` seconds to start, a dispatcher that sends each job to the GPU that
    finishes it first (ties: the lowest name, like common/dispatch.py), and the decision applied
    every `dt` seconds: new GPUs start cold, retired ones leave at once (they are idle)."""
    policy: Policy
    cold: float = C
    dt: float = 5.0
    t: float = 0.0
    gpus: dict = field(default_factory=dict)
    stranded: list = field(default_factory=list)
    waits: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    added: int = 0

    def start_gpu(self, warm: bool = False) -> None:
        name = f"gpu.sim.{self.added}"
        self.added += 1
        self.gpus[name] = SimGpu(name, self.t if warm else self.t + self.cold, idle_since=self.t)

    def _finish_time(self, gpu: SimGpu) -> float:
        return max(gpu.ready_at - self.t, 0.0) + sum(job[1] for job in gpu.jobs)

    def submit(self, seconds: float, at: float | None = None) -> None:
        job = [self.t if at is None else at, seconds, None]
        if not self.gpus:
            self.stranded.append(job)
            return
        best = min(self.gpus.values(), key=lambda g: (self._finish_time(g), int(g.name.rsplit(".", 1)[1])))
        best.jobs.append(job)

    def state(self) -> FleetState:
        gpus = tuple(Gpu(queue=g.name, work_seconds=sum(j[1] for j in g.jobs), busy=bool(g.jobs),
                         idle_seconds=0.0 if g.jobs else self.t - g.idle_since, ready=self.t >= g.ready_at)
                     for g in self.gpus.values())
        return FleetState(gpus=gpus, cold_start=self.cold, stranded_seconds=sum(j[1] for j in self.stranded))

    def step(self) -> None:
        if not self.sizes:
            self.sizes.append(len(self.gpus))
        decision = decide(self.state(), self.policy)
        for _ in range(decision.desired - decision.current):
            self.start_gpu()
        for name in decision.retire:
            assert not self.gpus[name].jobs, "only idle GPUs are retired here"
            del self.gpus[name]
        self.sizes.append(len(self.gpus))
        stranded, self.stranded = self.stranded, []
        for job in stranded:
            self.submit(job[1], at=job[0])
        for gpu in self.gpus.values():
            budget = self.dt if self.t >= gpu.ready_at else 0.0
            while budget > 0 and gpu.jobs:
                job = gpu.jobs[0]
                if job[2] is None:
                    job[2] = self.t + (self.dt - budget)
                    self.waits.append(job[2] - job[0])
                used = min(budget, job[1])
                job[1] -= used
                budget -= used
                if job[1] <= 1e-9:
                    gpu.jobs.pop(0)
                    if not gpu.jobs:
                        gpu.idle_since = self.t + (self.dt - budget)
        self.t += self.dt

    def run(self, seconds: float, arrivals=None) -> None:
        end = self.t + seconds
        while self.t < end:
            if arrivals:
                for size in arrivals(self.t):
                    self.submit(size)
            self.step()

    def changes(self) -> int:
        return sum(1 for a, b in zip(self.sizes, self.sizes[1:]) if a != b)

    def moves(self) -> list[tuple[float, int]]:
        """(time, +1 or -1) of each change in the fleet's size."""
        return [(i * self.dt, 1 if b > a else -1) for i, (a, b) in enumerate(zip(self.sizes, self.sizes[1:])) if a != b]


def test_a_burst_from_zero_is_served_within_target_wait_plus_cold_start_then_the_fleet_goes_back_to_zero():
    sim = Sim(POLICY)
    for _ in range(20):
        sim.submit(15.0)  # 300 s of work on no GPU
    sim.run(300.0)
    assert max(sim.sizes) == 5 and len(sim.waits) == 20
    assert max(sim.waits) <= T + C + sim.dt
    sim.run(POLICY.scale_down_delay + 2 * sim.dt)
    assert sim.sizes[-1] == 0 and not sim.stranded
    assert sim.changes() == 2  # up once, down once


def test_a_trickle_keeps_one_gpu_and_retires_the_rest():
    sim = Sim(POLICY)
    for _ in range(3):
        sim.start_gpu(warm=True)
    sim.run(3600.0, arrivals=lambda t: [10.0] if t % 60 == 0 else [])
    assert sim.sizes[-1] == 1 and sim.changes() == 1  # 3 → 1 once, after the delay
    assert max(sim.waits) <= T


def test_a_steady_load_near_a_threshold_does_not_flap():
    rng = random.Random(17)
    sim = Sim(POLICY)
    for _ in range(2):
        sim.start_gpu(warm=True)
    for _ in range(18):
        sim.submit(20.0)  # 360 s: exactly what 2 warm GPUs clear within T + C
    # On average what 2 GPUs do (one 20 s job per 10 s), in random bursts around it, for 4 hours.
    sim.run(4 * 3600.0, arrivals=lambda t: [20.0] * rng.choice((0, 0, 1, 1, 2, 2)) if t % 10 == 0 else [])
    moves = sim.moves()
    directions = [d for _, d in moves]
    assert directions == sorted(directions, reverse=True), moves  # grows, then shrinks: never back and forth
    assert len(moves) <= 4 and min(sim.sizes) == 2, moves
    ups, downs = [t for t, d in moves if d > 0], [t for t, d in moves if d < 0]
    assert not downs or downs[0] - ups[-1] >= POLICY.scale_down_delay
    sim.run(POLICY.scale_down_delay + 300.0)  # the load stops: then it goes to zero
    assert sim.sizes[-1] == 0
