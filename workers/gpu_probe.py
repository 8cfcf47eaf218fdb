"""GPU and host statistics for a worker's heartbeat.

`GpuProbe(gpu_index).read()` answers from the first source that works, in this order:

* ``nvml``    - nvidia-ml-py (``import pynvml``), when installed; initialised once, fast.
* ``gputil``  - GPUtil, which runs ``nvidia-smi`` on every call.
* ``comfyui`` - the ComfyUI server's ``/system_stats`` devices (VRAM only: ComfyUI reports
                no utilisation or temperature, so those stay None).
* ``none``    - nothing answered; ``reason`` says why.

``read()`` never raises: each failure becomes the next source's ``reason``. Memory is in MiB,
nvidia-smi's unit. ``GpuStats.index`` is the device's index as its source numbers it.

Which GPU: ``gpu_index`` is the worker's GPU_INDEX, a CUDA device ordinal. NVML and nvidia-smi
ignore CUDA_VISIBLE_DEVICES, so with it set, index N means its N-th entry: an integer entry is
taken as the nvidia-smi/NVML index (exact when CUDA_DEVICE_ORDER=PCI_BUS_ID, which is also what
CUDA does on a machine of identical GPUs), a ``GPU-...`` entry as a UUID prefix. MIG entries
cannot be mapped to a whole GPU and leave only the ComfyUI source.

``python -m workers.gpu_probe [--index N] [--comfyui URL] [--prefer SOURCE]`` prints
``{"gpu": ..., "host": ...}`` as one JSON object, and which source answered on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import psutil

SOURCES = ("nvml", "gputil", "comfyui")
MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuStats:
    available: bool
    source: str                      # "nvml" | "gputil" | "comfyui" | "none"
    index: int | None = None
    name: str | None = None
    uuid: str | None = None
    utilization: float | None = None  # percent, 0-100
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    memory_free_mb: float | None = None
    temperature_c: float | None = None
    reason: str | None = None        # why not available, or why an earlier source was passed over

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HostStats:
    cpu_percent: float
    ram_used_mb: float
    ram_total_mb: float
    load_avg_1m: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def host_stats() -> HostStats:
    """CPU, RAM and load of this machine. cpu_percent covers the time since the previous call
    (psutil's interval=None), so the first call in a process reads 0.0."""
    vm = psutil.virtual_memory()
    try:
        load: float | None = psutil.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    # "Used" as total - available: what new processes could not get, page cache excluded.
    return HostStats(cpu_percent=psutil.cpu_percent(interval=None), ram_used_mb=(vm.total - vm.available) / MIB,
                     ram_total_mb=vm.total / MIB, load_avg_1m=load)


class _Unavailable(Exception):
    """One source could not answer; the message becomes part of GpuStats.reason."""


def resolve_device(gpu_index: int, cuda_visible_devices: str | None) -> int | str:
    """The nvidia-smi/NVML index (int) or UUID prefix (str) that CUDA ordinal `gpu_index` names."""
    if cuda_visible_devices is None:
        return gpu_index
    visible: list[int | str] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if entry.isdigit():
            visible.append(int(entry))
        elif entry.startswith("GPU-"):
            visible.append(entry.lower())
        elif entry.startswith("MIG-"):
            raise ValueError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} names MIG instances, "
                             "which NVML/nvidia-smi cannot map to a whole GPU")
        else:
            break  # CUDA itself ignores everything from the first invalid entry on (e.g. "-1")
    if not 0 <= gpu_index < len(visible):
        raise ValueError(f"GPU index {gpu_index} is not visible with CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}")
    return visible[gpu_index]


def _matches(target: int | str, index: int, uuid: str) -> bool:
    return index == target if isinstance(target, int) else uuid.lower().startswith(target)


