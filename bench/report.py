"""performance.md and its plots, written from results.json alone (a run rewrites both; no
number in them is typed by hand)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# The *_real figures (`--comfyui-url`) sit beside their simulator twins.
ORDER = [("overhead", 1), ("overhead_real", "1b"), ("idle", 2), ("idle_real", "2b"), ("dispatch", 3), ("cancel", 4), ("throughput", 5), ("progress", 6),
         ("scale", 7), ("commands", 8), ("memory", 9), ("backlog", 10), ("autoscale", 11)]
STAGES = {"celery_api": "in Celery → API shows cancelled", "pending_sim": "pending in ComfyUI → deleted there",
          "pending_api": "pending in ComfyUI → API shows cancelled", "running_interrupt": "running → interrupt reaches ComfyUI",
          "running_sim": "running → prompt stopped", "running_api": "running → API shows cancelled"}


def _goal(name: str, f: dict) -> str:
    if f.get("goal"):
        return f["goal"]
    if name == "memory" and f.get("goals"):  # results written before the figure stated its goal
        from bench.memory import goal_text
        return goal_text(f["goals"])
    return "–"


def _verdict(f: dict) -> str:
    if "error" in f:
        return "**error**"
    return "info (no goal)" if f.get("met") is None else "met" if f["met"] else "**MISSED**"


def _ms(d: dict | None, keys=("p50", "p95", "p99", "max")) -> str:
    return " | ".join("–" if not d or d.get(k) is None else f"{d[k]:.2f}" for k in keys)


def _save(fig, docs: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(docs / name, dpi=90)
    plt.close(fig)
    return f"![{name}]({name})"


def _cdf(ax, values, label):
    data = sorted(values)
    if data:
        ax.plot(data, [(i + 1) / len(data) for i in range(len(data))], label=label)


# -- one section per figure -------------------------------------------------------------------
def overhead(f: dict, docs: Path) -> list[str]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    _cdf(a, f["series"]["service_ms"], "service (API → worker → ComfyUI → API)")
    _cdf(a, f["series"]["floor_ms"], "floor (ComfyClient → ComfyUI)")
    a.set(xlabel="time beyond ComfyUI's execution (ms)", ylabel="fraction of jobs", title="Overhead per job (CDF)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    phases = f["phases_ms"]
    names = list(phases)
    b.barh(names, [phases[n]["p50"] for n in names], color="tab:blue", label="p50")
    b.barh(names, [phases[n]["p95"] - phases[n]["p50"] for n in names], left=[phases[n]["p50"] for n in names],
           color="tab:blue", alpha=0.3, label="p50 → p95")
    b.invert_yaxis()
    b.set(xlabel="ms", title="Service phases (ComfyUI's own execution left out)")
    b.legend(fontsize=8)
    img = _save(fig, docs, "perf-overhead.png")
    rows = ["| | p50 | p95 | p99 | max |", "|---|---|---|---|---|",
            f"| service: accept → result visible, less execution | {_ms(f['service_ms'])} |",
            f"| floor: ComfyClient submit → outputs, less execution | {_ms(f['baseline']['ms'])} |",
            f"| **difference** | {f['value']['p50_ms']:.2f} | {f['value']['p95_ms']:.2f} | {f['value']['p99_ms']:.2f} | |"]
    phase_rows = ["| service phase | p50 | p95 | p99 | max |", "|---|---|---|---|---|"]
    phase_rows += [f"| {k} | {_ms(v)} |" for k, v in f["phases_ms"].items()]
    phase_rows += [f"| floor: {k} | {_ms(v)} |" for k, v in f["floor_phases_ms"].items()]
    return [f"{f['setup']['jobs']} jobs ({f['setup']['workflow']}; simulator {f['setup']['simulator']}; "
            f"{f['setup']['poll']}), alternating with the floor on the same simulator. Milliseconds:", "",
            *rows, "", img, "", "Where the service's time goes (timestamps of API, Redis record and simulator, one clock):",
            "", *phase_rows]


def idle(f: dict, docs: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(f["series"]["service_ms"], ".", label="through the service")
    ax.plot(f["series"]["baseline_ms"], "x", label="simulator fed directly", alpha=0.7)
    ax.axhline(1.0, color="red", lw=0.8, ls="--", label="goal (median)")
    ax.set(xlabel="prompt n → n+1", ylabel="GPU idle (ms)", title="Idle gap between consecutive prompts, backlog")
    ax.legend(fontsize=8)
    img = _save(fig, docs, "perf-idle.png")
    return [f"{f['setup']['jobs']} jobs submitted by {f['setup']['submit']} ({f['setup']['workflow']}), "
            f"{f['setup']['worker']}. Milliseconds:", "",
            "| | p50 | p95 | p99 | max |", "|---|---|---|---|---|",
            f"| through the service | {_ms(f['service_ms'])} |", f"| simulator's own queue | {_ms(f['baseline']['ms'])} |",
            "", img]


def _on_server(f: dict) -> str:
    c = f["comfyui"]
    return (f"Run on a real ComfyUI {c['comfyui_version']} at {c['url']} (torch {c['pytorch']}, Python {c['python']}, "
            f"device {c['device']}, as its /system_stats says), service and baseline on that same server in the "
            f"same run. Workflow: {f['setup']['workflow']}; ComfyUI's execution p50 {f['execution_ms']['p50']:.0f} ms. "
            f"Timing: {f['setup']['timing']}.")


def overhead_real(f: dict, docs: Path) -> list[str]:
    rows = ["| | p50 | p95 | p99 | max |", "|---|---|---|---|---|",
            f"| service: accept → result visible, less execution | {_ms(f['service_ms'])} |",
            f"| floor: ComfyClient submit → outputs, less execution | {_ms(f['baseline']['ms'])} |",
            f"| **difference** | {f['value']['p50_ms']:.2f} | {f['value']['p95_ms']:.2f} | {f['value']['p99_ms']:.2f} | |"]
    rows += [f"| service phase: {k} | {_ms(v)} |" for k, v in f["phases_ms"].items()]
    rows += [f"| floor phase: {k} | {_ms(v)} |" for k, v in f["floor_phases_ms"].items()]
    return [_on_server(f), "", f"{f['setup']['jobs']} jobs ({f['setup']['poll']}), alternating with the floor. "
            "Milliseconds (phases that start or end at a ComfyUI timestamp are whole milliseconds):", "", *rows]


def idle_real(f: dict, docs: Path) -> list[str]:
    return [_on_server(f), "", f"{f['setup']['jobs']} jobs submitted by {f['setup']['submit']}, {f['setup']['worker']}. "
            "The gap is ComfyUI's end of one prompt → its start of the next as its own history stamps them, so "
            "ComfyUI's own hand-over (history write, next queue item) is in both rows. Milliseconds:", "",
            "| | p50 | p95 | p99 | max |", "|---|---|---|---|---|",
            f"| through the service | {_ms(f['service_ms'])} |", f"| ComfyUI's own queue | {_ms(f['baseline']['ms'])} |"]


def dispatch(f: dict, docs: Path) -> list[str]:
    s, runs, st = f["series"], f["runs"], f["setup"]
    policies = list(dict.fromkeys(k.split("/")[0] for k in runs))
    patterns = list(dict.fromkeys(k.split("/")[1] for k in runs))
    fig, axes = plt.subplots(1, len(patterns) + 1, figsize=(13, 3.6),
                             gridspec_kw={"width_ratios": [2] * len(patterns) + [1.4]})
    for ax, pattern in zip(axes, patterns):
        spans = s["per_gpu"][f"{policies[0]}/{pattern}"]
        for k, q in enumerate(s["queues"]):
            ax.broken_barh([(a, b - a) for a, b, g, *_ in spans if g == q], (k - 0.4, 0.8), facecolors=f"C{k}",
                           edgecolor="white", linewidth=0.3)
        lb = f["baseline"]["seconds"][pattern]
        ax.axvline(lb, color="black", ls="--", lw=1, label=f"lower bound {lb:.1f} s")
        ax.set(yticks=range(len(s["queues"])), yticklabels=[f"{v:g}×" for v in s["speeds"]],
               xlabel="seconds since the first POST", title=f"{policies[0]}, {pattern}: each GPU's prompts")
        ax.legend(fontsize=8, loc="lower right")
    b = axes[-1]
    width = 0.8 / len(patterns)
    for i, pattern in enumerate(patterns):
        b.bar([k + i * width for k in range(len(policies))], [runs[f"{p}/{pattern}"]["ratio"] for p in policies],
              width, label=pattern)
    b.axhline(1.05, color="black", ls="--", lw=1, label="goal 1.05")
    b.set_xticks([k + width * (len(patterns) - 1) / 2 for k in range(len(policies))],
                 [p.replace("_", "_\n") for p in policies], fontsize=7)
    b.set(ylabel="makespan / lower bound", title="Policies, run for real")
    b.legend(fontsize=8)
    img = _save(fig, docs, "perf-dispatch.png")
    nb, base = f["nominal"], f["baseline"]
    rows = ["| policy | arrivals | makespan s | / lower bound | / nominal bound | wait ms mean / p95 | jobs per GPU ("
            + ", ".join(f"{v:g}×" for v in s["speeds"]) + ") |", "|---|---|---|---|---|---|---|"]
    for pattern in patterns:
        for p in policies:
            r = runs[f"{p}/{pattern}"]
            rows.append(f"| {p} | {pattern} | {r['makespan_s']:.2f} | **{r['ratio']:.3f}** | {nb['ratios'][f'{p}/{pattern}']:.3f} | "
                        f"{r['wait_ms']['mean']:.0f} / {r['wait_ms']['p95']:.0f} | {r['jobs_per_gpu']} |")
    rates = "; ".join(f"{q}: {r['seconds_per_unit']:.3f} s per cost unit + {r.get('seconds_per_prompt') or 0:.3f} s per prompt"
                      for q, r in f["measured_rates"].items() if r)
    bounds = ", ".join(f"{p} {v:.2f} s" for p, v in base["seconds"].items())
    late = max(runs[f"{p}/poisson"]["late_s"] for p in policies) if "poisson" in patterns else 0.0
    during = f["during_runs"]
    return [f"The API started once per `DISPATCH_POLICY`, on the same fleet (GPUs at {st['speeds']}), each time given "
            f"the same {st['jobs']} jobs ({st['steps']} sampler steps of {st['step_seconds'] * 1000:g} ms at speed 1) "
            f"twice: as a burst ({st['submit']}, back to back), and with {st['poisson']} ({st['submit']}; at most "
            f"{late * 1000:.0f} ms behind schedule). Warm-up: {st['warmup']}. GPU utilisation in the heartbeats: "
            f"{st['gpu_utilisation']}. Wait: POST sent → its simulator starts it. What the workers had measured after "
            f"the warm-up: {rates}.", "",
            f"Lower bounds (judged): {bounds}, on each GPU's cost measured by driving its simulator directly after the "
            f"warm-up (no service; prompts of {base['calibration_steps']} steps per GPU, the four at once), seconds ≥ a·steps + b "
            f"for every such prompt: a = {base['seconds_per_step']} s, b = {base['seconds_per_prompt']} s. The nominal bound "
            f"({', '.join(f'{p} {v:.2f} s' for p, v in nb['seconds'].items())}) counts only the configured times (a = "
            f"{nb['seconds_per_step']}, b = {nb['seconds_per_prompt']} s, the decode), not what a simulator spends per prompt "
            f"beyond them (graph work, messages, PNG encoding), so no schedule of this fleet reaches it. During the runs "
            f"the simulators took a = {during['seconds_per_step']} s, b = {during['seconds_per_prompt']} s (mean fit over "
            "their prompts).", "", *rows, "", img]


def cancel(f: dict, docs: Path) -> list[str]:
    st = f["stages_ms"]
    keys = [k for k in STAGES if k in f["series"]]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.boxplot([f["series"][k] for k in keys], vert=False, whis=(5, 95))
    ax.set_yticks(range(1, len(keys) + 1), [STAGES[k] for k in keys], fontsize=8)
    stop = f["baseline"]["ms"].get("running_sim")
    if stop:  # the goal: a running job shown cancelled within 1.5 × the direct client's stop (p95)
        ax.axvline(1.5 * stop["p95"], color="red", ls="--", lw=0.8, label="goal p95 (running → API shows cancelled)")
    ax.set(xlabel="ms after DELETE", title="Cancel latency by stage (whiskers p5–p95)")
    ax.legend(fontsize=8)
    img = _save(fig, docs, "perf-cancel.png")
    base = f["baseline"]["ms"]
    rows = ["| stage | p50 | p95 | p99 | max | direct client p95 |", "|---|---|---|---|---|---|"]
    rows += [f"| {STAGES[k]} | {_ms(st[k])} | {base[k]['p95']:.2f} |" if k in base else f"| {STAGES[k]} | {_ms(st[k])} | – |"
             for k in keys]
    phase = f"; timing: {f['setup']['phase']}" if f["setup"].get("phase") else ""
    return [f"{f['setup']['rounds']} rounds; simulator {f['setup']['simulator']}{phase}. The goal is judged on every "
            "row but the interrupt's arrival (shown for where the time goes). Milliseconds:", "", *rows, "", img]


def throughput(f: dict, docs: Path) -> list[str]:
    runs = f["runs"]
    conns = sorted({int(k.split("@")[1]) for k in runs if "@" in k})
    kinds = ["healthz", "submit", "get"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(conns)
    for i, c in enumerate(conns):
        a.bar([k + i * width for k in range(3)], [runs[f"{kind}@{c}"]["rps"] for kind in kinds], width,
              label=f"{c} connections")
        b.bar([k + i * width for k in range(3)], [runs[f"{kind}@{c}"]["p99_ms"] for kind in kinds], width,
              label=f"{c} connections")
    low = conns[0]  # goals: submits/s ≥ half of /healthz's, and p99 at the most connections ≤ 5 × at the fewest
    a.axhline(0.5 * runs[f"healthz@{low}"]["rps"], color="red", ls="--", lw=0.8, label=f"goal: submits ≥ ½ healthz @{low}")
    b.axhline(5 * runs[f"submit@{low}"]["p99_ms"], color="red", ls="--", lw=0.8, label=f"goal: submit p99 ≤ 5 × @{low}")
    for ax, title, unit in ((a, "Requests per second", "req/s"), (b, "p99 latency", "ms")):
        ax.set_xticks([k + width * (len(conns) - 1) / 2 for k in range(3)], ["GET /healthz", "POST /generate", "GET /tasks/{id}"])
        ax.set(title=title, ylabel=unit)
        ax.legend(fontsize=8)
    b.set_yscale("log")
    img = _save(fig, docs, "perf-throughput.png")
    rows = ["| run | req/s | p50 ms | p99 ms | errors | API CPU ms / request | cores: API, Redis, load generator, other |",
            "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        c = r["cpu_cores"]
        rows.append(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                    f"{r['api_cpu_ms_per_request']:.2f} | {c['api']}, {c['redis']}, {c['loadgen']}, {c['other']} |")
    st = f["setup"]
    return [f"{st['api']}; load generator {st['tool']}, {st['seconds_per_run']} s per run; worker: {st['worker']}; "
            f"body: {st['body']}. `profiled` is a submit run under py-spy (slower, not judged).", "", *rows, "", img]


def progress(f: dict, docs: Path) -> list[str]:
    tl = f["series"]["timeline"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.step([t for t, _ in tl["emitted"]], [k for _, k in tl["emitted"]], where="post", label="emitted by the simulator")
    a.step([t for t, _ in tl["visible"]], [k for _, k in tl["visible"]], "o-", where="post", ms=3,
           label="visible in GET /tasks/{id}")
    a.set(xlabel="s", ylabel="sampler step", title="One job: progress emitted vs visible")
    a.legend(fontsize=8)
    b.hist(f["series"]["latency_ms"], bins=30)
    b.axvline(50, color="red", ls="--", lw=0.8, label="goal p95")
    b.set(xlabel="ms from event to visible", ylabel="steps", title="Freshness of the steps written")
    b.legend(fontsize=8)
    img = _save(fig, docs, "perf-progress.png")
    st = f["setup"]
    return [f"{st['jobs']} jobs of {st['steps']} steps × {st['step_seconds'] * 1000:g} ms, PROGRESS_INTERVAL "
            f"{st['progress_interval']} s, {st['poll']}. Milliseconds:", "",
            "| | p50 | p95 | p99 | max |", "|---|---|---|---|---|",
            f"| event → visible in the API | {_ms(f['service_ms'])} |",
            f"| event → ComfyClient callback (floor) | {_ms(f['baseline']['ms'])} |",
            f"| age of the step a poll shows | {_ms(f['view_age_ms'])} |", "", img]


def scale(f: dict, docs: Path) -> list[str]:
    g = f["growth"]
    gpus = [p["gpus"] for p in g]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.4))
    a.plot(gpus, [p["registry_alive_us"]["p50"] for p in g], "o-", label="Registry.alive() (pipelined reads + decoding)")
    a.plot(gpus, [p["choose_us"]["p50"] for p in g], "o-", label="choose()")
    a.plot(gpus, [p["total_us"]["p50"] for p in g], "o-", label="dispatch total")
    a.set(xlabel="GPUs (workers)", ylabel="µs (p50)", title="Dispatch time per job", xticks=gpus)
    a.legend(fontsize=8)
    b.plot(gpus, [p["post_generate_ms"]["p50"] for p in g], "o-", label="p50")
    b.plot(gpus, [p["post_generate_ms"]["p95"] for p in g], "o--", label="p95")
    b.set(xlabel="GPUs (workers)", ylabel="ms", title="POST /generate as a caller sees it", xticks=gpus)
    b.legend(fontsize=8)
    c.plot(gpus, [p["redis_commands_per_job"] for p in g], "o-")
    c.set(xlabel="GPUs (workers)", ylabel="commands", title="Redis commands per job", xticks=gpus, ylim=(0, None))
    img = _save(fig, docs, "perf-scale.png")
    rows = ["| GPUs | fleet start s | alive() µs p50 / p99 | Redis time per round µs | choose() µs p50 / p99 | "
            "POST /generate ms p50 / p95 | Redis commands per job | idle commands/s |", "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {p['gpus']} | {p['start_seconds']} | {p['registry_alive_us']['p50']} / {p['registry_alive_us']['p99']} | "
             f"{p.get('registry_redis_us', '–')} | {p['choose_us']['p50']} / {p['choose_us']['p99']} | "
             f"{p['post_generate_ms']['p50']} / {p['post_generate_ms']['p95']} | {p['redis_commands_per_job']} | "
             f"{p['idle_commands_per_second']} |" for p in g]
    mem = f["memory_mib"]
    per_job = ", ".join(f"{k} {v}" for k, v in list(f["redis_commands_per_job"].items())[:12])
    base = f["baseline"]
    return [*rows, "", img, "",
            f"At {gpus[-1]} GPUs, after jobs ran: worker RSS p50 {mem['worker_rss']['p50']} MiB (max "
            f"{mem['worker_rss']['max']}), USS p50 {mem['worker_uss']['p50']} MiB; a bare Python interpreter "
            f"{base['bare_python_rss_mib']} MiB; a simulator {mem['simulator_rss']['p50']} MiB.",
            f"Redis commands per job at {gpus[-1]} GPUs: **{f['value']['redis_commands_per_job']}** beyond the idle fleet's "
            f"{base['idle_commands_per_second']} commands/s ({base['idle_commands_per_second_per_gpu']} per GPU); the most "
            f"frequent: {per_job}. Commands run inside Lua scripts (`evalsha`: the task store's transitions) count too. "
            "The registry read (`common/registry.py`) is two commands whatever the fleet's size, pipelined: `HGETALL` "
            "of the heartbeat times and of the queues' counters (jobs waiting, handed, running, and their cost total, "
            "kept by the transitions), then one `HMGET` of the heartbeats newer than the reader's last reading, if any. "
            "The idle fleet used "
            + ", ".join(f"{k} {v}" for k, v in f["idle_cpu_cores"].items()) + " cores."]


def bottlenecks(results: dict) -> list[str]:
    """For each missed goal, what the run's own measurements and profiles say."""
    figs, out = results["figures"], []
    t = figs.get("throughput")
    if t and t.get("met") is False and "runs" in t:
        sub = t["runs"].get("submit@64", {})
        hz = t["runs"].get("healthz@64", {})
        out += [f"**API throughput.** A submit costs {sub.get('api_cpu_ms_per_request')} ms of API CPU "
                f"(GET /healthz: {hz.get('api_cpu_ms_per_request')} ms); during the submit run at 64 connections the "
                f"cores went to API {sub['cpu_cores']['api']}, Redis {sub['cpu_cores']['redis']}, load generator "
                f"{sub['cpu_cores']['loadgen']}, other processes {sub['cpu_cores']['other']}. "
                f"At that cost two cores allow at most ≈ {2000 / sub['api_cpu_ms_per_request']:.0f} submits/s with "
                f"nothing else running; half of /healthz's rate (the goal) would need at most "
                f"{2 * hz.get('api_cpu_ms_per_request', 0):.2f} ms of API CPU per submit."]
        p = t.get("profile")
        if p and "error" in p:
            out += ["", f"The profile could not be taken: {p['error']}."]
        elif p:
            out += ["", f"py-spy, both gunicorn workers during a submit run ({p['samples']} samples holding the GIL; "
                    "share of all samples):", ""]
            if p.get("request"):
                out += ["| one request in Flask | file | % |", "|---|---|---|"]
                out += [f"| {'&nbsp;' * 4 * r['level']}{r['function']} | {r['file']} | {r['pct']} |" for r in p["request"]]
                out += [""]
            out += ["| function under `generate` | file | % |", "|---|---|---|"]
            out += [f"| {'&nbsp;' * 4 * r['level']}{r['function']} | {r['file']} | {r['pct']} |" for r in p["generate"]]
            if p.get("send_task"):
                out += ["", "| inside `Celery.send_task` | file | % |", "|---|---|---|"]
                out += [f"| {'&nbsp;' * 4 * r['level']}{r['function']} | {r['file']} | {r['pct']} |"
                        for r in p["send_task"][1:]]
            if p.get("generate_wall"):
                out += ["", "Where a submit waits: the same run sampled on every thread, waiting included "
                        "(share of the samples under `generate`):", "", "| in `generate`, wall clock | file | % |",
                        "|---|---|---|"]
                out += [f"| {'&nbsp;' * 4 * r['level']}{r['function']} | {r['file']} | {r['pct']} |"
                        for r in p["generate_wall"]]
            out += ["", "CPU by package (self time): " + ", ".join(f"{r['package']} {r['self_pct']}%" for r in p["by_package"][:10]) + "."]
            rc = p.get("redis_commands_per_submit")
            if rc:
                cmds = ", ".join(f"{r['command']} ×{r['per_submit']} ({r['usec_per_submit']} µs)" for r in rc["by_command"][:6])
                out += ["", f"Redis per submit: {rc['commands']} commands, {rc['redis_us']} µs of Redis time, with "
                        f"{rc['jobs_waiting_after']} jobs waiting on the queue: {cmds}. `evalsha` is Redis running the service's Lua scripts (the submit transition, `common/task_store.py`; "
                        "the rate limiter's counters, Flask-Limiter). How a submit's Redis time depends on the backlog is "
                        "the backlog figure's."]
            rb = t.get("registry_read_vs_backlog")
            if rb:
                out += ["", "Registry read (`Registry.alive()`, what every submit does first), timed in the benchmark's process: " + ", ".join(
                    f"{x['p50_us']:.0f} µs with {x['jobs_waiting']} jobs waiting" for x in rb) + "."]
    o = figs.get("overhead")
    if o and o.get("met") is False and "phases_ms" in o:
        ph, fl = o["phases_ms"], o["floor_phases_ms"]
        out += ["", f"**Service overhead.** Beyond the floor, a job spends p50 {ph['POST /generate']['p50']} ms in "
                f"POST /generate (the floor's submit: {fl['submit']['p50']} ms), {ph['to ComfyUI queue']['p50']} ms "
                f"from the 202 to ComfyUI's queue (Celery delivery, the worker's start transition, payload read, "
                f"POST /prompt) and {ph['end → visible']['p50']} ms from ComfyUI's end to the result in the API (the "
                f"floor's outputs download: {fl['end → outputs']['p50']} ms). The POST's CPU is the profile above."]
        extra = {"POST /generate": ph["POST /generate"]["p50"] - fl["submit"]["p50"],
                 "202 → ComfyUI's queue": ph["to ComfyUI queue"]["p50"],
                 "ComfyUI's end → visible": ph["end → visible"]["p50"] - fl["end → outputs"]["p50"]}
        worst = max(extra, key=extra.get)
        out += ["", "Beyond the floor at the median: " + ", ".join(f"{k} +{v:.1f} ms" for k, v in extra.items())
                + f"; the largest part is {worst}. The worker's profile below shows what its job thread spends "
                "that time on."]
        wp = o.get("worker_profile")
        if wp and "error" in wp:
            out += ["", f"The worker's profile could not be taken: {wp['error']}."]
        elif wp and wp.get("run_workflow"):
            out += ["", f"py-spy on the worker (wall clock, waiting included) over {wp['jobs']} more jobs after the "
                    "measurement; share of the job thread's samples under `run_workflow` (the GPU's own execution is "
                    "inside `events`):", "", "| in the worker's job | file | % |", "|---|---|---|"]
            out += [f"| {'&nbsp;' * 4 * r['level']}{r['function']} | {r['file']} | {r['pct']} |" for r in wp["run_workflow"]]
    c = figs.get("cancel")
    if c and c.get("met") is False and "worst" in c:
        out += ["", f"**Cancel.** Worst stage: {STAGES.get(c['worst']['stage'], c['worst']['stage'])}, p95 "
                f"{c['worst']['p95_ms']} ms (direct client: {c['baseline']['ms'].get('running_sim', {}).get('p95')} ms to stop a "
                f"running prompt). The interrupt's arrival at ComfyUI, p95 {c['stages_ms']['running_interrupt']['p95']} ms, "
                "is the service's way there (API → pub/sub → worker's canceller → /interrupt naming the prompt); then "
                "ComfyUI finishes its current step (the direct client waits for that too); from its stop to the API "
                f"showing it, p50 {c['stages_ms']['running_api']['p50'] - c['stages_ms']['running_sim']['p50']:.2f} ms, is "
                "the way back (websocket → the worker's job thread → `cancel_run` → the API's wake → the answer)."]
    d = figs.get("dispatch")
    if d and d.get("met") is False and "nominal" in d:
        runs, speeds = d["runs"], d["series"]["speeds"]
        share = [round(v / sum(speeds) * d["setup"]["jobs"]) for v in speeds]
        parts = []
        for pattern, ratio in d["value"]["ratio_to_lower_bound"].items():
            others = {k.split("/")[0]: r["ratio"] for k, r in runs.items() if k.endswith("/" + pattern)
                      and not k.startswith("expected_finish/")}
            r = runs[f"expected_finish/{pattern}"]
            parts.append(f"{pattern}: {ratio} × the bound, {d['nominal']['ratios'][f'expected_finish/{pattern}']} × the "
                         "nominal bound (baselines " + ", ".join(f"{k} {v}" for k, v in others.items())
                         + f"), jobs per GPU {r['jobs_per_gpu']}, last result {r['makespan_s']} s, last GPU busy end "
                         f"{r['gpu_makespan_s']} s")
        out += ["", "**Dispatch.** " + "; ".join(parts) + f". A split of the jobs by speed alone would be {share}. "
                "The bound is each GPU's cost measured alone, before the runs; during the runs the API and the caller "
                "share the cores, and the time from the last GPU end to the result being recorded is in the makespan "
                "but not in the bound. The costs the simulators showed during the runs, and what the workers had "
                "learned, are in the figure's section."]
    bl = figs.get("backlog")
    if bl and bl.get("met") is False and "backlog" in bl:
        full, empty = bl["backlog"]["redis_us_by_command"], bl["baseline"]["redis_us_by_command"]
        out += ["", "**Submit cost against the backlog.** Redis µs per submit by command, with the backlog vs without: "
                + ", ".join(f"`{k}` {v} vs {empty.get(k, 0)}" for k, v in full.items())
                + f"; POST latency p50 {bl['backlog']['latency_ms']['p50']} vs {bl['baseline']['latency_ms']['p50']} ms."]
    o = figs.get("overhead_real")
    if o and o.get("met") is False and "phases_ms" in o:
        ph, fl = o["phases_ms"], o["floor_phases_ms"]
        out += ["", f"**{o['title']}** ({o['comfyui']['url']}). Beyond the floor at the median: POST /generate "
                f"+{ph['POST /generate']['p50'] - fl['submit']['p50']:.1f} ms, 202 → ComfyUI's queue "
                f"+{ph['to ComfyUI queue']['p50']:.1f} ms, ComfyUI's end → visible "
                f"+{ph['end → visible']['p50'] - fl['end → outputs']['p50']:.1f} ms (the phases are in its section)."]
    for name in ("idle", "progress", "idle_real"):
        f = figs.get(name)
        if f and f.get("met") is False:
            out += ["", f"**{f['title']}.** Missed: {f['line']}"]
    return out or ["Every goal was met in this run."]


