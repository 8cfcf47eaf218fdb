"""Figure 5: API throughput under concurrent load, POST /generate and GET /tasks/{id}.

The API runs as `make run` starts it (gunicorn gevent, 2 workers) on this
machine's 2 cores, with Redis and the load generator on the same cores. A closed-loop
load generator keeps 64 and then 256 connections busy: wrk when it is installed, else
bench.loadgen (the figure's `setup.tool` and the report name the one the run used). Submits need a live worker: the benchmark publishes a heartbeat for one
GPU queue through the service's own Registry and runs no worker, so accepted jobs simply
wait in Redis (the API's work per submit is the same). Baseline in the same run: the same
gunicorn answering GET /healthz (the HTTP stack alone).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import threading
import time

import psutil

from common import keys

from bench import profiling
from bench.harness import API, cpu_seconds, short_job, stack
from common.registry import Registry

# Issue 16: submits/s ≥ half the same server's /healthz/s at 64 connections, no errors, and p99 at 256
# connections ≤ 5 × p99 at 64.
GOAL_SHARE_OF_HEALTHZ, GOAL_P99_GROWTH = 0.5, 5.0
CONNECTIONS = (64, 256)
QUEUE = "gpu.bench.0"

WRK_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format('BENCHJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"mean_us": %f, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max, latency.mean,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout))
end
"""


def _heartbeat(s, stop: threading.Event) -> None:
    registry = Registry(s.redis, ttl=10)
    beat = {"queue": QUEUE, "instance": "bench", "host": "bench", "comfyui_ok": True, "draining": False,
            "rates": {}, "running": [], "gpu": {"available": False, "source": "none"}}
    while not stop.is_set():
        registry.publish(beat)
        stop.wait(2.0)


def _cpu(groups: dict[str, list]) -> dict[str, float]:
    out = {name: cpu_seconds(procs) for name, procs in groups.items()}
    t = psutil.cpu_times()
    out["machine"] = t.user + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
    return out


def _load(kind: str, url: str, connections: int, seconds: float, files: dict, groups: dict) -> dict:
    """One closed-loop run: requests/s, latency percentiles in ms, and who used the CPU (core-seconds
    per second of run: 2.0 = both cores busy)."""
    target = url + {"healthz": "/healthz", "submit": API + "/generate", "get": ""}[kind]
    if shutil.which("wrk"):
        script = {"healthz": "", "submit": files["post_lua"].read_text(), "get": files["get_lua"].read_text()}[kind]
        path = files["dir"] / f"{kind}.lua"
        path.write_text(script + WRK_REPORT)
        cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(path), target]
        tool = "wrk 4.1 (-t2)"
    else:
        extra = {"healthz": [], "submit": ["--post", str(files["body"])], "get": ["--paths", str(files["paths"])]}[kind]
        cmd = [sys.executable, "-m", "bench.loadgen", target or url, str(connections), str(seconds), *extra]
        tool = "bench.loadgen (Python asyncio; wrk not installed)"
    before, gen0 = _cpu(groups), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    after, gen1 = _cpu(groups), resource.getrusage(resource.RUSAGE_CHILDREN)
    # The load generator is the only child that ends meanwhile: its CPU is the children's delta.
    after["loadgen"], before["loadgen"] = gen1.ru_utime + gen1.ru_stime, gen0.ru_utime + gen0.ru_stime
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"{cmd[0]} gave no report: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line.removeprefix("BENCHJSON "))
    errors = sum(r["errors"].values())
    cores = {k: round((after[k] - before[k]) / (r["duration_us"] / 1e6), 2) for k in after}
    cores["other"] = round(cores["machine"] - cores["api"] - cores["redis"] - cores["loadgen"], 2)
    return {"rps": round(r["requests"] / (r["duration_us"] / 1e6), 1), "p50_ms": round(r["p50_us"] / 1000, 2),
            "p99_ms": round(r["p99_us"] / 1000, 2), "max_ms": round(r["max_us"] / 1000, 2), "requests": r["requests"],
            "errors": errors, "tool": tool,
            "cpu_cores": cores,
            "api_cpu_ms_per_request": round((after["api"] - before["api"]) * 1000 / max(r["requests"], 1), 3)}


