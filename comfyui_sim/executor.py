"""The prompt queue and the one worker that runs prompts (the "GPU").

Message order, routing and history records follow the recorded ComfyUI 0.8:
status (taken) → execution_start → execution_cached → per node [progress_state,
executing, progress…, executed, progress_state] → execution_success |
execution_error | execution_interrupted → history written → status →
executing {node: null}.  Everything runs in one asyncio task; the hand-over from
one prompt to the next has no await in between.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import graph, images, messages
from .config import Config
from .faults import Faults, Record
from .gpu import Gpu
from .hub import Hub
from .nodes import BEHAVIOURS, ImageBatch, NodeRegistry, NodeResult, Opaque
from .validation import full_type_name, is_link

log = logging.getLogger("comfyui_sim.server")

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class InterruptProcessingException(Exception):
    pass


@dataclass
class CacheEntry:
    outputs: tuple
    ui: dict | None   # {"meta": ..., "output": ...} for output nodes


class Progress:
    """ComfyUI's progress registry: node states, sent whole on every change."""

    def __init__(self, hub: Hub, prompt_id: str, client_id: str | None) -> None:
        self.hub, self.prompt_id, self.client_id = hub, prompt_id, client_id
        self.nodes: dict[str, dict] = {}

    def _entry(self, node_id: str) -> dict:
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _send(self) -> None:
        self.hub.send("progress_state", messages.progress_state(self.prompt_id, self.nodes), self.client_id)

    def start(self, node_id: str) -> None:
        self._entry(node_id).update(state="running", value=0.0, max=1.0)
        self._send()

    def update(self, node_id: str, value, total) -> None:
        self._entry(node_id).update(state="running", value=value, max=total)
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._send()


