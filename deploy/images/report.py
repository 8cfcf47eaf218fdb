"""Record image sizes and build times (deploy/images/build.sh --report).

Reads one JSON object per line on stdin (build.sh's results), keeps the last measured build time
of images that were reused rather than built, writes deploy/images/build-report.json, and
rewrites the table in docs/deploy.md between its `image-report` markers. Nothing here is typed
by hand: the figures are the build's.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "deploy/images/build-report.json"
DOC = REPO / "docs/deploy.md"
START, END = "<!-- image-report:start -->", "<!-- image-report:end -->"


def merge(new: list[dict], old: dict) -> dict:
    images = dict(old.get("images", {}))
    for entry in new:
        previous = images.get(entry["name"], {})
        if entry["state"] == "reused" and previous.get("hash") == entry["hash"]:
            entry = {**previous, "bytes": entry["bytes"]}  # same sources: its measured build stands
        elif entry["state"] == "reused":
            entry = {**entry, "seconds": None}
        else:
            entry = {**entry, "measured": time.strftime("%Y-%m-%d", time.gmtime()),
                     "cpus": _cpus(), "machine": platform.machine()}
        images[entry["name"]] = entry
    return {"images": images}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def table(report: dict) -> str:
    rows = ["| image | size | build time | engine, base images | measured |", "| --- | --- | --- | --- | --- |"]
    for entry in report["images"].values():
        seconds = "not measured (reused)" if entry.get("seconds") is None else f"{entry['seconds']} s"
        base = "Debian stand-ins (offline)" if entry.get("offline") else "official"
        when = f"{entry.get('measured', '?')}, {entry.get('cpus', '?')} CPUs" if entry.get("measured") else "–"
        rows.append(f"| `{entry['image']}` | {entry['bytes'] / 1e6:.0f} MB | {seconds} | {entry['engine']}, {base} "
                    f"| {when} |")
    return "\n".join(rows)


def main() -> int:
    new = [json.loads(line) for line in sys.stdin if line.strip()]
    old = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report = merge(new, old)
    REPORT.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    doc = DOC.read_text()
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{START}\n{table(report)}\n{END}{tail}")
    print(f"report: {REPORT.relative_to(REPO)} and {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