def commands(f: dict, docs: Path) -> list[str]:
    v = f["value"]
    rows = ["| who | commands | goal |", "|---|---|---|",
            f"| GPU worker, per job (beyond progress and outputs) | {v['worker_per_job']} | ≤ {f['goals']['worker_per_job']} |",
            f"| GPU worker, per stored image | {v['per_image']} | ≤ {f['goals']['per_image']} |",
            f"| GPU worker, per progress update | {v['per_progress']} | ≤ {f['goals']['per_progress']} |",
            f"| the worker's log writer, per job (batched across jobs) | {v['worker_log_commands_per_job']} | – |",
            f"| the API, per job (submit) | {v['api_per_job']} | – |",
            f"| Celery's transport, per job (naming the job) | {v['celery_transport_per_job']} | – |"]
    per = ", ".join(f"`{k}` {n}" for k, n in v["worker_job_commands"].items())
    return [*rows, "", f"{f['jobs']} jobs one after another, {f['progress_updates']} progress updates and "
            f"{f['outputs']} outputs in their event logs (the baseline of what had to be written). The worker's "
            f"per-job commands: {per}."]


def memory(f: dict, docs: Path) -> list[str]:
    v = f["value"]
    rows = ["| one job (the last submitted) | key | bytes |", "|---|---|---|"]
    for stage, parts in v["one_job"].items():
        rows += [f"| {stage} | {name} | {size:,} |" for name, size in parts.items()]
    sizing = []
    if v.get("sizing"):  # docs/deploy.md sizes Redis from these lines and types no bytes of its own
        sizing = ["", "Redis sizing from these bytes (`docs/deploy.md`), before log lists beyond the simulator's and "
                  "the fleet's own keys:", "", "| Redis holds | MiB |", "|---|---|"]
        sizing += [f"| {r['what']} | {r['bytes'] / 2**20:,.0f} |" for r in v["sizing"]]
    return [f"Per job over {v['jobs']} StoryDiffusion jobs (2 characters, 4 scenes, 768×768), `used_memory` after "
            f"less before: waiting {v['waiting_bytes']:,} B (goal ≤ {f['goals']['waiting_bytes']:,}); finished, "
            f"while its event log is kept (`EVENTS_TTL`) {v['finished_with_event_log_bytes']:,} B; finished, for "
            f"`RESULT_TTL` {v['finished_bytes']:,} B (goal ≤ {f['goals']['finished_bytes']:,}).", "", *rows, *sizing]


