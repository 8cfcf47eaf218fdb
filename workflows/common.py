"""Parameter types shared by the workflows: bounds callers see in the JSON Schema."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

SEED_MAX = 2**31 - 1

# ComfyUI's sampler and scheduler lists (ComfyUI 0.8 / the StoryDiffusion plugin's object_info).
Sampler = Literal[
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim",
    "uni_pc", "uni_pc_bh2",
]
Scheduler = Literal["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal"]

# A file name inside ComfyUI's checkpoints folder: no path climbing, no control characters.
def _no_climbing(name: str) -> str:
    if ".." in name or "//" in name:
        raise ValueError("must be a file name inside ComfyUI's checkpoints folder")
    return name


Checkpoint = Annotated[str, StringConstraints(
    min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.() +\-/]*\.(safetensors|ckpt|pt|pth|bin)$"),
    AfterValidator(_no_climbing)]
# Sizes ComfyUI's SDXL-era nodes accept and the plugin requires: 256..2048 in steps of 16.
ImageSide = Annotated[int, Field(ge=256, le=2048, multiple_of=16)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


# Prompts are plain text, stored and passed on verbatim; only control characters other than
# tab and line breaks are refused (a NUL or an escape sequence is never meant as prompt text).
NO_CONTROL = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def prompt_text(max_length: int, min_length: int = 0):
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length, pattern=NO_CONTROL)]


class WorkflowParams(BaseModel):
    """Base of every workflow's parameters: unknown fields and NaN/inf are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    seed: Seed | None = Field(None, description="Noise seed, 0 … 2^31−1; random when omitted, reported back.")

    @model_validator(mode="before")
    @classmethod
    def _integral_floats_are_integers(cls, data):
        # JSON Schema's `integer` (what the OpenAPI document says) includes 25.0, which strict mode
        # would refuse; read it as the integer it is. A string stays an error.
        if isinstance(data, dict):
            return {key: int(value) if type(value) is float and value.is_integer() else value
                    for key, value in data.items()}
        return data

    def with_seed(self, seed: int):
        return self.model_copy(update={"seed": seed})
