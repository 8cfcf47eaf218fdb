"""A stand-in for nvidia-ml-py, put on the GPU workers' PYTHONPATH by bench/dispatch.py only.

The simulators report no GPU utilisation (ComfyUI's /system_stats has none), so on a simulated
fleet the "0.7·GPU + 0.3·CPU" baseline would see 0 % everywhere. This module answers the calls
`workers/gpu_probe.py` makes to NVML, utilisation being the share of the last second the worker's
simulator (COMFYUI_URL) was executing a prompt, as NVML reports the share of its last sample
period with a kernel running. The probe's own NVML code path is what reads it.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import requests

NVML_TEMPERATURE_GPU = 0
WINDOW_S = 1.0
_TOTAL = 24 * 2**30


class NVMLError(Exception):
    pass


def nvmlInit() -> None:
    if not os.environ.get("COMFYUI_URL"):
        raise NVMLError("no COMFYUI_URL: no simulator to read")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(index: int):
    return SimpleNamespace(index=index)


def nvmlDeviceGetIndex(handle) -> int:
    return handle.index


def nvmlDeviceGetUUID(handle) -> str:
    return f"GPU-sim-{handle.index}"


def nvmlDeviceGetName(handle) -> str:
    return "ComfyUI simulator"


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(total=_TOTAL, used=0, free=_TOTAL)


def nvmlDeviceGetTemperature(handle, sensor) -> int:
    return 40


def nvmlDeviceGetUtilizationRates(handle):
    try:
        record = requests.get(os.environ["COMFYUI_URL"].rstrip("/") + "/sim/record", timeout=2).json()
    except (requests.RequestException, ValueError) as exc:
        raise NVMLError(str(exc)) from None
    now = time.time()
    since = now - WINDOW_S
    spans = [(b["start"], b["end"]) for b in record.get("busy", [])[-50:]]
    if record.get("running"):
        spans.append((record["running"]["start"], now))
    busy = sum(max(0.0, min(end, now) - max(start, since)) for start, end in spans)
    return SimpleNamespace(gpu=round(100 * min(busy / WINDOW_S, 1.0)), memory=0)