def backlog(f: dict, docs: Path) -> list[str]:
    e, b, sd, st = f["baseline"], f["backlog"], f["seeded"], f["setup"]

    def row(name, p):
        lat = p["latency_ms"]
        return (f"| {name} | {p['waiting_after']:,} | {lat['p50']:.2f} | {lat['mean']:.2f} | {lat['p95']:.2f} | "
                f"{p['redis_us_scripts']:.1f} | {p['redis_us_all']:.1f} |")
    rows = ["| phase | jobs waiting at its end | POST ms p50 | mean | p95 | Redis µs per submit: scripts | all commands |",
            "|---|------|---|---|---|---|---|", row("empty backlog", e), row(f"{sd['jobs']:,} seeded", b),
            "| **ratio** | | **" + f"{f['value']['latency_p50']:.2f}** | **{f['value']['latency_mean']:.2f}** | | **"
            f"{f['value']['redis_scripts']:.2f}** | **{f['value']['redis_all']:.2f}** |"]
    top = ", ".join(f"`{k}` {v} µs" for k, v in b["redis_us_by_command"].items())
    return [f"{st['submits_per_phase']} submits per phase ({st['caller']}; {st['body']}) to {st['api']}; worker: "
            f"{st['worker']}. Between the phases {sd['jobs']:,} waiting jobs were created by {sd['how']} (the submit "
            f"transition's own code, not HTTP; no Celery message) in {sd['seconds']} s; Redis then used "
            f"{sd['redis_used_memory_mib']} MiB. Redis time is its own (`INFO commandstats` usec).", "", *rows, "",
            f"Redis time per submit by command with the backlog: {top}."]