def _commands_per_submit(s, files, groups) -> dict:
    """Redis commands one submit costs (INFO commandstats over a short run), and their Redis time."""
    def stats():
        return {k.removeprefix("cmdstat_"): v for k, v in s.redis.info("commandstats").items()}
    before = stats()
    r = _load("submit", s.url, 64, 2, files, groups)
    after = stats()
    per = {k: (v["calls"] - before.get(k, {}).get("calls", 0), v["usec"] - before.get(k, {}).get("usec", 0))
           for k, v in after.items()}
    n = max(r["requests"], 1)
    rows = sorted(((k, c / n, us / n) for k, (c, us) in per.items() if c), key=lambda x: -x[2])
    return {"submits": n, "commands": round(sum(c for _, c, _ in rows), 1),
            "redis_us": round(sum(us for _, _, us in rows), 1),
            "by_command": [{"command": k, "per_submit": round(c, 2), "usec_per_submit": round(us, 1)} for k, c, us in rows[:8]],
            "jobs_waiting_after": s.redis.zcard(keys.waiting(QUEUE))}


def _alive_us(s) -> dict:
    """What the registry read (`Registry.alive()`) costs now, in µs, with this many jobs waiting."""
    registry, times = Registry(s.redis, ttl=10), []
    for _ in range(50):
        t0 = time.perf_counter()
        registry.alive()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"jobs_waiting": s.redis.zcard(keys.waiting(QUEUE)), "p50_us": round(times[25] * 1e6, 1)}


def _profile(s, files, groups, runs) -> dict:
    """Both gunicorn workers sampled through another submit run, twice at once: samples holding
    the GIL (where the CPU goes) and every thread's samples, waiting included (where requests wait)."""
    pids = [p.pid for p in groups["api"]]
    load = threading.Thread(target=lambda: runs.__setitem__("profiled", _load("submit", s.url, 64, 6, files, groups)))
    wall: dict = {}
    waits = threading.Thread(target=lambda: wall.__setitem__("stacks", _try_record(pids, gil=False)))
    load.start()
    waits.start()
    try:
        stacks = profiling.record(pids, 5)
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        load.join()
        waits.join()
    profile = profiling.summarize(stacks, top=16)
    profile["request"] = profiling.tree(stacks, "Flask.wsgi_app", depth=2, min_pct=2.0)
    profile["generate"] = profiling.tree(stacks, "generate", depth=2, min_pct=1.5)
    profile["send_task"] = profiling.tree(stacks, "Celery.send_task", depth=2, min_pct=1.0)
    if wall.get("stacks"):
        profile["generate_wall"] = profiling.tree(wall["stacks"], "generate", depth=2, min_pct=2.0, relative=True)
    profile["redis_commands_per_submit"] = _commands_per_submit(s, files, groups)
    return profile


def _try_record(pids, gil):
    try:
        return profiling.record(pids, 5, gil=gil)
    except RuntimeError:
        return None


