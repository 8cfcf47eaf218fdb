"""HTTP and websocket routes, answering like ComfyUI 0.8.

Every ComfyUI route is registered twice, plain and under /api, as the real server
does.  /internal/* (a sub-application there too) and the simulator's own /sim/*
control routes are not mirrored.  Handlers that the real server lets crash (a body
that is not JSON, ...) crash here too, so aiohttp answers its own plain 500.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import mimetypes
import os
import sys
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web
from PIL import Image

from . import faults as faults_mod
from . import jobs, messages
from .config import COMFYUI_VERSION, FRONTEND_VERSION, PYTORCH_VERSION, TEMPLATES_VERSION, Config, ensure_output_dir
from .executor import SENSITIVE_EXTRA_DATA_KEYS, Executor
from .faults import Faults, FaultState, Record
from .gpu import Gpu
from .hub import Hub
from .logstream import LogStream, install
from .nodes import NodeRegistry
from .validation import validate_prompt, validation_log_lines

log = logging.getLogger("comfyui_sim.server")

MODEL_FOLDERS = ["checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                 "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
                 "latent_upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
                 "model_patches", "audio_encoders"]


class Simulator:
    """Everything one simulated ComfyUI owns."""

    def __init__(self, config: Config) -> None:
        self.config = config
        ensure_output_dir(config)
        for path in (config.output_path, config.input_path, config.temp_path):
            path.mkdir(parents=True, exist_ok=True)
        for stale in config.temp_path.iterdir():   # ComfyUI empties temp/ at start
            if stale.is_file():
                stale.unlink()
        self.hub = Hub()
        self.logs: LogStream = install(self.hub)
        self.registry = NodeRegistry(config.checkpoints, config.input_path)
        self.gpu = Gpu(config.gpu_name, config.vram_gib)
        self.faults = Faults(FaultState(fail_at_step=config.fail_at_step, speed=config.speed))
        self.record = Record(journal=config.record_file)
        self.executor = Executor(config, self.hub, self.registry, self.gpu, self.faults, self.record)

    async def start(self, app: web.Application) -> None:
        self.hub.start()
        self.logs.attach(asyncio.get_running_loop())
        app["worker"] = asyncio.get_running_loop().create_task(self.executor.run())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=104857600)
        routes = web.RouteTableDef()
        self._comfy_routes(routes)
        api = web.RouteTableDef()
        for route in routes:
            api.route(route.method, "/api" + route.path)(route.handler)
        app.add_routes(api)
        app.add_routes(routes)
        app.add_subapp("/internal", self._internal_app())
        app.add_routes(self._sim_routes())
        app.on_startup.append(self.start)
        return app

    # -- ComfyUI routes -------------------------------------------------------------
    def _comfy_routes(self, routes: web.RouteTableDef) -> None:
        ex, hub, cfg, registry = self.executor, self.hub, self.config, self.registry

        @routes.get("/ws")
        async def websocket(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            sid = request.rel_url.query.get("clientId", "")
            if sid:
                hub.sockets.pop(sid, None)   # reusing a session id replaces the old socket
            else:
                sid = uuid.uuid4().hex
            hub.sockets[sid] = ws
            hub.client_flags[sid] = {}
            try:
                await hub.send_now("status", messages.status(ex.remaining(), sid), sid)
                # A socket of the running prompt's client learns the current node.
                if ex.client_id == sid and ex.last_node_id is not None:
                    await hub.send_now("executing", {"node": ex.last_node_id}, sid)
                first = True
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        try:
                            data = json.loads(msg.data)
                            if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                                hub.client_flags[sid] = data.get("data", {}) or {}
                                await hub.send_now("feature_flags", messages.SERVER_FEATURES, sid)
                            first = False
                        except json.JSONDecodeError:
                            log.warning("Invalid JSON received from client %s: %s", sid, msg.data)
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        log.warning("ws connection closed with exception %s", ws.exception())
            finally:
                # Like ComfyUI: whichever socket of this id closes last unregisters the id.
                hub.sockets.pop(sid, None)
                hub.client_flags.pop(sid, None)
            return ws

        @routes.get("/")
        async def index(request):
            return web.Response(text="<html><body><h1>comfyui_sim</h1><p>A ComfyUI SIMULATOR: no models, "
                                     "no diffusion, labelled pictures only.</p></body></html>",
                                content_type="text/html")

        @routes.get("/embeddings")
        async def embeddings(request):
            return web.json_response([])

        @routes.get("/extensions")
        async def extensions(request):
            return web.json_response([])

        @routes.get("/models")
        async def models(request):
            return web.json_response(MODEL_FOLDERS)

        @routes.get("/models/{folder}")
        async def models_in(request):
            folder = request.match_info["folder"]
            if folder not in MODEL_FOLDERS:
                return web.Response(status=404)
            return web.json_response(list(registry.checkpoints) if folder == "checkpoints" else [])

        @routes.get("/system_stats")
        async def system_stats(request):
            ram_total, ram_free = _ram()
            return web.json_response({
                "system": {
                    "os": sys.platform, "ram_total": ram_total, "ram_free": ram_free,
                    "comfyui_version": COMFYUI_VERSION, "required_frontend_version": FRONTEND_VERSION,
                    "installed_templates_version": TEMPLATES_VERSION, "required_templates_version": TEMPLATES_VERSION,
                    "python_version": sys.version, "pytorch_version": PYTORCH_VERSION, "embedded_python": False,
                    "argv": ["main.py", "--listen", cfg.host, "--port", str(cfg.port)],
                },
                "devices": [self.gpu.device_stats()],
            })

        @routes.get("/features")
        async def features(request):
            return web.json_response(messages.SERVER_FEATURES)

        @routes.get("/prompt")
        async def get_prompt(request):
            return web.json_response(messages.queue_info(ex.remaining()))

        @routes.get("/object_info")
        async def object_info(request):
            return web.json_response(registry.object_info())

        @routes.get("/object_info/{node_class}")
        async def object_info_one(request):
            return web.json_response(registry.object_info(request.match_info["node_class"]))

        @routes.get("/history")
        async def history(request):
            max_items = request.rel_url.query.get("max_items")
            max_items = int(max_items) if max_items is not None else None
            offset = int(request.rel_url.query.get("offset", -1))
            items = list(ex.history.items())
            if offset < 0 and max_items is not None:
                offset = len(items) - max_items
            out = {}
            for index, (key, value) in enumerate(items):
                if index >= offset:
                    out[key] = value
                    if max_items is not None and len(out) >= max_items:
                        break
            return web.json_response(out)

        @routes.get("/history/{prompt_id}")
        async def history_one(request):
            prompt_id = request.match_info["prompt_id"]
            entry = ex.history.get(prompt_id)
            return web.json_response({prompt_id: entry} if entry is not None else {})

        @routes.get("/queue")
        async def queue(request):
            running = [list(ex.running)] if ex.running is not None else []
            return web.json_response({"queue_running": running,
                                      "queue_pending": [list(i) for i in ex.pending_items()]})

        @routes.post("/prompt")
        async def post_prompt(request):
            log.info("got prompt")
            body = await request.json()
            if "number" in body:
                number = float(body["number"])
            else:
                number = ex.number
                if "front" in body and body["front"]:
                    number = -number
                ex.number += 1
            if "prompt" not in body:
                return web.json_response({"error": {"type": "no_prompt", "message": "No prompt provided",
                                                    "details": "No prompt provided", "extra_info": {}},
                                          "node_errors": {}}, status=400)
            prompt_id = str(body.get("prompt_id", uuid.uuid4()))
            result = validate_prompt(body["prompt"], registry.schemas, registry.custom_validators(),
                                     body.get("partial_execution_targets"))
            for line in validation_log_lines(result):
                log.error(line)
            extra_data = body["extra_data"] if "extra_data" in body else {}
            if "client_id" in body:
                extra_data["client_id"] = body["client_id"]
            if not result.ok:
                log.warning("invalid prompt: %s", result.error)
                return web.json_response({"error": result.error, "node_errors": result.node_errors}, status=400)
            for key in SENSITIVE_EXTRA_DATA_KEYS:
                extra_data.pop(key, None)   # never stored, never shown
            extra_data["create_time"] = messages.now_ms()
            ex.put([number, prompt_id, result.prompt, extra_data, result.outputs])
            return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})

        @routes.post("/queue")
        async def post_queue(request):
            body = await request.json()
            if "clear" in body and body["clear"]:
                ex.wipe_queue()
            if "delete" in body:
                for prompt_id in body["delete"]:
                    ex.delete_queue_item(prompt_id)
            return web.Response(status=200)

        @routes.post("/interrupt")
        async def post_interrupt(request):
            try:
                body = await request.json()
            except json.JSONDecodeError:
                body = {}   # an empty or non-JSON body is a global interrupt
            ex.interrupt(body.get("prompt_id"))
            return web.Response(status=200)

        @routes.post("/free")
        async def post_free(request):
            body = await request.json()
            if body.get("unload_models", False):
                ex.set_flag("unload_models", body["unload_models"])
            if body.get("free_memory", False):
                ex.set_flag("free_memory", body["free_memory"])
            return web.Response(status=200)

        @routes.post("/history")
        async def post_history(request):
            body = await request.json()
            if "clear" in body and body["clear"]:
                ex.history.clear()
            if "delete" in body:
                for prompt_id in body["delete"]:
                    ex.history.pop(prompt_id, None)
            return web.Response(status=200)

        @routes.post("/upload/image")
        async def upload_image(request):
            return await self._upload(await request.post())

        @routes.get("/view")
        async def view(request):
            return self._view(request.rel_url.query)

        @routes.get("/api/jobs")
        async def list_jobs(request):
            args, error = jobs.parse_query(request.rel_url.query)
            if error:
                return web.json_response({"error": error}, status=400)
            running = [list(ex.running)] if ex.running is not None else []
            return web.json_response(jobs.listing(running, [list(i) for i in ex.pending_items()], ex.history, args))

        @routes.get("/api/jobs/{job_id}")
        async def one_job(request):
            running = [list(ex.running)] if ex.running is not None else []
            job = jobs.find(request.match_info["job_id"], running, ex.pending_items(), ex.history)
            if job is None:
                return web.json_response({"error": "Job not found"}, status=404)
            return web.json_response(job)

    # -- files ------------------------------------------------------------------------
    def _dir_for(self, kind: str | None) -> Path | None:
        return {"input": self.config.input_path, "output": self.config.output_path,
                "temp": self.config.temp_path}.get(kind or "input")

    async def _upload(self, post) -> web.Response:
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = post.get("type") or "input"
        upload_dir = self._dir_for(kind)
        if upload_dir is None:
            raise ValueError(f"unknown upload type {kind!r}")   # ComfyUI fails here too (500)
        subfolder = post.get("subfolder", "")
        folder = Path(os.path.normpath(upload_dir / subfolder))
        filename = image.filename
        target = Path(os.path.abspath(folder / filename))
        if os.path.commonpath((str(upload_dir), str(target))) != str(upload_dir):
            return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        data = image.file.read()
        overwrite = post.get("overwrite")
        duplicate = False
        if overwrite not in ("true", "1"):
            stem, ext = os.path.splitext(filename)
            counter = 1
            while target.exists():
                if hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest():
                    duplicate = True   # same name, same bytes: nothing written, same name back
                    break
                filename = f"{stem} ({counter}){ext}"
                target = folder / filename
                counter += 1
        if not duplicate:
            target.write_bytes(data)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    def _view(self, query) -> web.StreamResponse:
        if "filename" not in query:
            return web.Response(status=404)
        filename = query["filename"]
        kind = query.get("type", "output")
        if filename.endswith("]") and " [" in filename:   # "name.png [input]"
            filename, kind = filename[:-1].rsplit(" [", 1)
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        root = self._dir_for(kind)
        if root is None:
            return web.Response(status=400)
        folder = root
        if "subfolder" in query:
            folder = root / query["subfolder"]
            if os.path.commonpath((os.path.abspath(folder), str(root))) != str(root):
                return web.Response(status=403)
        filename = os.path.basename(filename)
        path = Path(folder) / filename
        if not path.is_file():
            return web.Response(status=404)
        if "preview" in query or query.get("channel") in ("rgb", "a"):
            return _converted(path, filename, query)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"}:
            content_type = "application/octet-stream"   # never rendered by a browser
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{filename}"',
                                               "Content-Type": content_type})

    # -- /internal (ComfyUI's frontend-only sub-application) -----------------------
    def _internal_app(self) -> web.Application:
        routes = web.RouteTableDef()
        logs = self.logs

        @routes.get("/logs")
        async def logs_text(request):
            return web.json_response("".join(e["t"] + " - " + e["m"] for e in logs.buffer))

        @routes.get("/logs/raw")
        async def logs_raw(request):
            return web.json_response(logs.raw())

        @routes.patch("/logs/subscribe")
        async def logs_subscribe(request):
            body = await request.json()
            logs.subscribe(body["clientId"], body["enabled"])
            return web.Response(status=200)

        @routes.get("/folder_paths")
        async def folder_paths(request):
            base = str(self.config.output_dir / "models")
            return web.json_response({name: [[os.path.join(base, name)], []] for name in MODEL_FOLDERS})

        @routes.get("/files/{directory_type}")
        async def files(request):
            root = self._dir_for(request.match_info["directory_type"])
            if root is None or request.match_info["directory_type"] not in ("output", "input", "temp"):
                return web.json_response("Invalid directory type", status=400)
            found = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime,
                           reverse=True)
            return web.json_response([str(p.relative_to(root)) for p in found])

        app = web.Application()
        app.add_routes(routes)
        return app

    # -- /sim (not ComfyUI) ---------------------------------------------------------
    def _sim_routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/sim/faults")
        async def get_faults(request):
            return web.json_response(self.faults.state.public())

        @routes.post("/sim/faults")
        async def post_faults(request):
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"error": "the body must be JSON"}, status=400)
            changes, problems = faults_mod.parse_request(body)
            if problems:
                return web.json_response({"error": "; ".join(problems)}, status=400)
            self.faults.apply(changes)
            if changes.get("reset"):
                self.registry.set_checkpoints(self.config.checkpoints)
            if changes.get("remove_checkpoint"):
                self.registry.set_checkpoints([c for c in self.registry.checkpoints
                                               if c != changes["remove_checkpoint"]])
            log.info("comfyui_sim faults: %s; checkpoints %s", self.faults.state.public(), self.registry.checkpoints)
            if changes.get("drop_websockets"):
                self.hub.drop_all()
            response = web.json_response(self.faults.state.public())
            if changes.get("crash"):
                await response.prepare(request)
                await response.write_eof()
                asyncio.get_running_loop().call_later(0.02, self.executor.crash, "crash requested")
            return response

        @routes.get("/sim/record")
        async def get_record(request):
            return web.json_response(self.record.public())

        return routes


def _converted(path: Path, filename: str, query) -> web.Response:
    """/view with ?preview=webp;90 or ?channel=rgb|a, as ComfyUI converts them."""
    with Image.open(path) as img:
        if "preview" in query:
            parts = query["preview"].split(";")
            fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in query.get("channel", "") else "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            if fmt == "jpeg" or query.get("channel") == "rgb":
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format=fmt, quality=quality)
            return web.Response(body=buf.getvalue(), content_type=f"image/{fmt}",
                                headers={"Content-Disposition": f'filename="{filename.replace("png", fmt)}"'})
        if query.get("channel") == "rgb":
            out = img.convert("RGB")
        else:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        return web.Response(body=buf.getvalue(), content_type="image/png",
                            headers={"Content-Disposition": f'filename="{filename}"'})


def _ram() -> tuple[int, int]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return total, free
