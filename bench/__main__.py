"""`python -m bench [--quick] [--out DIR] [--comfyui-url URL] [FIGURE ...]`: run the benchmark suite (see bench/README.md).

Prints one line per figure, then writes results.json and performance.md with its plots.
Every figure is measured against a baseline taken in the same run; nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench import harness, report

REPO = Path(__file__).resolve().parents[1]
# Cheapest first; each module's run(quick) returns the figure's dict.
FIGURES = ["commands", "memory", "idle", "overhead", "cancel", "progress", "dispatch", "throughput", "backlog", "scale",
           "autoscale"]
# Wall-clock limit per figure (full run); a figure past it is stopped and reported as failed.
LIMITS = {"commands": 90, "memory": 150, "idle": 60, "overhead": 120, "cancel": 90, "progress": 90, "dispatch": 180,
          "throughput": 150, "backlog": 120, "scale": 180, "autoscale": 480, "overhead_real": 240, "idle_real": 120}
# Figures that also run on a real ComfyUI when one is named (--comfyui-url): each right after its
# simulator twin, as its own result (bench/real.py); run(quick, comfyui_url).
REAL = {"overhead": "overhead_real", "idle": "idle_real"}


class FigureTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise FigureTimeout("figure ran past its time limit")


def _terminate(signum, frame):
    harness.stop_all()
    sys.exit(128 + signum)


def order(named: list[str], comfyui_url: str | None) -> list[str]:
    """The figures to run, in suite order: those named (all if none), each with its real twin
    right after it when a ComfyUI is given; a real figure named alone runs alone."""
    out = []
    for name in FIGURES:
        twin = REAL.get(name)
        if not named or name in named:
            out += [name, twin] if twin and comfyui_url else [name]
        elif twin in named:
            out.append(twin)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("figures", nargs="*", metavar="FIGURE",
                        help=f"any of {', '.join(FIGURES + list(REAL.values()))} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, help="write results.json, performance.md and plots here "
                        "(default: bench/results.json, docs/performance.md, docs/perf-*.png)")
    parser.add_argument("--comfyui-url", metavar="URL", help="also run " + " and ".join(REAL) + " against this "
                        "real ComfyUI (its own figures " + ", ".join(REAL.values()) + "; `make bench COMFYUI_URL=URL`)")
    args = parser.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES and f not in REAL.values()]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {FIGURES + list(REAL.values())}")
    if not args.comfyui_url and any(f in REAL.values() for f in args.figures):
        parser.error("the *_real figures need a ComfyUI: --comfyui-url URL")
    chosen = order(args.figures, args.comfyui_url)
    results_path = (args.out / "results.json") if args.out else REPO / "bench" / "results.json"
    docs_dir = args.out or REPO / "docs"

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGALRM, _alarm)
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    figures = dict(previous.get("figures", {}))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        for name in chosen:
            t0 = time.monotonic()
            signal.alarm(LIMITS[name])
            foreign = harness.ForeignCpu()
            try:
                with foreign:
                    module = importlib.import_module(f"bench.{name}")
                    result = (module.run(quick=args.quick, comfyui_url=args.comfyui_url) if name in REAL.values()
                              else module.run(quick=args.quick))
            except Exception as exc:  # noqa: BLE001 - one broken figure must not hide the others
                traceback.print_exc()
                result = {"title": name, "line": f"ERROR: {type(exc).__name__}: {exc}".splitlines()[0],
                          "error": f"{type(exc).__name__}: {exc}", "met": False}
            finally:
                signal.alarm(0)
                harness.stop_all()  # whatever the figure left running (after an error or timeout)
            result.update(seconds=round(time.monotonic() - t0, 1), quick=args.quick, foreign_cpu_cores=foreign.cores(),
                          measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            figures[name] = result
            verdict = ("ERROR" if "error" in result else "info" if result.get("met") is None
                       else "met" if result["met"] else "MISSED")
            print(f"{name:<10} {verdict:<6} {result['line']}  [{result['seconds']:.0f} s]", flush=True)
    finally:
        harness.stop_all()
    results = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
               "ran": chosen, "run_seconds": round(time.monotonic() - started, 1), "load_avg_before": load_before,
               "host": harness.host_info(), "figures": {k: figures[k] for k in order([], True) if k in figures}}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    chaos_path = results_path.parent / "chaos.json"  # `make chaos` (bench/chaos.py) keeps its own results
    doc = report.write(results, docs_dir, chaos=json.loads(chaos_path.read_text()) if chaos_path.exists() else None)
    print(f"bench: {len(chosen)} figure(s) in {results['run_seconds']:.0f} s → {results_path.relative_to(REPO) if results_path.is_relative_to(REPO) else results_path}, "
          f"{doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