def run(quick: bool = False) -> dict:
    seconds = 2 if quick else 6
    with stack("throughput") as s:
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(s, stop), daemon=True)
        beat.start()
        try:
            s.api()
            body = json.dumps(short_job())
            ids = [s.submit(short_job())["task_id"] for _ in range(300)]
            files = {"dir": s.workdir, "body": s.workdir / "body.json", "paths": s.workdir / "paths.txt",
                     "post_lua": s.workdir / "post.lua.in", "get_lua": s.workdir / "get.lua.in"}
            files["body"].write_text(body)
            files["paths"].write_text("\n".join(f"{API}/tasks/{i}" for i in ids))
            files["post_lua"].write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\n'
                                         'wrk.headers["Content-Type"] = "application/json"\n')
            files["get_lua"].write_text(f'local ids = {{}}\nfor l in io.lines("{files["paths"]}") do ids[#ids + 1] = l end\n'
                                        'local i = 0\nrequest = function()\n  i = i + 1\n'
                                        '  return wrk.format("GET", ids[(i % #ids) + 1])\nend\n')
            alive_cost = [_alive_us(s)]
            groups = {"api": psutil.Process(s.fleet.api.proc.pid).children(),
                      "redis": [psutil.Process(s.fleet.redis.proc.pid)]}
            # Warm-up, not measured: every gunicorn thread opens its Redis and broker connections on its
            # first requests, which makes a cold first run up to 40 % slower.
            for kind in ("healthz", "submit", "get"):
                _load(kind, s.url, 64, 1 if quick else 2, files, groups)
            runs = {}
            for kind in ("healthz", "submit", "get"):
                for c in CONNECTIONS:
                    runs[f"{kind}@{c}"] = _load(kind, s.url, c, seconds, files, groups)
            submits = [runs[f"submit@{c}"] for c in CONNECTIONS]
            alive_cost.append(_alive_us(s))
            low, high = runs[f"submit@{CONNECTIONS[0]}"], runs[f"submit@{CONNECTIONS[-1]}"]
            share = low["rps"] / runs[f"healthz@{CONNECTIONS[0]}"]["rps"]
            growth = high["p99_ms"] / low["p99_ms"] if low["p99_ms"] else float("inf")
            met = share >= GOAL_SHARE_OF_HEALTHZ and growth <= GOAL_P99_GROWTH and all(r["errors"] == 0 for r in submits)
            profile = None
            if not met and not quick and profiling.available():
                profile = _profile(s, files, groups, runs)
        finally:
            stop.set()
    healthz = {c: runs[f"healthz@{c}"] for c in CONNECTIONS}
    low = min(submits, key=lambda r: r["rps"])
    line = "; ".join(f"{c} conns: submit {runs[f'submit@{c}']['rps']:.0f}/s p99 {runs[f'submit@{c}']['p99_ms']:.0f} ms, "
                     f"get {runs[f'get@{c}']['rps']:.0f}/s p99 {runs[f'get@{c}']['p99_ms']:.0f} ms, "
                     f"healthz {healthz[c]['rps']:.0f}/s" for c in CONNECTIONS)
    return {
        "title": "API throughput",
        "line": (f"submits/s ÷ /healthz/s at {CONNECTIONS[0]} conns {share:.2f}, p99 at {CONNECTIONS[-1]} ÷ at "
                 f"{CONNECTIONS[0]} {growth:.1f}× ({line}); goal ≥ {GOAL_SHARE_OF_HEALTHZ:g} and ≤ {GOAL_P99_GROWTH:g}×, "
                 "no errors"),
        "value": {f"submit_rps@{c}": runs[f"submit@{c}"]["rps"] for c in CONNECTIONS}
                 | {f"submit_p99_ms@{c}": runs[f"submit@{c}"]["p99_ms"] for c in CONNECTIONS},
        "goal": (f"submits/s ≥ {GOAL_SHARE_OF_HEALTHZ:g} × /healthz/s at {CONNECTIONS[0]} connections, no errors, "
                 f"p99 at {CONNECTIONS[-1]} ≤ {GOAL_P99_GROWTH:g} × p99 at {CONNECTIONS[0]}"),
        "met": met,
        "baseline": {"name": "GET /healthz on the same gunicorn", "runs": healthz,
                     "submit_share_of_healthz": {c: round(runs[f"submit@{c}"]["rps"] / healthz[c]["rps"], 3)
                                                 for c in CONNECTIONS}},
        "runs": runs,
        "lowest_submit_rps": low["rps"],
        "registry_read_vs_backlog": alive_cost,
        "profile": profile,
        "setup": {"seconds_per_run": seconds, "api": "gunicorn gevent -w 2 (as make run)",
                  "tool": low["tool"], "worker": "none: a heartbeat published by the benchmark; jobs wait in Redis",
                  "body": "storydiffusion, 1 scene 256², 2 steps"},
    }
