"""A pretend CUDA device: which models sit in VRAM and how much is free.

Figures are plausible for SDXL in fp16 on a consumer card; they move while a
sampler runs so that a monitor sees a busy GPU.
"""
from __future__ import annotations

import math
import time

GIB = 1024 ** 3
CONTEXT_BYTES = int(0.35 * GIB)          # CUDA context + allocator slack at idle
MODEL_BYTES = {
    "checkpoint": int(6.9 * GIB),        # SDXL UNet + CLIP-L/G + VAE in fp16
    "storydiffusion": int(7.2 * GIB),    # StoryDiffusion_Apply's second SDXL pipeline
}
ACTIVATION_BYTES_PER_MEGAPIXEL = int(1.3 * GIB)


class Gpu:
    def __init__(self, name: str, vram_gib: float) -> None:
        self.name = name
        self.total = int(vram_gib * GIB)
        self.loaded: dict[str, int] = {}      # model key -> bytes
        self.loaded_checkpoint: str | None = None
        self._activation = 0
        self._busy_since: float | None = None

    # -- what the executor tells it --------------------------------------------
    def load(self, key: str, kind: str) -> None:
        self.loaded[key] = MODEL_BYTES[kind]

    def unload_all(self) -> None:
        self.loaded.clear()
        self.loaded_checkpoint = None

    def begin_sampling(self, megapixels: float) -> None:
        self._activation = int(ACTIVATION_BYTES_PER_MEGAPIXEL * max(megapixels, 0.25))
        self._busy_since = time.monotonic()

    def end_sampling(self) -> None:
        self._activation = 0
        self._busy_since = None

    # -- what /system_stats reports ---------------------------------------------
    def device_stats(self) -> dict:
        allocated = sum(self.loaded.values()) + self._activation
        if self._busy_since is not None:  # a gentle wobble while sampling
            allocated += int(0.08 * GIB * (1 + math.sin((time.monotonic() - self._busy_since) * 3.1)))
        allocated = min(allocated, self.total - CONTEXT_BYTES)
        reserved = min(allocated + (int(0.5 * GIB) if allocated else 0), self.total - CONTEXT_BYTES)
        free = self.total - CONTEXT_BYTES - reserved + (reserved - allocated)
        return {
            "name": f"cuda:0 {self.name} : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": self.total,
            "vram_free": free,
            "torch_vram_total": reserved,
            "torch_vram_free": reserved - allocated,
        }
