"""GpuProbe against real parts: GPUtil's own parsing of a fake `nvidia-smi` put first on PATH,
a real simulator's /system_stats, the real CLI as a subprocess, and psutil.

Tests that expect "no NVIDIA source" take nvidia-smi off PATH themselves; they are skipped
where pynvml is installed, since NVML would then rightly answer first.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.procs import REPO, free_port, wait_until
from workers.gpu_probe import GpuProbe, GpuStats, HostStats, host_stats, resolve_device

GIB_IN_MIB = 1024
no_nvml = pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None,
                             reason="pynvml is installed here, so NVML answers before the sources under test")

# Exactly what GPUtil 1.4.0 asks nvidia-smi for (GPUtil.getGPUs); the fake refuses anything else.
SMI_QUERY = ("--query-gpu=index,uuid,utilization.gpu,memory.total,memory.used,memory.free,driver_version,"
             "name,gpu_serial,display_active,display_mode,temperature.gpu")
UUID0 = "GPU-0a1b2c3d-0000-4000-8000-000000000000"
UUID1 = "GPU-9f8e7d6c-1111-4222-8333-444444444444"
# nvidia-smi --format=csv,noheader,nounits: ", "-separated, one line per GPU; unmeasurable fields read "[Not Supported]".
TWO_GPUS = (f"0, {UUID0}, [Not Supported], 81559, 1024, 80535, 550.54.15, NVIDIA H100 80GB HBM3, 1650000000001, "
            "Disabled, Enabled, [Not Supported]\n"
            f"1, {UUID1}, 87, 143771, 100000, 43771, 550.54.15, NVIDIA H200, 1650000000002, Disabled, Enabled, 61\n")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("GPU_INDEX", raising=False)


@pytest.fixture
def empty_path(tmp_path, monkeypatch) -> Path:
    """PATH holds one empty folder: no nvidia-smi, whatever this machine has."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    return bindir


@pytest.fixture
def fake_smi(empty_path):
    """`fake_smi(stdout, exit_code=0)` writes an executable `nvidia-smi` into the PATH folder.
    While `<folder>/hang` exists it sleeps first, like nvidia-smi on a wedged driver."""
    def install(stdout: str = TWO_GPUS, exit_code: int = 0, hang_s: float = 1.0) -> Path:
        (empty_path / "smi-output").write_text(stdout)
        script = empty_path / "nvidia-smi"
        script.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = "{SMI_QUERY}" ] && [ "$2" = "--format=csv,noheader,nounits" ] '
            '|| { echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2; }\n'
            f'[ -e "{empty_path}/hang" ] && /bin/sleep {hang_s}\n'
            f'/bin/cat "{empty_path}/smi-output"\n'
            f"exit {exit_code}\n")
        script.chmod(0o755)
        return empty_path
    return install


def comfy_stats_of(url: str):
    return lambda: requests.get(url + "/system_stats", timeout=5).json()


# -- no NVIDIA source ------------------------------------------------------------------------------
@no_nvml
def test_without_any_source_reports_no_gpu_and_why(empty_path):
    stats = GpuProbe(0).read()
    assert stats.available is False and stats.source == "none"
    assert "pynvml" in stats.reason and "nvidia-smi not found" in stats.reason and "no ComfyUI" in stats.reason
    assert stats.utilization is None and stats.memory_total_mb is None


@no_nvml
def test_falls_back_to_a_real_comfyui_simulator(empty_path, sim_factory):
    sim = sim_factory("--gpu-name", "Test GPU", "--vram", "16")
    stats = GpuProbe(0, comfy_stats=comfy_stats_of(sim.url)).read()
    assert stats.available is True and stats.source == "comfyui"
    assert "Test GPU" in stats.name and stats.index == 0
    assert stats.memory_total_mb == pytest.approx(16 * GIB_IN_MIB)
    assert 0 < stats.memory_free_mb <= stats.memory_total_mb
    assert stats.memory_used_mb + stats.memory_free_mb == pytest.approx(stats.memory_total_mb)
    assert stats.utilization is None and stats.temperature_c is None and stats.uuid is None  # ComfyUI does not say
    assert "nvidia-smi not found" in stats.reason  # why the fallback was used


