"""How many GPUs the fleet should have: a pure decision over typed inputs (no Redis, no clock).

`common/fleet.py` reads the inputs from Redis; the API exports the answer (`GET /api/v1/fleet`,
the `comfy_fleet_desired_gpus` gauge that KEDA scales the GPU StatefulSet on) and the local
autoscaler acts on it. The rule, with W the fleet's remaining work in predicted GPU seconds
(every job waiting or running, on a live GPU or stranded on the queue of one that is down), T
the target wait (SCALE_TARGET_WAIT) and C the measured cold start of a GPU (ComfyUI start plus
model load):

- Up. Within the horizon T + C a ready GPU clears T + C seconds of work, while a GPU that is
  still starting, or one added now, clears only T (it spends the rest starting). When W exceeds
  what the current GPUs clear within the horizon, add ceil(excess / T) GPUs. A burst that the
  warm GPUs clear within T + C adds none: a new GPU would come up after the work is done.
- Down. Only a GPU with no work, idle for SCALE_DOWN_DELAY, may go, and the fleet keeps
  ceil(W / (T + C)) GPUs, so that retiring never makes the up rule fire again at once. Under a
  steady load the dispatcher keeps every GPU busy, so none is idle long enough to go: the delay
  is the hysteresis that keeps a load near a threshold from flapping.
- Bounds: never below SCALE_MIN_GPUS (0 allowed: scale to zero), never above SCALE_MAX_GPUS.

Which GPU goes first: one idle past the delay, then the least remaining work, then one whose
warm checkpoint another kept GPU also holds (losing it costs no model load), then the slowest,
then the longest idle, then the highest name (a StatefulSet removes its highest ordinal).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# A GPU's heartbeat carries its measured cold start in this field: seconds from its worker's
# start until its ComfyUI answered, plus its first checkpoint load. Heartbeats without it
# leave the fleet's last measurement, else SCALE_COLD_START, in force.
COLD_START_FIELD = "cold_start_seconds"
UP, DOWN, HOLD = "up", "down", "hold"


@dataclass(frozen=True)
class Gpu:
    """One live GPU (its worker's heartbeat is alive) as the decision sees it."""
    queue: str
    work_seconds: float = 0.0  # predicted GPU seconds of the jobs waiting or running on it
    busy: bool = False  # a job waits or runs on it (whatever its predicted cost)
    idle_seconds: float = 0.0  # how long it has had no job (0 while busy)
    ready: bool = True  # its ComfyUI answers; False: still starting (cold)
    draining: bool = False  # leaving: finishes what runs, takes nothing new
    seconds_per_unit: float | None = None  # its measured speed; None: no history
    checkpoint: str | None = None  # the model it holds warm


@dataclass(frozen=True)
class Policy:
    target_wait: float  # seconds a job should wait at most (SCALE_TARGET_WAIT)
    min_gpus: int = 0
    max_gpus: int = 8
    scale_down_delay: float = 300.0  # a GPU must be idle this long before it may go

    def __post_init__(self):
        if self.target_wait <= 0:
            raise ValueError("target_wait must be positive")
        if not 0 <= self.min_gpus <= self.max_gpus:
            raise ValueError("need 0 <= min_gpus <= max_gpus")
        if self.scale_down_delay < 0:
            raise ValueError("scale_down_delay must not be negative")


@dataclass(frozen=True)
class FleetState:
    gpus: tuple[Gpu, ...] = ()
    cold_start: float = 120.0  # measured seconds from a GPU's start to its first job running
    stranded_seconds: float = 0.0  # work on the queues of GPUs that are down (no live worker)

    @property
    def work_seconds(self) -> float:
        return self.stranded_seconds + sum(g.work_seconds for g in self.gpus)


@dataclass(frozen=True)
class Decision:
    current: int  # live GPUs that are not draining (ready or starting)
    desired: int
    action: str  # up, down or hold
    reason: str
    retire: tuple[str, ...] = field(default_factory=tuple)  # GPUs to retire now, first first

    @property
    def retire_first(self) -> str | None:
        return self.retire[0] if self.retire else None


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def retire_order(gpus: list[Gpu], delay: float) -> list[Gpu]:
    """The live, non-draining GPUs, the one to retire first first (see the module's text)."""
    held: dict[str, int] = {}
    for gpu in gpus:
        if gpu.checkpoint:
            held[gpu.checkpoint] = held.get(gpu.checkpoint, 0) + 1

    def key(gpu: Gpu) -> tuple:
        retirable = not gpu.busy and gpu.idle_seconds >= delay
        unique_model = bool(gpu.checkpoint) and held[gpu.checkpoint] == 1
        slowness = gpu.seconds_per_unit if gpu.seconds_per_unit is not None else 0.0
        return (not retirable, round(gpu.work_seconds, 6), unique_model, -slowness, -gpu.idle_seconds)

    by_name = sorted(gpus, key=lambda g: _natural(g.queue), reverse=True)  # ties: highest name first
    return sorted(by_name, key=key)  # stable: keeps the name order among equals


def _gpus(count: int) -> str:
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


def decide(state: FleetState, policy: Policy) -> Decision:
    """The number of GPUs the fleet should have now, why, and which to retire first. O(GPUs)."""
    live = [g for g in state.gpus if not g.draining]
    ready = sum(1 for g in live if g.ready)
    starting = len(live) - ready
    current = len(live)
    work = max(state.work_seconds, 0.0)
    wait, cold = policy.target_wait, max(state.cold_start, 0.0)
    horizon = wait + cold
    clears = ready * horizon + starting * wait  # what the current GPUs clear within the horizon
    words = f"{work:.0f} s of GPU work"
    if work > clears + 1e-9:
        desired = current + math.ceil((work - clears) / wait - 1e-9)
        action_reason = (f"{words}; {ready} ready and {starting} starting GPUs clear {clears:.0f} s within the target "
                         f"wait plus a cold start ({wait:.0f} + {cold:.0f} s), and each GPU added clears {wait:.0f} s")
    else:
        retirable = [g for g in live if not g.busy and g.idle_seconds >= policy.scale_down_delay]
        keep = math.ceil(work / horizon - 1e-9)
        desired = max(current - len(retirable), keep)
        if desired < current:
            action_reason = (f"{_gpus(len(retirable))} idle for at least SCALE_DOWN_DELAY "
                             f"({policy.scale_down_delay:.0f} s); {words} needs {_gpus(keep)} within the target wait "
                             "plus a cold start")
        elif work > 0:
            action_reason = f"{words} fits {_gpus(current)} within the target wait plus a cold start ({horizon:.0f} s)"
        elif current:
            action_reason = f"no work; no GPU idle for SCALE_DOWN_DELAY ({policy.scale_down_delay:.0f} s) yet"
        else:
            action_reason = "no work and no GPU"
    bounded = min(max(desired, policy.min_gpus), policy.max_gpus)
    if bounded != desired:
        bound = "SCALE_MIN_GPUS" if bounded > desired else "SCALE_MAX_GPUS"
        action_reason += f"; {_gpus(desired)} by the rule, held at {bound} ({bounded})"
    action = UP if bounded > current else DOWN if bounded < current else HOLD
    retire = tuple(g.queue for g in retire_order(live, policy.scale_down_delay)[:max(current - bounded, 0)])
    return Decision(current=current, desired=bounded, action=action, reason=action_reason, retire=retire)
