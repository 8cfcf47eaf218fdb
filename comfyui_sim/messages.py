"""Builders for what goes over the websocket and into /history, shaped as recorded."""
from __future__ import annotations

import json
import struct
import time

# Binary frame event types (ComfyUI's BinaryEventTypes as seen on the wire).
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
JPEG = 1

SERVER_FEATURES = {
    "supports_preview_metadata": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
}


def now_ms() -> int:
    return int(time.time() * 1000)


def queue_info(remaining: int) -> dict:
    return {"exec_info": {"queue_remaining": remaining}}


def status(remaining: int, sid: str | None = None) -> dict:
    data = {"status": queue_info(remaining)}
    if sid is not None:
        data["sid"] = sid
    return data


def node_meta(node_id: str) -> dict:
    """The per-node ids ComfyUI reports (no subgraphs here: all the same id)."""
    return {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}


def progress_state(prompt_id: str, nodes: dict[str, dict]) -> dict:
    """Every node that is not pending, in the order it was first touched."""
    return {"prompt_id": prompt_id, "nodes": {
        node_id: {"value": n["value"], "max": n["max"], "state": n["state"], "node_id": node_id,
                  "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
                  "real_node_id": node_id}
        for node_id, n in nodes.items() if n["state"] != "pending"}}


def preview_legacy(jpeg: bytes) -> bytes:
    """Type 1: event type, image format, image."""
    return struct.pack(">II", PREVIEW_IMAGE, JPEG) + jpeg


def preview_with_metadata(jpeg: bytes, prompt_id: str, node_id: str) -> bytes:
    """Type 4: event type, metadata length, metadata JSON, image."""
    meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                       "parent_node_id": None, "real_node_id": node_id, "image_type": "image/jpeg"}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + jpeg


def format_value(value):
    """How ComfyUI prints node inputs in execution_error.current_inputs."""
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)