def autoscale(f: dict, docs: Path) -> list[str]:
    fleets = f["fleets"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.4))
    for fl in fleets:  # GPUs up over the day, from each GPU's start and stop
        edges = sorted([(sp["start"], 1) for sp in fl["spans"]] + [(sp["stop"], -1) for sp in fl["spans"] if sp["stop"] is not None])
        t, n, xs, ys = 0.0, 0, [0.0], [0]
        for t, step in edges:
            xs += [max(t, 0.0), max(t, 0.0)]
            ys += [n, n + step]
            n += step
        xs.append(fl["day_seconds"])
        ys.append(n)
        a.plot(xs, ys, label=fl["fleet"])
    a.set(xlabel="seconds into the day", ylabel="GPUs up", title="Fleet size over the day")
    a.legend(fontsize=8)
    names = [fl["fleet"] for fl in fleets]
    b.bar(names, [fl["wait_s"]["p95"] for fl in fleets])
    b.set(ylabel="s", title="p95 wait (submit → ComfyUI started it)")
    img = _save(fig, docs, "perf-autoscale.png")
    rows = ["| fleet | jobs | wait p50 / p95 / max s | GPU-seconds | GPUs started | measured cold start s | "
            "GPU start → its first job s |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {fl['fleet']} | {fl['jobs']} | {fl['wait_s']['p50']} / {fl['wait_s']['p95']} / {fl['wait_s']['max']} | "
             f"{fl['gpu_seconds']} | {fl['gpus_started']} | {fl.get('measured_cold_start_s') or '–'} | "
             f"{fl.get('start_to_first_job_s') or '–'} |" for fl in fleets]
    setup, plan = f["setup"], f["setup"]["day"]
    return [*rows, "", img, "",
            f"The day, scaled down ({setup['scaled_down']}): {plan['burst']} jobs at {plan['burst_at']:g} s, "
            f"{len(plan['trickle'])} more from {plan['trickle'][0]:g} s to {plan['trickle'][-1]:g} s, idle until "
            f"{plan['length']:g} s (or until the last job started, if later). Jobs: {setup['job']}. Cold start: "
            f"{setup['cold_start']}. Scaling: " + ", ".join(f"{k} {v:g}" for k, v in setup["scaling"].items()) + ". "
            "Each fleet ran the same day for real, one after another; GPU-seconds count each GPU's time up within "
            "the day (a fixed fleet pays all of it; the autoscaled fleet's GPU of the warm-up before the day is not "
            "counted). Measured cold start: the fleet's (median of its GPUs' heartbeats: process start to ComfyUI "
            "answering, plus the first model load); GPU start → its first job: the median over the GPUs started "
            "within the day, their pair's start to their first job starting in ComfyUI (the model load comes after)."]


