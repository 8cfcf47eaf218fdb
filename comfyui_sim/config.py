"""Settings: every flag has an environment variable twin; a flag beats its variable."""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
DEFAULT_CHECKPOINTS = ("juggernautXL_v8Rundiffusion.safetensors", "sd_xl_base_1.0.safetensors")

# ComfyUI answers with these version strings (observed on the recorded 0.8.0 server).
COMFYUI_VERSION = "0.8.0"
FRONTEND_VERSION = "1.35.9"
TEMPLATES_VERSION = "0.7.67"
PYTORCH_VERSION = "2.9.1+cu128"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8188
    step_seconds: float = 0.25
    load_seconds: float = 1.0
    gpu_name: str = "NVIDIA GeForce RTX 4090"
    vram_gib: float = 24.0
    speed: float = 1.0
    slow_start: float = 0.0
    fail_at_step: int | None = None
    output_dir: Path | None = None       # None: a fresh temp dir, made when the server starts
    checkpoints: tuple[str, ...] = DEFAULT_CHECKPOINTS
    preview_method: str = "none"
    record_file: Path | None = None      # also append /sim/record's events here (JSON lines)

    @property
    def output_path(self) -> Path:
        return self.output_dir / "output"

    @property
    def input_path(self) -> Path:
        return self.output_dir / "input"

    @property
    def temp_path(self) -> Path:
        return self.output_dir / "temp"


# (flag, env var, type, Config field, help)
_SETTINGS = [
    ("--host", "COMFYUI_SIM_HOST", str, "host", "address to listen on"),
    ("--port", "COMFYUI_SIM_PORT", int, "port", "port to listen on"),
    ("--step-seconds", "COMFYUI_SIM_STEP_SECONDS", float, "step_seconds", "seconds per sampler step at speed 1.0"),
    ("--load-seconds", "COMFYUI_SIM_LOAD_SECONDS", float, "load_seconds", "seconds to load a checkpoint that is not loaded"),
    ("--gpu-name", "COMFYUI_SIM_GPU_NAME", str, "gpu_name", "simulated CUDA device name"),
    ("--vram", "COMFYUI_SIM_VRAM", float, "vram_gib", "simulated VRAM in GiB"),
    ("--speed", "COMFYUI_SIM_SPEED", float, "speed", "GPU speed factor (2.0 = steps take half as long)"),
    ("--slow-start", "COMFYUI_SIM_SLOW_START", float, "slow_start", "seconds before the port listens"),
    ("--fail-at-step", "COMFYUI_SIM_FAIL_AT_STEP", int, "fail_at_step", "every sampler fails at this step"),
    ("--output-dir", "COMFYUI_SIM_OUTPUT_DIR", Path, "output_dir", "holds output/, input/ and temp/"),
    ("--checkpoints", "COMFYUI_SIM_CHECKPOINTS", str, "checkpoints", "comma-separated checkpoint file names"),
    ("--preview-method", "COMFYUI_SIM_PREVIEW_METHOD", str, "preview_method",
     "none (ComfyUI's default) or auto/latent2rgb/taesd: samplers then send JPEG previews"),
    ("--record-file", "COMFYUI_SIM_RECORD_FILE", Path, "record_file",
     "append each /sim/record event (queued, started, ended, deleted) to this file as a JSON line"),
]


def settings_table() -> list[tuple[str, str, str]]:
    """(flag, env var, help) rows, for the README and --help."""
    return [(flag, env, help_) for flag, env, _, _, help_ in _SETTINGS]


def parse(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_sim",
        description="A protocol-faithful ComfyUI SIMULATOR (no models, no diffusion).")
    for flag, env, typ, _, help_ in _SETTINGS:
        parser.add_argument(flag, type=str, default=None, help=f"{help_} (env {env})")
    args = parser.parse_args(argv)

    cfg = Config()
    for flag, env, typ, name, _ in _SETTINGS:
        raw = getattr(args, flag.lstrip("-").replace("-", "_"))
        if raw is None:
            raw = environ.get(env)
        if raw is None or raw == "":
            continue
        if name == "checkpoints":
            value = tuple(x.strip() for x in raw.split(",") if x.strip())
        else:
            try:
                value = typ(raw)
            except ValueError:
                parser.error(f"{flag} / {env}: cannot read {raw!r} as {typ.__name__}")
        setattr(cfg, name, value)
    if cfg.speed <= 0:
        parser.error("--speed must be > 0")
    if cfg.preview_method not in PREVIEW_METHODS:
        parser.error(f"--preview-method must be one of {', '.join(PREVIEW_METHODS)}")
    if cfg.output_dir is not None:
        cfg.output_dir = Path(cfg.output_dir).resolve()
    return cfg


def ensure_output_dir(cfg: Config) -> Path:
    if cfg.output_dir is None:
        cfg.output_dir = Path(tempfile.mkdtemp(prefix="comfyui-sim-"))
    return cfg.output_dir
