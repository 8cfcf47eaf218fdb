"""The task document callers see, assembled from the record and live progress (pure)."""
from __future__ import annotations

from common.task_store import QUEUED, RUNNING, SUCCEEDED

API = "/api/v1"


def image_url(task_id: str, index: int, public_url: str = "") -> str:
    return f"{public_url.rstrip('/')}{API}/tasks/{task_id}/images/{index}"


def task_document(record: dict, queue_position: int | None, public_url: str = "") -> dict:
    """`queue_position`: jobs ahead of it on its GPU, the running one included (queued only).
    Progress is the record's (the one home of progress): null while the job waits."""
    status = record["status"]
    task_id = record["task_id"]
    if status == RUNNING:
        progress = record.get("progress") or {"percent": 0.0, "node": None, "step": 0, "max": 0}
    elif status == SUCCEEDED:
        progress = record.get("progress") or {"percent": 100.0, "node": None, "step": 0, "max": 0}
    elif status == QUEUED:
        progress = None
    else:
        progress = record.get("progress")
    result = None
    if status == SUCCEEDED and record.get("result") is not None:
        result = {"images": [
            {"url": image_url(task_id, index, public_url), "content_type": image["content_type"],
             "width": image.get("width"), "height": image.get("height"), "size": image.get("size")}
            for index, image in enumerate(record["result"].get("images", []))
        ]}
    return {
        "task_id": task_id,
        "status": status,
        "workflow": record["workflow"],
        "gpu": record.get("gpu"),
        "queue_position": queue_position if status == QUEUED else None,
        "progress": progress,
        "waiting_reason": record.get("waiting_reason") if status == QUEUED else None,
        "params": record["params"],
        "created_at": record["created_at"],
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "cancel_requested": bool(record.get("cancel_requested", False)),
        "result": result,
        "error": record.get("error"),
        "callback": callback_view(record),
    }


def callback_view(record: dict) -> dict | None:
    """The job's webhook and how its final delivery went (null without callback_url)."""
    callback = record.get("callback")
    if not callback:
        return None
    delivery = record.get("webhook") or {}
    return {"url": callback["url"], "events": callback.get("events", []),
            "state": delivery.get("state", "pending"), "attempts": delivery.get("attempts", 0),
            "last_status": delivery.get("last_status"), "last_error": delivery.get("last_error"),
            "delivered_at": delivery.get("delivered_at")}
