"""Node classes: their object_info schemas and what running them does.

Schemas are facts (data/*.json: observed on ComfyUI 0.8.0, or taken from the
StoryDiffusion plugin); behaviours are cheap stand-ins that take plausible time,
report progress like the real nodes and hand images along as `ImageSpec`s.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .images import ImageSpec, image_size

if TYPE_CHECKING:  # pragma: no cover
    from .executor import NodeContext

DATA = Path(__file__).parent / "data"
# Display-only: what ComfyUI's error payloads print for non-tensor objects.
_ADDR = 0x7F3A5C000000


# -- values flowing along links -------------------------------------------------
class ImageBatch(tuple):
    def __str__(self) -> str:
        first = self[0] if self else ImageSpec(0, 0)
        return f"tensor(shape=[{len(self)}, {first.height}, {first.width}, 3], dtype=torch.float32)"


@dataclass(frozen=True)
class Opaque:
    """A model, CLIP, VAE, conditioning... printed the way Python prints objects."""
    kind: str
    data: Any = None

    def __str__(self) -> str:
        return f"<{self.kind} object at {hex(_ADDR + (hash(self.kind) & 0xFFFFF) * 16)}>"


@dataclass(frozen=True)
class Latent:
    width: int
    height: int
    batch: int = 1
    items: tuple = ()     # ((label, seed), ...) once sampled

    def __str__(self) -> str:
        return f"{{'samples': tensor(shape=[{self.batch}, 4, {self.height // 8}, {self.width // 8}])}}"


@dataclass
class NodeResult:
    outputs: tuple = ()
    ui: dict | None = None


Behaviour = Callable[..., Awaitable[NodeResult]]


# -- core nodes -------------------------------------------------------------------
async def slow_steps(ctx: "NodeContext", steps, seconds_per_step, fail_at_step, send_preview=False, **_):
    """The recording rig's custom node: its own timing, failure step and previews."""
    def own_failure(step):
        if step == fail_at_step:
            raise RuntimeError(f"SlowSteps failed on purpose at step {step}")
    await ctx.run_steps(steps, lambda: seconds_per_step, bool(send_preview), own_failure)
    return NodeResult((ImageBatch([ImageSpec(64, 64, seed=steps)]),))


async def empty_image(ctx, width, height, batch_size, color, **_):
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return NodeResult((ImageBatch([ImageSpec(width, height, solid=rgb)] * batch_size),))


async def load_image(ctx, image, **_):
    path = ctx.input_file(image)
    width, height = image_size(str(path))
    return NodeResult((ImageBatch([ImageSpec(width, height, source=str(path))]),
                       Opaque("torch.Tensor mask", (height, width))))


async def save_image(ctx, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None, **_):
    return NodeResult((), {"images": await ctx.save_images(images, filename_prefix, prompt, extra_pnginfo)})


async def preview_image(ctx, images, prompt=None, extra_pnginfo=None, **_):
    # ComfyUI's PreviewImage: temp dir, "_temp_" + 5 random letters, fast compression.
    suffix = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    return NodeResult((), {"images": await ctx.save_images(
        images, "ComfyUI_temp_" + suffix, prompt, extra_pnginfo, temp=True)})


async def checkpoint_loader(ctx, ckpt_name, **_):
    await ctx.load_checkpoint(ckpt_name)
    return NodeResult((Opaque("comfy.model_patcher.ModelPatcher", ckpt_name),
                       Opaque("comfy.sd.CLIP", ckpt_name), Opaque("comfy.sd.VAE", ckpt_name)))


async def clip_text_encode(ctx, text, clip, **_):
    await asyncio.sleep(0.01)
    return NodeResult((Opaque("list", text),))


async def empty_latent(ctx, width, height, batch_size, **_):
    return NodeResult((Latent(width, height, batch_size),))


async def ksampler(ctx, model, seed, steps, positive, latent_image, **_):
    await ctx.ensure_model(model)
    text = positive.data if isinstance(positive, Opaque) else ""
    await ctx.sample(steps, latent_image.width * latent_image.height * latent_image.batch)
    items = tuple((str(text), seed + i) for i in range(latent_image.batch))
    return NodeResult((Latent(latent_image.width, latent_image.height, latent_image.batch, items),))


async def vae_decode(ctx, samples, vae, **_):
    await asyncio.sleep(0.02 * max(1, len(samples.items)) / ctx.speed())
    items = samples.items or (("", 0),) * samples.batch
    return NodeResult((ImageBatch(ImageSpec(samples.width, samples.height, label=label, seed=seed)
                                  for label, seed in items),))


# -- StoryDiffusion plugin -------------------------------------------------------
def _raise_string() -> None:
    """The plugin raises plain strings, which Python turns into this TypeError."""
    raise TypeError("exceptions must derive from BaseException")


def story_scenes(scene_text: str) -> list[str]:
    """One image per line; lines without '[' are dropped, text after '#' is a caption."""
    scenes = []
    for line in scene_text.splitlines():
        if "[" not in line:
            continue
        scenes.append(line.split("#", 1)[0].strip())
    return scenes


def story_roles(role_text: str) -> dict[str, str]:
    roles = {}
    for line in role_text.splitlines():
        line = line.strip()
        if line.startswith("[") and "]" in line:
            name, desc = line[1:].split("]", 1)
            roles[name.strip()] = desc.strip()
    return roles


_NON_SDXL_HINTS = ("v1-5", "v1_5", "sd15", "sd1.5", "sd-1.5", "v2-1", "sd21")


