"""Figure 7: scale, 8 → 16 → 32 simulated GPUs with their workers on this one machine.

- Dispatch time per job as the fleet grows: what POST /generate does to pick a GPU, timed
  in-process against the live registry (Registry.alive(): every GPU's heartbeat time and the
  queues' backlog counters in one pipeline, then the heartbeats that changed since its last
  reading; plus common.dispatch.choose()), and the whole POST /generate as a caller sees it.
  Baseline: the same at the smallest size.
- Resident memory per worker (psutil RSS and USS) at the largest size, after jobs ran.
  Baseline: a bare Python interpreter started in the same run.
- Redis commands per job (INFO commandstats deltas while a batch of jobs runs), less the
  fleet's background (heartbeats, broker polling) measured over an idle spell just before.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import psutil

from bench.harness import cpu_seconds, short_job, stack, summary, wait_until
from common.dispatch import JobSpec, choose
from common.registry import Registry

GOAL_GROWTH = 1.5  # issue 16: time to choose a GPU at 32 GPUs ≤ 1.5 × at 8


def _commandstats(r) -> dict[str, int]:
    """Calls per command, less INFO (the benchmark's own reading)."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items() if k != "cmdstat_info"}


def _dispatch_times(s, rounds: int) -> dict:
    registry = Registry(s.redis, ttl=10)
    job = JobSpec(workflow="storydiffusion", cost=0.125, checkpoint="sd_xl_base_1.0.safetensors")
    alive, pick = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        workers = registry.alive()
        t1 = time.perf_counter()
        choose(workers, job)
        pick.append(time.perf_counter() - t1)
        alive.append(t1 - t0)
    return {"registry_alive_us": summary(alive, 1e6, 1), "choose_us": summary(pick, 1e6, 1),
            "total_us": summary([a + b for a, b in zip(alive, pick)], 1e6, 1), "workers_seen": len(workers)}


def _post_latency(s, count: int) -> tuple[dict, list[str]]:
    times, tasks = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        tasks.append(s.submit(short_job())["task_id"])
        times.append(time.perf_counter() - t0)
    return summary(times), tasks


def _wait_sims(sims, prompts_before: int, count: int, timeout: float) -> None:
    """Wait for `count` more finished prompts, asking the simulators (not Redis: it is being counted)."""
    wait_until(lambda: sum(len(sim.record()["busy"]) for sim in sims) >= prompts_before + count, timeout,
               interval=0.25, what=f"{count} jobs done")


def _redis_side_us(r, fn, rounds: int) -> float:
    """Redis's own time per round (INFO commandstats usec, every command but INFO) while `fn` runs;
    the fleet's heartbeats and broker polls meanwhile count too."""
    def usec():
        return sum(v["usec"] for k, v in r.info("commandstats").items() if k != "cmdstat_info")
    before = usec()
    fn()
    return round((usec() - before) / rounds, 1)


def _jobs_commands(s, sims, jobs: int, idle_s: float) -> tuple[dict, dict, float, list[str]]:
    """Redis commands per job: a batch of jobs' commandstats delta less the idle fleet's rate,
    measured just before. Returns (per job by command, POST latency, idle commands/s, task ids)."""
    c0, t0 = _commandstats(s.redis), time.monotonic()
    time.sleep(idle_s)
    c1, t1 = _commandstats(s.redis), time.monotonic()
    idle_rate = {k: (c1.get(k, 0) - c0.get(k, 0)) / (t1 - t0) for k in c1}
    done_before = sum(len(sim.record()["busy"]) for sim in sims)
    c2, t2 = _commandstats(s.redis), time.monotonic()
    post, tasks = _post_latency(s, jobs)
    _wait_sims(sims, done_before, jobs, 60)
    time.sleep(0.5)  # the last results are recorded just after the simulator's busy end
    c3, t3 = _commandstats(s.redis), time.monotonic()
    per_job = {k: (c3.get(k, 0) - c2.get(k, 0) - idle_rate.get(k, 0) * (t3 - t2)) / jobs for k in c3}
    per_job = {k: round(v, 2) for k, v in sorted(per_job.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    return per_job, post, sum(idle_rate.values()), tasks


def run(quick: bool = False) -> dict:
    sizes = (2, 4) if quick else (8, 16, 32)
    jobs, idle_s = (8, 2.0) if quick else (40, 4.0)
    growth, records = [], []
    with stack("scale") as s:
        s.api()
        for size in sizes:
            t0 = time.monotonic()
            while len(s.fleet.workers) < size:
                s.worker(s.sim(0.005, 1.0, 0.01), queue=f"gpu.scale.{len(s.fleet.workers)}")
            s.ready(size, timeout=120)
            started = time.monotonic() - t0
            time.sleep(2.5)  # one heartbeat round, so the registry holds every GPU's full heartbeat
            rounds = 100 if quick else 300
            point = {"gpus": size, "start_seconds": round(started, 1)}
            point["registry_redis_us"] = _redis_side_us(s.redis, lambda: point.update(_dispatch_times(s, rounds)), rounds)
            per_job, post, idle_rate, tasks = _jobs_commands(s, s.fleet.sims, jobs, idle_s)
            point.update(post_generate_ms=post, redis_commands_per_job=round(sum(per_job.values()), 1),
                         redis_commands_by_command=per_job, idle_commands_per_second=round(idle_rate, 1))
            records += s.wait_records(tasks, timeout=60)
            growth.append(point)
        # The idle fleet's CPU, and memory after jobs ran (a bare interpreter is the baseline).
        workers = [psutil.Process(w.proc.pid) for w in s.fleet.workers]
        sim_procs = [psutil.Process(x.proc.pid) for x in s.fleet.sims]
        redis_proc = psutil.Process(s.fleet.redis.proc.pid)
        cpu0, t0 = (cpu_seconds(workers), cpu_seconds(sim_procs), cpu_seconds([redis_proc])), time.monotonic()
        time.sleep(idle_s)
        cpu1, t1 = (cpu_seconds(workers), cpu_seconds(sim_procs), cpu_seconds([redis_proc])), time.monotonic()
        idle_cores = {name: round((b - a) / (t1 - t0), 3) for name, a, b in zip(("workers", "sims", "redis"), cpu0, cpu1)}
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        time.sleep(0.5)
        bare_rss = psutil.Process(bare.pid).memory_info().rss
        bare.kill()
        bare.wait()
        rss = [p.memory_info().rss for p in workers]
        uss = [p.memory_full_info().uss for p in workers]
        sim_rss = [p.memory_info().rss for p in sim_procs]
    bad = [r["status"] for r in records if r["status"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[:3]}")
    mib = 2 ** 20
    worker_rss, worker_uss = statistics.median(rss) / mib, statistics.median(uss) / mib
    first, last = growth[0], growth[-1]
    growth_ratio = round(last["total_us"]["p50"] / first["total_us"]["p50"], 2)
    commands = last["redis_commands_per_job"]
    return {
        "title": "Scale",
        "line": (f"{last['gpus']} GPUs: worker RSS {worker_rss:.0f} MiB (USS {worker_uss:.0f}; bare Python "
                 f"{bare_rss / mib:.0f}); Redis commands per job "
                 + " → ".join(f"{g['redis_commands_per_job']:.0f}" for g in growth)
                 + "; dispatch " + " → ".join(f"{g['total_us']['p50']:.0f}" for g in growth)
                 + f" µs (×{growth_ratio} from the smallest) at {' → '.join(str(g['gpus']) for g in growth)} GPUs; "
                 f"goal: choosing a GPU at {last['gpus']} ≤ {GOAL_GROWTH:g} × at {first['gpus']}"),
        "value": {"worker_rss_mib": round(worker_rss, 1), "worker_uss_mib": round(worker_uss, 1),
                  "redis_commands_per_job": commands, "dispatch_us_p50": {g["gpus"]: g["total_us"]["p50"] for g in growth},
                  "dispatch_growth_ratio": growth_ratio},
        "goal": f"dispatch time at {last['gpus']} GPUs ≤ {GOAL_GROWTH:g} × at {first['gpus']}",
        "met": growth_ratio <= GOAL_GROWTH,
        "baseline": {"name": "bare interpreter RSS; the idle fleet's commands; dispatch at the smallest size",
                     "bare_python_rss_mib": round(bare_rss / mib, 1),
                     "idle_commands_per_second": last["idle_commands_per_second"],
                     "idle_commands_per_second_per_gpu": round(last["idle_commands_per_second"] / last["gpus"], 2)},
        "growth": growth,
        "redis_commands_per_job": last["redis_commands_by_command"],
        "idle_cpu_cores": idle_cores,
        "memory_mib": {"worker_rss": summary(rss, 1 / mib, 1), "worker_uss": summary(uss, 1 / mib, 1),
                       "simulator_rss": summary(sim_rss, 1 / mib, 1)},
        "setup": {"sizes": list(sizes), "jobs_per_size": jobs, "idle_seconds": idle_s,
                  "simulator": "--step-seconds 0.005", "heartbeat_interval": 2.0,
                  "submit": "one caller, back to back"},
    }