SECTIONS = {"autoscale": autoscale, "commands": commands, "memory": memory, "overhead": overhead, "idle": idle,
            "overhead_real": overhead_real, "idle_real": idle_real,
            "dispatch": dispatch, "cancel": cancel, "throughput": throughput, "progress": progress, "scale": scale,
            "backlog": backlog}


def empty_results(host: dict) -> dict:
    """results.json's shape with no figure measured (a chaos run before any `python -m bench`)."""
    from datetime import datetime, timezone

    return {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": False, "ran": [],
            "run_seconds": 0.0, "load_avg_before": 0.0, "host": host, "figures": {}}


def chaos_section(c: dict) -> list[str]:
    """`make chaos` (bench/chaos.py): issue 14's bar, what broke it, and the evidence."""
    p = c["plan"]
    verdict = "met" if c["verdict"] == "met" else "**MISSED**"
    faults = ["| # | fault | target | at s | back s |", "|---|---|---|---|---|"]
    faults += [f"| {k + 1} | {e['fault']} | {e.get('target') or e.get('skipped') or e.get('error')} | {e['at']} | "
               f"{e.get('restored', 'skipped' if 'skipped' in e else 'error')} |" for k, e in enumerate(c["faults"])]
    never = [s for s in c["stuck"] if s["final_after_s"] is None]
    rows = ["| | jobs |", "|---|---|",
            f"| accepted (202) | {c['accepted']} |",
            f"| refused | {sum(c['refused'].values())}" + "".join(
                f"; {k}: {v}" + (" (sent +{}…+{} s)".format(*c["refused_when_s"][k]) if k in c.get("refused_when_s", {}) else "")
                for k, v in c["refused"].items()) + " |",
            f"| refused or unanswered, but queued anyway | {c['refused_but_queued'] + c['accepted_without_answer']} |",
            f"| succeeded | {c['succeeded']} |",
            f"| failed | {sum(c['failed'].values())}" + "".join(f"; {k}: {v}" for k, v in c["failed"].items()) + " |",
            f"| **lost** (record gone) | {len(c['lost'])} |",
            f"| **stuck** (not final by the deadline) | {len(c['stuck'])}, of which never final: {len(never)} |",
            f"| **duplicated** (needless second run, or second result set) | {len(c['duplicated'])} |",
            f"| every job final after the last fault | "
            f"{'%.1f s' % c['recovery_s'] if c['recovery_s'] is not None else 'never'} (deadline "
            f"{c['deadline_s'] - c['last_fault_s']:.1f} s: 60 s + {c['run_time_allowance_s']} s of GPU work left) |"]
    sub = c["submit"]
    lines = [f"{verdict}: {c['summary']}", "",
             f"Measured {c['measured_at']}{' (reduced: --quick)' if c.get('quick') else ''}, {c['seconds']:.0f} s; "
             f"other processes used {c.get('foreign_cpu_cores', '–')} cores meanwhile. {p['jobs']} jobs on {p['gpus']} "
             f"simulated GPUs ({p['step_seconds'] * 1000:g} ms per step), {p['rate_per_s']:g} submissions/s, "
             f"{p['api_processes']} API processes; settings {', '.join(f'{k}={v}' for k, v in p['settings'].items())}. "
             "How each verdict is decided: `tests/support/chaos.py`.", "", *rows, "", *faults, "",
             f"POST /generate: p50 {sub['p50_ms']} ms, p99 {sub['p99_ms']} ms, max {sub['max_ms']} ms. "
             + " ".join(f"Redis restart: {r['sent_while_down']} submissions sent while it was down "
                        f"({r['of_them_202']} answered 202, slowest answer {r['slowest_answer_while_down_ms']} ms); "
                        f"first 202 to a request sent after it came back: {r['first_202_after_s']} s after."
                        for r in sub["after_redis_restart"]),
             "", "GPU executions (simulators' journals): "
             + ", ".join(f"{k} {v}" for k, v in c["gpu_executions"].items()) + "."]
    if c.get("problems"):
        lines += ["", "What broke the bar: " + "; ".join(c["problems"]) + "."]
    if c["stuck"]:
        lines += ["", "Stuck jobs (first 10):", "", "| task | state | attempts | worker alive / owner / in its heartbeat "
                  "| Celery message waiting / unacked | its prompt | final later |", "|---|---|---|---|---|---|---|"]
        lines += [f"| `{s['task_id'][:8]}` | {s.get('state', '–')} | {s.get('attempts', '–')} | "
                  + (f"{s['worker_alive']} / {s['worker_is_owner']} / {s['in_worker_heartbeat']} | "
                     f"{s['celery_messages_waiting']} / {s['celery_messages_unacked']} | {s['prompt_in_simulator']} | no |"
                     if s["final_after_s"] is None else f"– | – | – | {s['final_status']} at +{s['final_after_s']} s |")
                  for s in c["stuck"][:10]]
    if c["duplicated"]:
        lines += ["", "Duplicated jobs (first 10):", "", "| task | status | executions | attempt log | faults meanwhile |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{d['task_id'][:8]}` | {d['status']} | {'; '.join(d['executions'])} | "
                  f"{', '.join(d['attempt_log']) or '–'} | {'; '.join(d['faults_between']) or '–'} |"
                  for d in c["duplicated"][:10]]
    if c["log_signals"]:
        lines += ["", "Worker log lines counted: " + "; ".join(
            f"{k}: " + ", ".join(f"{proc} {n}" for proc, n in v.items()) for k, v in c["log_signals"].items()) + "."]
    return lines