async def story_apply(ctx, model, vae, infer_mode, **_):
    ckpt = model.data if isinstance(model, Opaque) else ""
    if any(h in str(ckpt).lower() for h in _NON_SDXL_HINTS):
        raise KeyError("label_emb.0.0.weight")   # what the plugin hits on a non-SDXL checkpoint
    await ctx.build_pipeline(str(ckpt))
    return NodeResult((Opaque("StoryDiffusion pipeline", (ckpt, infer_mode)), Opaque("dict", infer_mode)))


async def story_clip_encode(ctx, clip, switch, width, height, role_text, scene_text, pos_text, neg_text,
                            add_style="No_style", **_):
    roles = story_roles(role_text)
    scenes = [(scene, [n.split("]", 1)[0] for n in scene.split("[")[1:]]) for scene in story_scenes(scene_text)]
    if not scenes or any(n != "NC" and n not in roles for _, names in scenes for n in names):
        _raise_string()
    await asyncio.sleep(0.02)
    labelled = []
    for scene, names in scenes:
        who = "; ".join(f"[{n}] {roles[n]}" for n in names if n in roles)
        labelled.append(f"{scene}{pos_text}\n{who}\nstyle: {add_style}")
    condition = Opaque("dict", tuple(labelled))
    return NodeResult((Opaque("list", tuple(labelled)), Opaque("list", neg_text), condition, width, height))


async def story_ksampler(ctx, model, seed, steps, condition, latent_image, **_):
    labels = condition.data if isinstance(condition, Opaque) else ("",)
    await ctx.ensure_model(model)
    items = []
    for label in labels:   # scenes are generated one after another, each a full run of steps
        await ctx.sample(steps, latent_image.width * latent_image.height)
        items.append((label, seed))
    return NodeResult((Latent(latent_image.width, latent_image.height, len(items), tuple(items)),))


async def easy_function(ctx, **_):
    return NodeResult((Opaque("comfy.model_patcher.ModelPatcher"), Opaque("comfy.sd.CLIP"), Opaque("dict")))


async def comic_type(ctx, image, **_):
    return NodeResult((image,))


async def pre_translate(ctx, scene_prompts, **_):
    return NodeResult((scene_prompts,))


BEHAVIOURS: dict[str, Behaviour] = {
    "KSampler": ksampler,
    "CheckpointLoaderSimple": checkpoint_loader,
    "CLIPTextEncode": clip_text_encode,
    "VAEDecode": vae_decode,
    "EmptyLatentImage": empty_latent,
    "SaveImage": save_image,
    "PreviewImage": preview_image,
    "LoadImage": load_image,
    "EmptyImage": empty_image,
    "SlowSteps": slow_steps,
    "EasyFunction_Lite": easy_function,
    "StoryDiffusion_Apply": story_apply,
    "StoryDiffusion_CLIPTextEncode": story_clip_encode,
    "StoryDiffusion_KSampler": story_ksampler,
    "Comic_Type": comic_type,
    "Pre_Translate_prompt": pre_translate,
}


# -- schemas ------------------------------------------------------------------------
class NodeRegistry:
    """The node classes this server offers, with their object_info."""

    def __init__(self, checkpoints: tuple[str, ...], input_dir: Path) -> None:
        self.input_dir = input_dir
        schemas = json.loads((DATA / "core_object_info.json").read_text())
        schemas.update(json.loads((DATA / "storydiffusion_object_info.json").read_text()))
        schemas["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = list(checkpoints)
        self.schemas: dict[str, dict] = schemas
        self.checkpoints = list(checkpoints)

    def set_checkpoints(self, checkpoints) -> None:
        """The model files on disk changed (one deleted, or restored): /object_info and prompt
        validation follow, as ComfyUI's would on its next scan of the folder."""
        self.checkpoints = list(checkpoints)
        self.schemas["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = list(checkpoints)

    def is_output(self, class_type: str) -> bool:
        return self.schemas[class_type].get("output_node") is True

    def hidden(self, class_type: str) -> dict:
        return self.schemas[class_type]["input"].get("hidden", {})

    def input_files(self) -> list[str]:
        try:
            return sorted(f for f in os.listdir(self.input_dir) if (self.input_dir / f).is_file())
        except FileNotFoundError:
            return []

    def object_info(self, class_type: str | None = None) -> dict:
        names = [class_type] if class_type else list(self.schemas)
        out = {}
        for name in names:
            if name not in self.schemas:
                continue
            info = self.schemas[name]
            if name == "LoadImage":  # the list of uploaded files is live
                info = copy.deepcopy(info)
                info["input"]["required"]["image"][0] = self.input_files()
            out[name] = info
        return out

    # ComfyUI's LoadImage.VALIDATE_INPUTS and IS_CHANGED
    def custom_validators(self) -> dict:
        def load_image_valid(image):
            if not self.annotated_exists(image):
                return f"Invalid image file: {image}"
            return True
        return {"LoadImage": (("image",), load_image_valid)}

    def annotated_exists(self, name: str) -> bool:
        try:
            return self.resolve_input(name).is_file()
        except ValueError:
            return False

    def resolve_input(self, name: str) -> Path:
        path = (self.input_dir / name).resolve()
        if os.path.commonpath([path, self.input_dir.resolve()]) != str(self.input_dir.resolve()):
            raise ValueError(f"{name} is outside the input directory")
        return path

    def is_changed(self, class_type: str, inputs: dict):
        if class_type == "LoadImage" and isinstance(inputs.get("image"), str):
            try:
                return hashlib.sha256(self.resolve_input(inputs["image"]).read_bytes()).hexdigest()
            except (OSError, ValueError):
                return None
        return None
