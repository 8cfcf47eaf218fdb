"""`python -m comfyui_sim [--port 8188 ...]` (see README.md for every setting)."""
from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from . import config as config_mod
from .server import Simulator

log = logging.getLogger("comfyui_sim.server")


def banner(cfg: config_mod.Config) -> None:
    line = "=" * 78
    for text in (line,
                 f"comfyui_sim: this is a SIMULATOR of ComfyUI {config_mod.COMFYUI_VERSION}, not ComfyUI.",
                 "No models are loaded and nothing is diffused: images are labelled pictures.",
                 f"GPU: {cfg.gpu_name} ({cfg.vram_gib:g} GiB, speed x{cfg.speed:g}); "
                 f"step {cfg.step_seconds:g}s, checkpoint load {cfg.load_seconds:g}s",
                 f"checkpoints: {', '.join(cfg.checkpoints)}",
                 f"files under {cfg.output_dir}",
                 line):
        log.info(text)


async def serve(cfg: config_mod.Config) -> None:
    sim = Simulator(cfg)
    banner(cfg)
    if cfg.slow_start > 0:
        # A real ComfyUI imports nodes for a while before its port opens.
        log.info("comfyui_sim: slow start, the port opens in %gs", cfg.slow_start)
        await asyncio.sleep(cfg.slow_start)
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    log.info("Starting server\n")
    log.info("To see the GUI go to: http://%s:%d", cfg.host, cfg.port)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    cfg = config_mod.parse(argv)
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
