"""Figure 2 on a real ComfyUI (`--comfyui-url`): how long it idles between prompts under a backlog.

The `idle` method on the named server: a backlog of jobs goes in through the API at once (4
callers), through a worker driving that ComfyUI; the baseline, in the same run, is the same
number of graphs put straight into ComfyUI's own queue with the client. A gap is one prompt's
end → the next prompt's start as ComfyUI stamps them in its history (execution_success →
execution_start, epoch ms: bench/real.py), so it includes ComfyUI's own hand-over (writing the
history entry, taking the next item) in both, and is known to 1 ms.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from bench import real
from bench.harness import stack, summary
from bench.idle import GOAL_MEDIAN_MS
from workers.comfy_client import ComfyClient


def _gaps(ran: dict[str, dict], prompts) -> list[float]:
    spans = sorted((ran[p] for p in prompts), key=lambda r: r["start"])
    return [b["start"] - a["end"] for a, b in zip(spans, spans[1:])]


def run(quick: bool = False, comfyui_url: str | None = None) -> dict:
    if not comfyui_url:
        raise ValueError("idle_real needs a ComfyUI: --comfyui-url URL")
    jobs = 12 if quick else 80
    server = real.describe(comfyui_url)
    with stack("idle-real", **real.ENV) as s:
        s.worker(comfyui_url)
        s.api()
        s.ready()
        s.wait_records([s.submit(real.body(0))["task_id"]])  # warm: first prompt, worker connected
        with ComfyClient(comfyui_url, timeout=10) as client:
            # Baseline: ComfyUI's own queue, filled directly.
            direct = [client.submit(real.graph(1 + n, f"idle_base_{n}")).prompt_id for n in range(jobs)]
            for prompt_id in direct:
                client.wait(prompt_id, timeout=60)
            # The service: a backlog submitted by 4 callers at once.
            with ThreadPoolExecutor(4) as pool:
                tasks = list(pool.map(lambda n: s.submit(real.body(1 + jobs + n))["task_id"], range(jobs)))
            records = s.wait_records(tasks, timeout=60 + jobs)
            failed = [r["status"] for r in records if r["status"] != "succeeded"]
            if failed:
                raise RuntimeError(f"{len(failed)} backlog jobs did not succeed: {failed[:3]}")
            through = [r["prompt_id"] for r in records]
            ran = real.spans(client, direct + through)
    service, base = _gaps(ran, through), _gaps(ran, direct)
    s_sum, b_sum = summary(service, digits=3), summary(base, digits=3)
    execution = summary([r["end"] - r["start"] for r in ran.values()])
    diff = round(s_sum["p50"] - b_sum["p50"], 3)
    return {
        "title": "GPU idle gap under backlog on a real ComfyUI",
        "line": (f"ComfyUI {server['comfyui_version']}: median gap {s_sum['p50']:.0f} ms (p95 {s_sum['p95']:.0f}, max "
                 f"{s_sum['max']:.0f} ms), {diff:+.0f} ms vs ComfyUI fed directly ({b_sum['p50']:.0f} ms); from "
                 f"ComfyUI's ms timestamps; goal median ≤ {GOAL_MEDIAN_MS:g} ms"),
        "value": {"median_ms": s_sum["p50"], "p95_ms": s_sum["p95"], "max_ms": s_sum["max"], "vs_baseline_ms": diff},
        "goal": f"median ≤ {GOAL_MEDIAN_MS:g} ms",
        "met": s_sum["p50"] <= GOAL_MEDIAN_MS,
        "comfyui": server,
        "baseline": {"name": "the same number of graphs in ComfyUI's own queue (ComfyClient), same ComfyUI", "ms": b_sum},
        "service_ms": s_sum,
        "execution_ms": execution,
        "setup": {"jobs": jobs, "workflow": real.WORKFLOW, "timing": real.TIMING,
                  "worker": "WORKER_CONCURRENCY=2 (default)", "submit": "4 concurrent callers"},
        "series": {"service_ms": [round(g * 1000, 3) for g in service], "baseline_ms": [round(g * 1000, 3) for g in base]},
    }
