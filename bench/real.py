"""What the figures run on a real ComfyUI share (`python -m bench --comfyui-url URL`, issue 16).

The simulator's hand-over is not ComfyUI's, so `overhead` and `idle` can also run against a
ComfyUI the caller names. Such a server has no busy record: a prompt's execution is read from
its own history, whose status messages carry `timestamp` (epoch ms, `int(time.time() * 1000)` in
ComfyUI's executor): `execution_start` when its executor takes the prompt, `execution_success`
(or `_error`/`_interrupted`) when the prompt is done, before the history entry is written.
`extra_data.create_time` (same clock) is when `POST /prompt` put it in the queue. On one host
these are this process's clock too, at 1 ms resolution.

The workflow needs no model, so it runs on any ComfyUI, CPU-only ones included: core nodes
EmptyImage → SaveImage sent through the service's raw-workflow path (ALLOW_RAW_WORKFLOWS). Each
job gets its own colour, so ComfyUI's cache never skips a node and every prompt executes both.
"""
from __future__ import annotations

from workers.comfy_client import ComfyClient

SIZE = 1024  # ≈ 30 ms of PNG encoding per prompt on this machine's CPU: long enough to queue behind
WORKFLOW = f"raw graph EmptyImage {SIZE}² → SaveImage (core nodes, no model), a colour per job"
# The API's settings for these figures: raw graphs on, only the two nodes allowed.
ENV = {"ALLOW_RAW_WORKFLOWS": "true", "RAW_NODE_ALLOWLIST": "EmptyImage,SaveImage"}
TIMING = ("ComfyUI's history: execution_start → execution_success timestamps (epoch ms, 1 ms resolution), "
          "queued at extra_data.create_time")
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


def graph(n: int, prefix: str = "bench_real") -> dict:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1, "color": n % 0xFFFFFF}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def body(n: int) -> dict:
    """The service's request for job n (the service replaces filename_prefix with its own)."""
    return {"workflow": "raw", "graph": graph(n)}


def describe(url: str) -> dict:
    """Which ComfyUI the figure ran on, as its /system_stats says."""
    with ComfyClient(url, timeout=10) as client:
        stats = client.system_stats()
    device = stats.devices[0] if stats.devices else None
    return {"url": url, "comfyui_version": stats.comfyui_version, "pytorch": stats.pytorch_version,
            "python": (stats.python_version or "").split(" ")[0] or None,
            "device": f"{device.name} ({device.type})" if device else None}


def label(server: dict) -> str:
    return (f"ComfyUI {server['comfyui_version']} at {server['url']} (torch {server['pytorch']}, "
            f"{server['device']})")


def spans(client: ComfyClient, prompt_ids) -> dict[str, dict]:
    """prompt id → {queued, start, end} in epoch seconds, from each prompt's history entry."""
    out = {}
    for prompt_id in prompt_ids:
        entry = client.history(prompt_id)
        if entry is None:
            raise RuntimeError(f"ComfyUI has no history for prompt {prompt_id}")
        stamps = {kind: data.get("timestamp") for kind, data in entry.messages}
        end = next((stamps[k] for k in TERMINAL if stamps.get(k) is not None), None)
        if stamps.get("execution_start") is None or end is None:
            raise RuntimeError(f"prompt {prompt_id}: no start/end timestamps in its history ({list(stamps)})")
        created = entry.extra_data.get("create_time")
        out[prompt_id] = {"queued": created / 1000 if created is not None else None,
                          "start": stamps["execution_start"] / 1000, "end": end / 1000,
                          "status": entry.status_str}
    return out