def test_comfyui_on_cpu_is_not_a_gpu():
    # ComfyUI's own /system_stats shape when it runs with --cpu.
    cpu = {"devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 68719476736,
                        "vram_free": 34359738368, "torch_vram_total": 68719476736, "torch_vram_free": 34359738368}]}
    stats = GpuProbe(0, comfy_stats=lambda: cpu, prefer="comfyui").read()
    assert (stats.available, stats.source, stats.reason) == (False, "comfyui", "ComfyUI runs on CPU")
    assert stats.memory_total_mb is None  # system RAM is not VRAM


def test_comfyui_picks_the_same_index_or_else_the_first_gpu():
    devices = {"devices": [{"name": "cuda:0 A : native", "type": "cuda", "index": 0, "vram_total": 2 ** 30,
                            "vram_free": 2 ** 29},
                           {"name": "cuda:1 B : native", "type": "cuda", "index": 1, "vram_total": 2 ** 31,
                            "vram_free": 2 ** 30}]}
    assert GpuProbe(1, comfy_stats=lambda: devices, prefer="comfyui").read().name == "B"
    assert GpuProbe(5, comfy_stats=lambda: devices, prefer="comfyui").read().name == "A"


@no_nvml
def test_unreachable_comfyui_gives_none_with_a_reason(empty_path):
    stats = GpuProbe(0, comfy_stats=comfy_stats_of(f"http://127.0.0.1:{free_port()}")).read()
    assert stats.available is False and stats.source == "none"
    assert "comfyui: ConnectionError" in stats.reason


# -- GPUtil's real parsing of nvidia-smi output ----------------------------------------------------
def test_gputil_reads_the_worker_gpu_from_nvidia_smi(fake_smi):
    fake_smi()
    stats = GpuProbe(1, prefer="gputil").read()
    assert stats == GpuStats(available=True, source="gputil", index=1, name="NVIDIA H200", uuid=UUID1,
                             utilization=pytest.approx(87.0), memory_used_mb=100000.0, memory_total_mb=143771.0,
                             memory_free_mb=43771.0, temperature_c=61.0, reason=None)
    json.dumps(stats.as_dict(), allow_nan=False)  # heartbeat-ready


def test_not_supported_fields_are_none_not_zero(fake_smi):
    fake_smi()
    stats = GpuProbe(0, prefer="gputil").read()
    assert stats.available and stats.name == "NVIDIA H100 80GB HBM3" and stats.uuid == UUID0
    assert stats.utilization is None and stats.temperature_c is None
    assert (stats.memory_used_mb, stats.memory_total_mb) == (1024.0, 81559.0)


@pytest.mark.parametrize("visible, gpu_index, smi_index", [
    ("1", 0, 1),
    ("1,0", 0, 1),
    ("1,0", 1, 0),
    (" 0 , 1 ", 1, 1),
    ("GPU-9f8e", 0, 1),        # UUID prefixes are allowed by CUDA
    ("0", 1, None),            # only one GPU visible, the worker asks for the second
    ("-1", 0, None),           # the usual way to hide every GPU
    ("", 0, None),
])
def test_cuda_visible_devices_maps_the_worker_index(fake_smi, monkeypatch, visible, gpu_index, smi_index):
    fake_smi()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    stats = GpuProbe(gpu_index, prefer="gputil").read()
    if smi_index is None:
        assert stats.available is False and stats.source == "none"
        assert "not visible with CUDA_VISIBLE_DEVICES" in stats.reason
    else:
        assert stats.available and stats.index == smi_index


def test_resolve_device():
    assert resolve_device(3, None) == 3
    assert resolve_device(1, "4,GPU-ABCD") == "gpu-abcd"
    with pytest.raises(ValueError, match="MIG"):
        resolve_device(0, "MIG-4a8e3d1f-aaaa-bbbb-cccc-000000000000")


def test_worker_index_missing_from_nvidia_smi(fake_smi):
    fake_smi()
    stats = GpuProbe(7, prefer="gputil").read()
    assert stats.available is False and "lists no GPU 7" in stats.reason