def write(results: dict, docs: Path, chaos: dict | None = None) -> Path:
    """`chaos`: the last `make chaos` result (bench/chaos.json), shown in its own section."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    figs, host = results["figures"], results["host"]
    lines = ["# Performance", "",
             f"Written by `python -m bench` ({'**quick** smoke run, not a measurement; ' if results['quick'] else ''}"
             f"{results['generated_at']}, {results['run_seconds']:.0f} s for {', '.join(results['ran'])}) on "
             f"{host['cpus']} CPUs, {host['memory_gib']} GiB, Python {host['python']}, {host['platform']}; load average "
             f"{results['load_avg_before']:.2f} before the run. Do not edit: the next run rewrites this file from "
             "`bench/results.json`. Method and how to run: `bench/README.md`. Every process (Redis, simulators, workers, "
             "gunicorn, load generator) shares the same cores, so each figure includes that contention.", "",
             "The last column gives the CPU that processes outside the benchmark used meanwhile (cores, of 2).", "",
             "| # | figure | result | goal | verdict | measured | other load |", "|---|---|---|---|---|---|---|"]
    for name, n in ORDER:
        if name in figs:
            f = figs[name]
            lines.append(f"| {n} | [{f['title']}](#{n}-{f['title'].lower().replace(' ', '-')}) | {f['line']} | "
                         f"{_goal(name, f)} | {_verdict(f)} | {f['measured_at']}{' (quick)' if f.get('quick') else ''}, "
                         f"{f['seconds']:.0f} s | {f.get('foreign_cpu_cores', '–')} |")
    lines += ["", "## Where goals are missed", "", *bottlenecks(results)]
    for name, n in ORDER:
        if name not in figs:
            continue
        f = figs[name]
        lines += ["", f"## {n}. {f['title']}", ""]
        if "error" in f:
            lines += [f"The figure failed in this run: `{f['error']}`"]
            continue
        try:
            section = SECTIONS[name](f, docs)
        except (KeyError, TypeError):  # kept from a run of an older benchmark (`python -m bench FIGURE` reruns one)
            section = ["This figure's results were written by an older version of the benchmark: rerun it "
                       f"(`python -m bench {name}`) for its details."]
        lines += [f"{_verdict(f)}: {f['line']}", "", *section]
    if chaos:
        lines += ["", "## Chaos (`make chaos`)", "", *chaos_section(chaos)]
    path = docs / "performance.md"
    path.write_text("\n".join(lines) + "\n")
    return path
