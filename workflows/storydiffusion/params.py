"""StoryDiffusion: the same characters across a list of scenes, one image per scene."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from workflows.common import Checkpoint, ImageSide, Sampler, Scheduler, WorkflowParams, prompt_text

STYLES = ("No_style", "Realistic", "Japanese_Anime", "Digital_Oil_Painting", "Pixar_Disney_Character",
          "Photographic", "Comic_book", "Line_art", "Black_and_White_Film_Noir", "Isometric_Rooms")
DEFAULT_NEGATIVE = (
    "bad anatomy, bad hands, missing fingers, extra fingers, three hands, three legs, bad arms, missing legs, "
    "missing arms, poorly drawn face, bad face, fused face, cloned face, three crus, fused feet, fused thigh, "
    "extra crus, ugly fingers, horn, amputation, disconnected limbs")
NO_CHARACTER = "NC"
# `[Name]` markers in a scene; the plugin reads them to pick the character of each image.
MARKER = re.compile(r"\[([^\[\]]*)\]")

CharacterName = Annotated[str, StringConstraints(max_length=40, pattern=r"^[A-Za-z][A-Za-z0-9_\- ]{0,39}$")]
# One line each: the plugin splits its text inputs on newlines (no other control character either).
ONE_LINE = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
OneLine = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=ONE_LINE)]
Scene = Annotated[str, StringConstraints(min_length=3, max_length=500, pattern=ONE_LINE)]


class Character(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: CharacterName = Field(description="How scenes refer to the character, as [Name].")
    description: OneLine = Field(description="What the character looks like.")


class Params(WorkflowParams):
    characters: list[Character] = Field(min_length=1, max_length=4, description=(
        "The recurring characters (1–2 give the best consistency)."))
    scenes: list[Scene] = Field(min_length=1, max_length=24, description=(
        "One image per scene. Each names exactly one character as [Name], or [NC] for a scene without one "
        "(not as the first scene)."))
    negative_prompt: prompt_text(2000) = Field(DEFAULT_NEGATIVE, description="What to keep out of the images.")
    style: Literal[STYLES] = Field("No_style", description="The plugin's style preset.")
    width: ImageSide = 768
    height: ImageSide = 768
    steps: int = Field(20, ge=1, le=100)
    cfg: float = Field(8.0, ge=0.0, le=30.0)
    sampler: Sampler = "euler"
    scheduler: Scheduler = "simple"
    checkpoint: Checkpoint = Field("juggernautXL_v8Rundiffusion.safetensors",
                                   description="An SDXL checkpoint installed in ComfyUI.")
    consistency: float = Field(0.5, ge=0.0, le=1.0, description="Consistent self-attention strength (sa32/sa64).")

    @field_validator("characters")
    @classmethod
    def _unique_names(cls, characters: list[Character]) -> list[Character]:
        names = [c.name for c in characters]
        if len(set(names)) != len(names):
            raise ValueError("character names must be unique")
        if NO_CHARACTER in names:
            raise ValueError(f"'{NO_CHARACTER}' is reserved for scenes without a character")
        return characters

    @field_validator("scenes")
    @classmethod
    def _scenes_name_defined_characters(cls, scenes: list[str], info: ValidationInfo) -> list[str]:
        # The plugin silently drops or mangles scenes it cannot place; reject them here with the reason.
        if "characters" not in info.data:
            return scenes  # the characters were invalid: that error is reported on its own
        names = [c.name for c in info.data["characters"]]
        used: set[str] = set()
        for index, scene in enumerate(scenes):
            markers = MARKER.findall(scene)
            if not markers:
                raise ValueError(f"scene {index}: name a character as [Name], or use [NC] for none")
            if len(markers) > 1:
                raise ValueError(f"scene {index}: one character per scene ({len(markers)} markers found)")
            marker = markers[0]
            if marker == NO_CHARACTER:
                if index == 0:
                    raise ValueError("scene 0: the first scene must show a character, not [NC]")
                continue
            if marker not in names:
                raise ValueError(f"scene {index}: [{marker}] is not one of the characters {names}")
            used.add(marker)
        unused = [n for n in names if n not in used]
        if unused:
            raise ValueError(f"characters {unused} appear in no scene")
        return scenes


def bindings(params: Params, output_prefix: str) -> dict[tuple[str, str], object]:
    """Where each parameter lands in api.json: (node id, input name) → value."""
    return {
        ("84", "ckpt_name"): params.checkpoint,
        ("78", "role_text"): "\n".join(f"[{c.name}] {c.description}" for c in params.characters),
        ("78", "scene_text"): "\n".join(params.scenes),
        ("78", "neg_text"): params.negative_prompt,
        ("78", "add_style"): params.style,
        ("78", "width"): params.width,
        ("78", "height"): params.height,
        ("352", "seed"): params.seed,
        ("352", "steps"): params.steps,
        ("352", "cfg"): params.cfg,
        ("352", "sampler_name"): params.sampler,
        ("352", "scheduler"): params.scheduler,
        ("352", "sa32_degree"): params.consistency,
        ("352", "sa64_degree"): params.consistency,
        ("85", "filename_prefix"): output_prefix,
    }


def expected_images(params: Params) -> int:
    return len(params.scenes)


def cost(params: Params) -> float:
    """Work in sampler steps of a 1024×1024 image: what dispatch multiplies by a GPU's speed."""
    return params.steps * len(params.scenes) * params.width * params.height / 1024**2


def progress_repeats(params: Params) -> dict[str, int]:
    """The plugin's sampler runs its steps once per scene: progress restarts for each image."""
    return {"352": len(params.scenes)}
