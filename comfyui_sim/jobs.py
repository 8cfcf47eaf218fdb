"""GET /api/jobs and /api/jobs/{id}: queue items and history entries as "jobs",
in the shape ComfyUI 0.8 answers (keys absent rather than null)."""
from __future__ import annotations

STATUSES = ["pending", "in_progress", "completed", "failed"]
PREVIEWABLE = {"images", "video", "audio"}


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _meta(extra_data: dict) -> tuple:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") or {}
    return extra_data.get("create_time"), workflow.get("id") if isinstance(workflow, dict) else None


def from_queue(item: list, status: str) -> dict:
    create_time, workflow_id = _meta(item[3])
    return _prune({"id": item[1], "status": status, "priority": item[0], "create_time": create_time,
                   "outputs_count": 0, "workflow_id": workflow_id})


def outputs_summary(outputs: dict) -> tuple[int, dict | None]:
    count, preview, fallback = 0, None, None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for entry in items:
                if not isinstance(entry, dict):
                    continue
                count += 1
                if preview is None and media in PREVIEWABLE:
                    enriched = {**entry, "nodeId": node_id, "mediaType": media}
                    if entry.get("type") == "output":
                        preview = enriched
                    elif fallback is None:
                        fallback = enriched
    return count, preview or fallback


def from_history(prompt_id: str, entry: dict, full: bool = False) -> dict:
    priority, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _meta(extra_data)
    status = entry.get("status") or {}
    state = "failed" if status.get("status_str") == "error" else "completed"
    start = end = error = None
    for event, data in status.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
    count, preview = outputs_summary(entry.get("outputs", {}))
    job = _prune({"id": prompt_id, "status": state, "priority": priority, "create_time": create_time,
                  "execution_start_time": start, "execution_end_time": end, "execution_error": error,
                  "outputs_count": count, "preview_output": preview, "workflow_id": workflow_id})
    if full:
        job["outputs"] = entry.get("outputs", {})
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def find(prompt_id: str, running: list, pending: list, history: dict) -> dict | None:
    if prompt_id in history:
        return from_history(prompt_id, history[prompt_id], full=True)
    for item in running:
        if item[1] == prompt_id:
            return from_queue(item, "in_progress")
    for item in pending:
        if item[1] == prompt_id:
            return from_queue(item, "pending")
    return None


def parse_query(query) -> tuple[dict | None, str | None]:
    """(arguments, error message) for GET /api/jobs."""
    args = {"status": None, "workflow_id": query.get("workflow_id"),
            "sort_by": query.get("sort_by", "created_at").lower(),
            "sort_order": query.get("sort_order", "desc").lower(), "limit": None, "offset": 0}
    if query.get("status"):
        wanted = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
        bad = [s for s in wanted if s not in STATUSES]
        if bad:
            return None, f"Invalid status value(s): {', '.join(bad)}. Valid values: {', '.join(STATUSES)}"
        args["status"] = wanted
    if args["sort_by"] not in ("created_at", "execution_duration"):
        return None, "sort_by must be 'created_at' or 'execution_duration'"
    if args["sort_order"] not in ("asc", "desc"):
        return None, "sort_order must be 'asc' or 'desc'"
    if "limit" in query:
        try:
            args["limit"] = int(query["limit"])
        except ValueError:
            return None, "limit must be an integer"
        if args["limit"] <= 0:
            return None, "limit must be a positive integer"
    if "offset" in query:
        try:
            args["offset"] = max(0, int(query["offset"]))
        except ValueError:
            return None, "offset must be an integer"
    return args, None


def listing(running: list, pending: list, history: dict, args: dict) -> dict:
    wanted = args["status"] or STATUSES
    jobs = []
    if "in_progress" in wanted:
        jobs += [from_queue(item, "in_progress") for item in running]
    if "pending" in wanted:
        jobs += [from_queue(item, "pending") for item in pending]
    for prompt_id, entry in history.items():
        failed = (entry.get("status") or {}).get("status_str") == "error"
        if (failed and "failed" in wanted) or (not failed and "completed" in wanted):
            jobs.append(from_history(prompt_id, entry))
    if args["workflow_id"]:
        jobs = [j for j in jobs if j.get("workflow_id") == args["workflow_id"]]
    if args["sort_by"] == "execution_duration":
        def key(job):
            start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
            return end - start if start and end else 0
    else:
        def key(job):
            return job.get("create_time", 0)
    jobs.sort(key=key, reverse=args["sort_order"] == "desc")
    total = len(jobs)
    offset, limit = args["offset"], args["limit"]
    page = jobs[offset:]
    if limit is not None:
        page = page[:limit]
    return {"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                         "has_more": offset + len(page) < total}}