@pytest.mark.parametrize("stdout, exit_code, why", [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9, "could not parse"),
    ("garbage\x00\xff, , ,\n", 0, "could not parse"),
    ("0, GPU-x, 5\n", 0, "could not parse"),    # a truncated line
    ("", 1, "listed no GPUs"),
])
def test_failing_nvidia_smi_falls_back_with_a_reason(fake_smi, sim_factory, stdout, exit_code, why):
    fake_smi(stdout, exit_code)
    forced = GpuProbe(0, prefer="gputil").read()
    assert forced.available is False and forced.source == "none" and why in forced.reason
    sim = sim_factory("--gpu-name", "Test GPU")
    fallback = GpuProbe(0, comfy_stats=comfy_stats_of(sim.url), prefer="auto").read()
    if importlib.util.find_spec("pynvml") is None:
        assert fallback.source == "comfyui" and fallback.available
        assert f"gputil: {why}" in fallback.reason or f"gputil: nvidia-smi {why}" in fallback.reason


def test_hung_nvidia_smi_does_not_hang_the_probe(fake_smi):
    bindir = fake_smi(hang_s=1.0)
    (bindir / "hang").touch()
    probe = GpuProbe(1, prefer="gputil", smi_timeout_s=0.2)
    started = time.monotonic()
    for _ in range(3):  # later reads neither wait again nor start another nvidia-smi
        stats = probe.read()
        assert stats.available is False and "has not answered" in stats.reason
    assert time.monotonic() - started < 0.8
    (bindir / "hang").unlink()
    recovered = wait_until(lambda: probe.read().available and probe.read(), timeout=5, what="nvidia-smi to answer")
    assert recovered.index == 1 and recovered.utilization == pytest.approx(87.0)


def test_missing_nvidia_smi_is_believed_until_the_recheck(fake_smi, empty_path):
    probe = GpuProbe(1, prefer="gputil", recheck_s=0.3)
    assert "nvidia-smi not found on PATH" in probe.read().reason
    fake_smi()
    assert "rechecked every 0.3 s" in probe.read().reason  # cached: not looked up on every heartbeat
    time.sleep(0.35)
    assert probe.read().source == "gputil"


def test_unknown_prefer_is_refused():
    with pytest.raises(ValueError, match="prefer"):
        GpuProbe(0, prefer="cuda")


# -- the CLI a GPU machine runs, and host stats ----------------------------------------------------
def run_cli(*args: str, path: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-m", "workers.gpu_probe", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env={"PATH": str(path), "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@no_nvml
def test_cli_names_the_comfyui_source(empty_path, sim_factory):
    sim = sim_factory("--gpu-name", "Test GPU", "--vram", "16")
    out, err = run_cli("--comfyui", sim.url, path=empty_path)
    assert out["gpu"]["source"] == "comfyui" and out["gpu"]["available"] is True
    assert out["gpu"]["memory_total_mb"] == pytest.approx(16 * GIB_IN_MIB)
    assert out["host"]["ram_total_mb"] > 0
    assert "source=comfyui" in err


@no_nvml
def test_cli_reads_nvidia_smi_and_exits_0_without_a_gpu(fake_smi, empty_path):
    out, err = run_cli(path=empty_path)
    assert out["gpu"]["source"] == "none" and "source=none" in err
    fake_smi()
    out, err = run_cli("--index", "1", path=empty_path)
    assert out["gpu"]["source"] == "gputil" and out["gpu"]["name"] == "NVIDIA H200"


def test_host_stats_are_sane():
    host_stats()
    time.sleep(0.1)
    stats = host_stats()
    assert isinstance(stats, HostStats)
    assert 0.0 <= stats.cpu_percent <= 100.0
    assert 0 < stats.ram_used_mb <= stats.ram_total_mb
    assert stats.load_avg_1m is None or stats.load_avg_1m >= 0
    assert set(stats.as_dict()) == {"cpu_percent", "ram_used_mb", "ram_total_mb", "load_avg_1m"}
