"""Profiler evidence for a missed goal: py-spy samples of live service processes.

py-spy reads another process's stacks from outside (no code change, no restart), so the
process profiled is exactly the one measured. Results are summarised twice: by function
(inclusive: share of samples with the function on the stack; self: at the top) and by
package (where the CPU time itself goes: our code, Flask, Celery/kombu, redis-py, json...).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))
FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>.+?):\d+\)$")
OURS = ("app/", "common/", "workers/", "workflows/", "comfyui_sim/")


def available() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return exe if Path(exe).exists() else None


def record(pids: list[int], seconds: float, rate: int = 100, gil: bool = True) -> list[tuple[list[str], int]]:
    """Sample every pid at once for `seconds`; (stack root→leaf, count) pairs of them all.

    gil=True keeps only samples of the thread holding the GIL: where the CPU goes, not the
    threads parked on a socket (py-spy would otherwise count a thread waiting in recv())."""
    exe = available()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -r requirements.txt)")
    out_dir = Path(tempfile.mkdtemp(prefix="bench-pyspy-"))
    procs = []
    for pid in pids:
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
               "--format", "raw", "--function", "--nonblocking", "-o", str(out_dir / f"{pid}.txt")]
        procs.append(subprocess.Popen(cmd + (["--gil"] if gil else ["--idle"]), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    for proc in procs:
        try:
            proc.wait(seconds + 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stacks = []
    for path in out_dir.glob("*.txt"):
        for line in path.read_text().splitlines():
            frames, _, count = line.rpartition(" ")
            if frames and count.isdigit():
                stacks.append((frames.split(";"), int(count)))
    shutil.rmtree(out_dir, ignore_errors=True)
    if not stacks:
        raise RuntimeError("py-spy took no samples (is ptrace permitted here? py-spy needs it)")
    return stacks


def _name(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    return m["func"], m["file"]


def package(file: str) -> str:
    """py-spy shortens paths to what follows sys.path: `flask/app.py`, `app/routes.py`, `json/encoder.py`."""
    file = file.split("site-packages/")[-1]
    if file.startswith(OURS):
        return "ours: " + file.split("/")[0]
    top = file.split("/")[0].removesuffix(".py")
    return top if (SITE / top).exists() or (SITE / f"{top}.py").exists() else f"stdlib: {top}"


def tree(stacks: list[tuple[list[str], int]], root: str, depth: int = 2, min_pct: float = 1.0,
         relative: bool = False, max_frames: int = 12) -> list[dict]:
    """Where the samples under function `root` go: its callees, and theirs to `depth` levels, each
    as a share of all samples (of those under `root` when `relative`), largest first. A callee
    that holds nearly all of its caller's samples is folded into the caller's row ("a → b"), so
    the levels shown are the ones where time splits; "(self)" is time in the function itself."""
    total = sum(c for frames, c in stacks if not relative or any(_name(f)[0] == root for f in frames)) or 1
    trie: dict = {}
    for frames, count in stacks:
        names = [_name(f) for f in frames]
        at = next((i for i, (func, _) in enumerate(names) if func == root), None)
        if at is None:
            continue
        node, path = trie, names[at:at + max_frames]
        for key in [*path, ("(self)", "") if at + max_frames >= len(names) else ("(deeper)", "")]:
            entry = node.setdefault(key, [0, {}])
            entry[0] += count
            node = entry[1]
    rows = []

    def walk(children: dict, level: int):
        for key, (count, below) in sorted(children.items(), key=lambda kv: -kv[1][0]):
            pct = 100 * count / total
            if pct < min_pct:
                continue
            chain, file = [key[0]], key[1]
            while len(below) == 1 or (below and max(c for c, _ in below.values()) >= 0.9 * count):
                (child, (c, grand)), = [max(below.items(), key=lambda kv: kv[1][0])]
                if c < 0.9 * count or child[0] == "(self)":
                    break
                chain, file, below = [*chain, child[0]], child[1], grand
            label = " → ".join(chain if len(chain) <= 3 else [chain[0], "…", chain[-1]])
            rows.append({"level": level, "function": label, "file": file, "pct": round(pct, 1)})
            if level < depth:
                walk(below, level + 1)
    walk(trie, 0)
    return rows


def summarize(stacks: list[tuple[list[str], int]], top: int = 12, ours_only: bool = False) -> dict:
    total = sum(c for _, c in stacks) or 1
    inclusive, own, by_package = Counter(), Counter(), Counter()
    for frames, count in stacks:
        names = [_name(f) for f in frames]
        for func, file in set(names):
            inclusive[(func, file)] += count
        own[names[-1]] += count
        by_package[package(names[-1][1])] += count

    def row(key, n):
        func, file = key
        return {"function": func, "file": file, "inclusive_pct": round(100 * inclusive[key] / total, 1),
                "self_pct": round(100 * own[key] / total, 1)}

    keys = [k for k, _ in inclusive.most_common() if not ours_only or package(k[1]).startswith("ours")]
    return {"samples": total,
            "inclusive": [row(k, inclusive[k]) for k in keys[:top]],
            "self": [row(k, own[k]) for k, _ in own.most_common(top)],
            "by_package": [{"package": p, "self_pct": round(100 * n / total, 1)} for p, n in by_package.most_common(top)]}