class NodeContext:
    """What a running node may do: check for interrupts, report progress, spend
    GPU time, write images."""

    def __init__(self, executor: "Executor", node_id: str, prompt_id: str, progress: Progress) -> None:
        self.ex, self.node_id, self.prompt_id, self.progress_reg = executor, node_id, prompt_id, progress

    # -- interrupt / faults -----------------------------------------------------
    async def check(self) -> None:
        """An interrupt check point.  A stalled GPU freezes here until resumed, deaf to
        interrupts like a hung kernel; a pending interrupt then takes effect."""
        if self.ex.faults.state.stall:
            await self.ex.faults.resumed.wait()
        self.ex.raise_if_interrupted()

    def fault_fail(self, step: int) -> None:
        if self.ex.faults.state.fail_at_step == step:
            raise RuntimeError(f"simulated sampler failure at step {step} (comfyui_sim fault)")

    async def reached(self, step: int) -> None:
        faults = self.ex.faults
        if faults.take_step_trigger("crash_at_step", step):
            self.ex.crash(f"crash_at_step={step}")
        if faults.take_step_trigger("drop_websockets_at_step", step):
            log.info("comfyui_sim fault: dropping every websocket at step %d", step)
            self.ex.hub.drop_all()

    def speed(self) -> float:
        return self.ex.faults.state.speed

    # -- progress ---------------------------------------------------------------
    async def progress(self, value: int, total: int, preview: bytes | None = None) -> None:
        """ComfyUI's progress hook: interrupt check, progress_state, then progress;
        previews as type 4 (negotiated) before progress, else type 1 after it."""
        await self.check()
        hub, cid = self.ex.hub, self.ex.client_id
        self.progress_reg.update(self.node_id, value, total)
        with_meta = hub.supports_preview_metadata(cid)
        if preview is not None and with_meta:
            hub.send("preview", messages.preview_with_metadata(preview, self.prompt_id, self.node_id), cid)
        hub.send("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id}, cid)
        if preview is not None and not with_meta:
            hub.send("preview", messages.preview_legacy(preview), cid)

    async def run_steps(self, total: int, seconds, previews: bool, own_check=None) -> None:
        """The loop of every stepping node: interrupt check, failure checks, the work,
        then the progress hook (which checks for an interrupt again)."""
        # Steps are paced on a clock, so the work around each sleep (messages, checks) does not
        # stretch --step-seconds: a step of 20 ms is 20 ms apart, as ComfyUI's it/s measures it.
        deadline = time.perf_counter()
        for step in range(1, total + 1):
            await self.check()
            if own_check is not None:
                own_check(step)
            self.fault_fail(step)
            length, now = seconds(), time.perf_counter()
            if now - deadline > length:  # behind by a whole step (a stall, a starved loop): resync
                deadline = now
            deadline += length
            await asyncio.sleep(deadline - now)
            await self.reached(step)
            await self.progress(step, total, images.preview_jpeg(step % 4) if previews else None)

    async def sample(self, steps: int, pixels: int) -> None:
        """A sampler run: `steps` steps of --step-seconds / speed, the GPU busy meanwhile."""
        gpu = self.ex.gpu
        gpu.begin_sampling(pixels / 1_000_000)
        try:
            await self.run_steps(steps, lambda: self.ex.config.step_seconds / self.speed(),
                                 self.ex.config.preview_method != "none")
        finally:
            gpu.end_sampling()

    # -- models -----------------------------------------------------------------
    async def load_checkpoint(self, ckpt: str) -> None:
        gpu = self.ex.gpu
        if gpu.loaded_checkpoint == ckpt:
            return
        log.info("model weight dtype torch.float16, manual cast: None")
        log.info("model_type EPS")
        await asyncio.sleep(self.ex.config.load_seconds)
        gpu.loaded.pop("storydiffusion", None)
        gpu.load("checkpoint", "checkpoint")
        gpu.loaded_checkpoint = ckpt
        log.info("Requested to load SDXL")
        log.info("loaded completely; %s", ckpt)

    async def ensure_model(self, model) -> None:
        """After /free unloaded models, a cached loader's model must come back."""
        ckpt = model.data[0] if isinstance(model, Opaque) and isinstance(model.data, tuple) else \
            (model.data if isinstance(model, Opaque) else None)
        if ckpt and self.ex.gpu.loaded_checkpoint != ckpt:
            await self.load_checkpoint(ckpt)

    async def build_pipeline(self, ckpt: str) -> None:
        if self.ex.gpu.loaded.get("storydiffusion") is None:
            await asyncio.sleep(self.ex.config.load_seconds)
            self.ex.gpu.load("storydiffusion", "storydiffusion")
            log.info("StoryDiffusion: story mode pipeline built from %s", ckpt)

    # -- files ------------------------------------------------------------------
    def input_file(self, name: str) -> Path:
        return self.ex.registry.resolve_input(name)

    async def save_images(self, batch: ImageBatch, prefix: str, prompt, extra_pnginfo, temp: bool = False) -> list:
        cfg = self.ex.config
        root = cfg.temp_path if temp else cfg.output_path
        first = batch[0] if batch else images.ImageSpec(0, 0)
        folder, name, counter, subfolder = save_image_path(prefix, root, first.width, first.height)
        results = []
        for number, spec in enumerate(batch):
            filename = f"{name.replace('%batch_num%', str(number))}_{counter:05}_.png"
            await asyncio.to_thread(images.save_png, spec, str(folder / filename), prompt, extra_pnginfo,
                                    1 if temp else 4)
            results.append({"filename": filename, "subfolder": subfolder, "type": "temp" if temp else "output"})
            counter += 1
        return results


def save_image_path(prefix: str, root: Path, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """ComfyUI's get_save_image_path: `<prefix>_<5-digit counter>_.png`, the counter
    one past the highest existing for that prefix; a prefix may name a subfolder."""
    if "%" in prefix:
        now = time.localtime()
        for key, value in (("%width%", width), ("%height%", height), ("%year%", now.tm_year),
                           ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                           ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                           ("%second%", f"{now.tm_sec:02}")):
            prefix = prefix.replace(key, str(value))
    subfolder = os.path.dirname(os.path.normpath(prefix))
    name = os.path.basename(os.path.normpath(prefix))
    folder = (root / subfolder).resolve()
    if os.path.commonpath((str(root.resolve()), str(folder))) != str(root.resolve()):
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed."
                        f"\n full_output_folder: {folder}\n         output_dir: {root}")
    folder.mkdir(parents=True, exist_ok=True)
    highest = 0
    for existing in os.listdir(folder):
        head, tail = existing[:len(name) + 1], existing[len(name) + 1:]
        if os.path.normcase(head[:-1]) == os.path.normcase(name) and head[-1:] == "_":
            try:
                highest = max(highest, int(tail.split("_")[0]))
            except ValueError:
                pass
    return folder, name, highest + 1, subfolder


class Executor:
    def __init__(self, config: Config, hub: Hub, registry: NodeRegistry, gpu: Gpu, faults: Faults,
                 record: Record) -> None:
        self.config, self.hub, self.registry, self.gpu = config, hub, registry, gpu
        self.faults, self.record = faults, record
        self.queue: list = []                # heap of (number, prompt_id, seq, item)
        self._seq = itertools.count()
        self.running: list | None = None     # [number, prompt_id, prompt, extra_data, outputs]
        self.history: dict[str, dict] = {}
        self.flags: dict = {}
        self.number = 0                      # the POST /prompt counter
        self.interrupted = False
        self.client_id: str | None = None    # the client of the latest prompt (ComfyUI keeps it)
        self.last_node_id: str | None = None
        self.cache: dict[str, CacheEntry] = {}
        self._wake = asyncio.Event()

    # -- queue ------------------------------------------------------------------
    def remaining(self) -> int:
        return len(self.queue) + (1 if self.running is not None else 0)

    def queue_updated(self) -> None:
        self.hub.send("status", messages.status(self.remaining()))

    def put(self, item: list) -> None:
        heapq.heappush(self.queue, (item[0], item[1], next(self._seq), item))
        self.record.queued(item[1], item[2])
        self.queue_updated()
        self._wake.set()

    def pending_items(self) -> list:
        return [entry[3] for entry in self.queue]   # heap order, like ComfyUI

    def wipe_queue(self) -> None:
        self.record.removed([entry[1] for entry in self.queue])
        self.queue = []
        self.queue_updated()

    def delete_queue_item(self, prompt_id) -> None:
        for index, entry in enumerate(self.queue):
            if entry[1] == prompt_id:
                if len(self.queue) == 1:
                    self.wipe_queue()   # ComfyUI announces twice when the last one goes
                else:
                    self.record.removed([prompt_id])
                    self.queue.pop(index)
                    heapq.heapify(self.queue)
                self.queue_updated()
                return

    def set_flag(self, name: str, value) -> None:
        self.flags[name] = value
        self._wake.set()

    def interrupt(self, prompt_id: str | None) -> None:
        running = self.running[1] if self.running is not None else None
        if prompt_id:
            if prompt_id == running:
                log.info("Interrupting prompt %s", prompt_id)
                self.interrupted = True
                self.record.interrupt(prompt_id, running)
            else:
                log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
                self.record.interrupt(prompt_id, None)
        else:
            log.info("Global interrupt (no prompt_id specified)")
            self.interrupted = True
            self.record.interrupt(None, running)

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise InterruptProcessingException()

    def crash(self, why: str) -> None:
        log.info("comfyui_sim fault: hard exit (%s)", why)
        sys.stdout.flush()
        os._exit(1)

    # -- the worker -----------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._apply_flags()
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = heapq.heappop(self.queue)[3]
            self.running = item
            start = time.time()
            self.record.started(item[1], start)
            self.queue_updated()
            began = time.perf_counter()
            try:
                outcome, result, status = await self._execute(item)
            except Exception:  # noqa: BLE001 - a simulator bug must not kill the worker
                log.exception("comfyui_sim internal error while running %s", item[1])
                outcome, result = "error", {"outputs": {}, "meta": {}}
                status = {"status_str": "error", "completed": False, "messages": []}
            self._task_done(item, result, status)
            self.record.ended(item[1], start, time.time(), outcome)
            if self.client_id is not None:
                self.hub.send("executing", {"node": None, "prompt_id": item[1]}, self.client_id)
            log.info("Prompt executed in %.2f seconds", time.perf_counter() - began)

    def _apply_flags(self) -> None:
        if not self.flags:
            return
        free_memory = self.flags.get("free_memory", False)
        if self.flags.get("unload_models", free_memory):
            self.gpu.unload_all()
        if free_memory:
            self.cache.clear()
        self.flags = {}

    def _task_done(self, item: list, result: dict, status: dict) -> None:
        prompt_id = item[1]
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        entry = {"prompt": list(item), "outputs": {}, "status": status}
        entry.update(result)
        self.history[prompt_id] = entry   # a reused id keeps its old place
        self.running = None
        self.queue_updated()

    async def _execute(self, item: list) -> tuple[str, dict, dict]:
        number, prompt_id, prompt, extra_data, outputs = item
        self.interrupted = False
        self.client_id = extra_data.get("client_id")
        cid = self.client_id
        status_messages: list = []

        def add_message(event: str, data: dict, broadcast: bool) -> None:
            data = {**data, "timestamp": messages.now_ms()}
            status_messages.append([event, data])
            if cid is not None or broadcast:
                self.hub.send(event, data, cid)

        add_message("execution_start", {"prompt_id": prompt_id}, False)
        keys = graph.signatures(prompt, self.registry.is_changed)
        # Default ("classic") cache: only results this prompt can use survive.
        wanted = set(keys.values())
        self.cache = {k: v for k, v in self.cache.items() if k in wanted}
        cached = [n for n in prompt if keys[n] in self.cache]
        add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id}, False)

        progress = Progress(self.hub, prompt_id, cid)
        values: dict[str, tuple] = {}
        ui_outputs: dict[str, dict] = {}
        executed: list[str] = []
        order = graph.execution_order(prompt, outputs, set(cached),
                                      lambda n: self.registry.is_output(prompt[n]["class_type"]))
        for node_id in cached:
            values[node_id] = self.cache[keys[node_id]].outputs

        outcome = "success"
        for node_id in order:
            class_type = prompt[node_id]["class_type"]
            hit = self.cache.get(keys[node_id])
            if hit is not None:
                if cid is not None:
                    self.hub.send("executed", {"node": node_id, "display_node": node_id,
                                               "output": hit.ui["output"] if hit.ui else None,
                                               "prompt_id": prompt_id}, cid)
                    if hit.ui is not None:
                        ui_outputs[node_id] = hit.ui
                values[node_id] = hit.outputs
                progress.finish(node_id)
                continue

            progress.start(node_id)
            if cid is not None:
                self.last_node_id = node_id
                self.hub.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, cid)
            inputs = self._node_inputs(prompt, node_id, values, extra_data)
            ctx = NodeContext(self, node_id, prompt_id, progress)
            try:
                await ctx.check()   # ComfyUI checks before every node function
                result: NodeResult = await BEHAVIOURS[class_type](ctx, **inputs)
            except InterruptProcessingException:
                log.info("Processing interrupted")
                add_message("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                                      "node_type": class_type, "executed": list(executed)}, True)
                outcome = "interrupted"
                break
            except Exception as ex:  # noqa: BLE001 - a node failure is a protocol event
                log.error("!!! Exception during processing !!! %s", ex)
                log.error("%s", traceback.format_exc())
                add_message("execution_error", {
                    "prompt_id": prompt_id, "node_id": node_id, "node_type": class_type,
                    "executed": list(executed), "exception_message": f"{ex}\n",
                    "exception_type": full_type_name(type(ex)), "traceback": traceback.format_tb(ex.__traceback__),
                    "current_inputs": {k: [messages.format_value(v)] for k, v in inputs.items()},
                    "current_outputs": list(prompt)}, False)
                outcome = "error"
                break
            values[node_id] = result.outputs
            ui = None
            if result.ui:
                ui = {"meta": messages.node_meta(node_id), "output": result.ui}
                ui_outputs[node_id] = ui
                if cid is not None:
                    self.hub.send("executed", {"node": node_id, "display_node": node_id, "output": result.ui,
                                               "prompt_id": prompt_id}, cid)
            self.cache[keys[node_id]] = CacheEntry(result.outputs, ui)
            progress.finish(node_id)
            executed.append(node_id)
        else:
            add_message("execution_success", {"prompt_id": prompt_id}, False)

        self.last_node_id = None
        result = {"outputs": {n: u["output"] for n, u in ui_outputs.items()},
                  "meta": {n: u["meta"] for n, u in ui_outputs.items()}}
        success = outcome == "success"
        status = {"status_str": "success" if success else "error", "completed": success, "messages": status_messages}
        return outcome, result, status

    def _node_inputs(self, prompt: dict, node_id: str, values: dict, extra_data: dict) -> dict:
        """ComfyUI's get_input_data: linked values, schema-known constants, hidden inputs."""
        node = prompt[node_id]
        schema_inputs = self.registry.schemas[node["class_type"]]["input"]
        known = set(schema_inputs.get("required", {})) | set(schema_inputs.get("optional", {}))
        inputs = {}
        for name, value in node["inputs"].items():
            if is_link(value) and len(value) == 2:
                source, slot = value
                inputs[name] = values[source][slot] if source in values else None
            elif name in known:
                inputs[name] = value
        for name, kind in self.registry.hidden(node["class_type"]).items():
            if kind == "PROMPT":
                inputs[name] = prompt
            elif kind == "EXTRA_PNGINFO" and "extra_pnginfo" in extra_data:
                inputs[name] = extra_data["extra_pnginfo"]
            elif kind == "UNIQUE_ID":
                inputs[name] = node_id
        return inputs
