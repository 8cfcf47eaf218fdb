"""Plain SDXL text-to-image: one prompt, one image."""
from __future__ import annotations

from pydantic import Field

from workflows.common import Checkpoint, ImageSide, Sampler, Scheduler, WorkflowParams, prompt_text


class Params(WorkflowParams):
    prompt: prompt_text(4000, min_length=1) = Field(description="What the image shows.")
    negative_prompt: prompt_text(4000) = Field("", description="What to keep out of the image.")
    width: ImageSide = 1024
    height: ImageSide = 1024
    steps: int = Field(25, ge=1, le=100)
    cfg: float = Field(7.0, ge=0.0, le=30.0)
    sampler: Sampler = "euler"
    scheduler: Scheduler = "normal"
    checkpoint: Checkpoint = Field("sd_xl_base_1.0.safetensors", description="An SDXL checkpoint installed in ComfyUI.")


def bindings(params: Params, output_prefix: str) -> dict[tuple[str, str], object]:
    return {
        ("4", "ckpt_name"): params.checkpoint,
        ("5", "width"): params.width,
        ("5", "height"): params.height,
        ("6", "text"): params.prompt,
        ("7", "text"): params.negative_prompt,
        ("3", "seed"): params.seed,
        ("3", "steps"): params.steps,
        ("3", "cfg"): params.cfg,
        ("3", "sampler_name"): params.sampler,
        ("3", "scheduler"): params.scheduler,
        ("9", "filename_prefix"): output_prefix,
    }


def expected_images(params: Params) -> int:
    return 1


def cost(params: Params) -> float:
    """Work in sampler steps of a 1024×1024 image: what dispatch multiplies by a GPU's speed."""
    return params.steps * params.width * params.height / 1024**2


def progress_repeats(params: Params) -> dict[str, int]:
    return {}