def _number(value) -> float | None:
    """A float, or None for what the source could not measure (GPUtil turns "[Not Supported]" into NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Call:
    """One call on a daemon thread, so a hung nvidia-smi cannot hang the heartbeat (GPUtil has no timeout)."""

    def __init__(self, fn: Callable):
        self.started = time.monotonic()
        self.done = threading.Event()
        self.result = self.error = None
        threading.Thread(target=self._run, args=(fn,), name="gpu-probe-nvidia-smi", daemon=True).start()

    def _run(self, fn: Callable) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who turns it into a reason
            self.error = exc
        finally:
            self.done.set()


class GpuProbe:
    """Reads one GPU's stats; cheap enough for a heartbeat every few seconds. One reader thread."""

    def __init__(self, gpu_index: int, comfy_stats: Callable[[], dict] | None = None, prefer: str = "auto",
                 *, recheck_s: float = 60.0, smi_timeout_s: float = 5.0):
        if prefer != "auto" and prefer not in SOURCES:
            raise ValueError(f"prefer must be 'auto' or one of {SOURCES}, not {prefer!r}")
        self.gpu_index = gpu_index
        self.comfy_stats = comfy_stats
        self.sources = SOURCES if prefer == "auto" else (prefer,)
        self.recheck_s = recheck_s          # how long a missing NVML / nvidia-smi is believed
        self.smi_timeout_s = smi_timeout_s
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            self._target: int | str | None = resolve_device(gpu_index, cvd)
            self._target_error = None
        except ValueError as exc:
            self._target, self._target_error = None, str(exc)
        self._down: dict[str, tuple[float, str]] = {}  # source -> (retry after, reason)
        self._nvml = None
        self._nvml_handle = None
        self._smi_call: _Call | None = None

    def read(self) -> GpuStats:
        reasons = []
        for source in self.sources:
            try:
                return getattr(self, f"_read_{source}")(reasons)
            except _Unavailable as exc:
                reasons.append(f"{source}: {exc}")
            except Exception as exc:  # noqa: BLE001 - a heartbeat must never die on a probe
                reasons.append(f"{source}: {type(exc).__name__}: {exc}")
        return GpuStats(available=False, source="none", reason="; ".join(reasons) or None)

    # -- sources: each returns GpuStats or raises ------------------------------------------------
    def _physical_target(self) -> int | str:
        if self._target is None:
            raise _Unavailable(self._target_error)
        return self._target

    def _check_down(self, source: str) -> None:
        retry_at, reason = self._down.get(source, (0.0, ""))
        if time.monotonic() < retry_at:
            raise _Unavailable(reason)

    def _mark_down(self, source: str, reason: str) -> _Unavailable:
        self._down[source] = (time.monotonic() + self.recheck_s, f"{reason} (rechecked every {self.recheck_s:g} s)")
        return _Unavailable(reason)

    def _read_nvml(self, reasons: list[str]) -> GpuStats:
        target = self._physical_target()
        self._check_down("nvml")
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise self._mark_down("nvml", "pynvml (nvidia-ml-py) is not installed") from None
            try:
                pynvml.nvmlInit()  # once per process; NVML keeps its own state until shutdown
            except pynvml.NVMLError as exc:
                raise self._mark_down("nvml", f"NVML did not initialise: {exc}") from None
            self._nvml = pynvml
        nv = self._nvml
        try:
            if self._nvml_handle is None:
                self._nvml_handle = self._nvml_find(target)
            handle = self._nvml_handle
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            index, uuid = nv.nvmlDeviceGetIndex(handle), _text(nv.nvmlDeviceGetUUID(handle))
            name = _text(nv.nvmlDeviceGetName(handle))
        except nv.NVMLError as exc:
            self._nvml_handle = None  # e.g. the GPU fell off the bus: look it up afresh next time
            raise _Unavailable(f"NVML: {exc}") from None
        return GpuStats(
            available=True, source="nvml", index=index, name=name, uuid=uuid,
            utilization=self._nvml_optional(lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu),
            memory_used_mb=memory.used / MIB, memory_total_mb=memory.total / MIB, memory_free_mb=memory.free / MIB,
            temperature_c=self._nvml_optional(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
            reason="; ".join(reasons) or None)

    def _nvml_find(self, target: int | str):
        nv = self._nvml
        if isinstance(target, int):
            return nv.nvmlDeviceGetHandleByIndex(target)
        for i in range(nv.nvmlDeviceGetCount()):  # a UUID prefix, as CUDA_VISIBLE_DEVICES allows
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            if _matches(target, i, _text(nv.nvmlDeviceGetUUID(handle))):
                return handle
        raise _Unavailable(f"no GPU with UUID {target}*")

    def _nvml_optional(self, fn: Callable) -> float | None:
        try:  # utilisation/temperature are "not supported" on some parts (e.g. MIG): None, not 0
            return _number(fn())
        except self._nvml.NVMLError:
            return None

    def _read_gputil(self, reasons: list[str]) -> GpuStats:
        target = self._physical_target()
        self._check_down("gputil")
        if shutil.which("nvidia-smi") is None:  # GPUtil would say "no GPUs", which hides why
            raise self._mark_down("gputil", "nvidia-smi not found on PATH")
        gpus = self._gputil_gpus()
        if not gpus:
            raise _Unavailable("nvidia-smi listed no GPUs")
        gpu = next((g for g in gpus if _matches(target, g.id, g.uuid)), None)
        if gpu is None:
            raise _Unavailable(f"nvidia-smi lists no GPU {target} (has {[g.id for g in gpus]})")
        load = _number(gpu.load)
        return GpuStats(
            available=True, source="gputil", index=gpu.id, name=gpu.name, uuid=gpu.uuid,
            utilization=None if load is None else load * 100,  # GPUtil's load is 0..1
            memory_used_mb=_number(gpu.memoryUsed), memory_total_mb=_number(gpu.memoryTotal),
            memory_free_mb=_number(gpu.memoryFree), temperature_c=_number(gpu.temperature),
            reason="; ".join(reasons) or None)

    def _gputil_gpus(self) -> list:
        call = self._smi_call
        if call is None:
            with warnings.catch_warnings():  # GPUtil 1.4 imports distutils
                warnings.simplefilter("ignore", DeprecationWarning)
                import GPUtil
            call = self._smi_call = _Call(GPUtil.getGPUs)
            call.done.wait(self.smi_timeout_s)
        if not call.done.is_set():  # still hung: report it, and do not pile up more nvidia-smi processes
            raise _Unavailable(f"nvidia-smi has not answered for {time.monotonic() - call.started:.0f} s")
        self._smi_call = None
        if call.error is not None:  # GPUtil does not check the exit code; garbage output fails its parsing
            raise _Unavailable(f"could not parse nvidia-smi output ({type(call.error).__name__}: {call.error})")
        return call.result

    def _read_comfyui(self, reasons: list[str]) -> GpuStats:
        if self.comfy_stats is None:
            raise _Unavailable("no ComfyUI to ask")
        devices = self.comfy_stats().get("devices") or []
        gpus = [d for d in devices if d.get("type") != "cpu"]
        device = next((d for d in gpus if d.get("index") == self.gpu_index), gpus[0] if gpus else None)
        if device is None:
            why = "ComfyUI runs on CPU" if devices else "ComfyUI reported no devices"
            return GpuStats(available=False, source="comfyui", reason="; ".join([*reasons, why]))
        name = str(device.get("name", ""))
        # ComfyUI names a CUDA device "cuda:0 <GPU name> : <allocator>"; keep the GPU's own name.
        plain = re.fullmatch(r"cuda:\d+ (.+) : \S+", name)
        total, free = _number(device.get("vram_total")), _number(device.get("vram_free"))
        return GpuStats(
            available=True, source="comfyui", index=device.get("index"), name=plain.group(1) if plain else name,
            memory_total_mb=None if total is None else total / MIB,
            memory_free_mb=None if free is None else free / MIB,
            memory_used_mb=None if total is None or free is None else (total - free) / MIB,
            reason="; ".join(reasons) or None)


def _comfy_fetcher(url: str) -> Callable[[], dict]:
    import requests

    def fetch() -> dict:
        response = requests.get(url.rstrip("/") + "/system_stats", timeout=5)
        response.raise_for_status()
        return response.json()
    return fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.gpu_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=int, default=int(os.environ.get("GPU_INDEX", "0")),
                        help="the worker's GPU index (default: $GPU_INDEX or 0)")
    parser.add_argument("--comfyui", metavar="URL", help="ComfyUI base URL, used when no NVIDIA source answers")
    parser.add_argument("--prefer", default="auto", choices=("auto", *SOURCES))
    args = parser.parse_args(argv)
    probe = GpuProbe(args.index, _comfy_fetcher(args.comfyui) if args.comfyui else None, args.prefer)
    host_stats()  # prime psutil's cpu_percent so the reading below covers a real interval
    gpu = probe.read()
    time.sleep(0.2)
    print(json.dumps({"gpu": gpu.as_dict(), "host": host_stats().as_dict()}, indent=2))
    print(f"gpu_probe: source={gpu.source} available={gpu.available} index={gpu.index} name={gpu.name!r}"
          + (f" reason={gpu.reason!r}" if gpu.reason else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
