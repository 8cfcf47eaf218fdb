"""Pictures the simulator hands out: real PNG files and JPEG preview frames.

Nothing is diffused: an "image" is a labelled colour gradient (or the solid colour /
the uploaded picture where the node would give exactly that).  Pixels are only made
when a file or preview is written, never while a graph merely passes images along.
"""
from __future__ import annotations

import hashlib
import io
import json
import textwrap
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


@dataclass(frozen=True)
class ImageSpec:
    """What a picture will look like once rendered."""
    width: int
    height: int
    label: str = ""
    seed: int = 0
    solid: tuple[int, int, int] | None = None   # EmptyImage: one colour, like the real node
    source: str | None = None                    # LoadImage: the uploaded file's path

    def __str__(self) -> str:  # what ComfyUI would print for a tensor in error payloads
        return f"tensor(shape=[1, {self.height}, {self.width}, 3], dtype=torch.float32)"


def _colours(label: str, seed: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    digest = hashlib.sha256(f"{label}|{seed}".encode()).digest()
    return tuple(digest[0:3]), tuple(digest[3:6])  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - Pillow without FreeType: small bitmap font
        return ImageFont.load_default()


def render(spec: ImageSpec) -> Image.Image:
    if spec.source:
        with Image.open(spec.source) as img:
            return img.convert("RGB")
    if spec.solid is not None:
        return Image.new("RGB", (spec.width, spec.height), spec.solid)
    top, bottom = _colours(spec.label, spec.seed)
    # A vertical gradient built from one 1-pixel column: cheap at any size.
    column = Image.linear_gradient("L").resize((1, spec.height))
    channels = [column.point(lambda v, a=a, b=b: a + (b - a) * v // 255) for a, b in zip(top, bottom)]
    img = Image.merge("RGB", channels).resize((spec.width, spec.height))
    if spec.label and min(spec.width, spec.height) >= 128:
        draw = ImageDraw.Draw(img)
        size = max(12, spec.width // 28)
        width_chars = max(10, int(spec.width / (size * 0.6)) - 2)
        lines = [wrapped for part in spec.label.split("\n") for wrapped in (textwrap.wrap(part, width_chars) or [""])]
        text = "\n".join(lines[:12])
        ink = (255, 255, 255) if sum(top) < 384 else (0, 0, 0)
        draw.multiline_text((size, size), text, fill=ink, font=_font(size), spacing=size // 3)
        draw.text((size, spec.height - 2 * size), f"comfyui_sim | seed {spec.seed} | not a real diffusion", fill=ink,
                  font=_font(max(10, size * 2 // 3)))
    return img


def save_png(spec: ImageSpec, path: str, prompt: dict | None = None, extra_pnginfo: dict | None = None,
             compress_level: int = 4) -> None:
    """Write the PNG with the metadata chunks SaveImage writes (prompt, workflow...)."""
    meta = PngInfo()
    if prompt is not None:
        meta.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        meta.add_text(key, json.dumps(value))
    render(spec).save(path, pnginfo=meta, compress_level=compress_level)


@lru_cache(maxsize=16)
def preview_jpeg(frame: int) -> bytes:
    """A small JPEG for binary preview frames; a handful are made once and reused."""
    spec = ImageSpec(256, 256, label=f"preview {frame}", seed=frame)
    buf = io.BytesIO()
    render(spec).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size
