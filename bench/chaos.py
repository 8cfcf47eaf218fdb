"""`python -m bench.chaos [--quick] [--jobs N] [--gpus G] [--rate R] [--out DIR]` (`make chaos`):
the long chaos run of issue 14, reported in docs/performance.md.

1,000 jobs on 8 simulated GPUs at 20 submissions/s while every kind of fault hits the fleet
in turn (tests/support/chaos.py: the engine, and how lost, stuck and duplicated are decided).
It takes several minutes, more than the suite's per-figure limits (`python -m bench`, about
four minutes for every figure), so it is its own command: it writes `bench/chaos.json` and
rewrites docs/performance.md from `bench/results.json` plus that file; `python -m bench` keeps
the chaos section when it rewrites the report. `--quick`: 300 jobs on 4 GPUs (issue 14's first
run), a reduced version for a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import harness, report
from tests.support import chaos
from tests.support.procs import new_workdir

REPO = Path(__file__).resolve().parents[1]
# Every kind of fault, spread over the submissions (one every 4 s from 3 s on: 12 of them, over 47 s).
# sentinel_failover is reported as skipped until Redis Sentinel support lands (issue 14, item 3).
LONG_FAULTS = ["ws_drop", "worker_kill", "sim_kill", "worker_kill", "ws_drop", "sim_kill", "redis_restart",
               "worker_kill", "sim_kill", "ws_drop", "sentinel_failover", "worker_kill"]
QUICK_FAULTS = ["ws_drop", "worker_kill", "sim_kill", "redis_restart", "worker_kill", "sentinel_failover"]


def plan(args) -> chaos.Plan:
    quick = args.quick
    return chaos.Plan(jobs=args.jobs or (300 if quick else 1000), gpus=args.gpus or (4 if quick else 8),
                      rate=args.rate or 20.0, faults=QUICK_FAULTS if quick else LONG_FAULTS,
                      first_fault=3.0, fault_every=(2.5 if quick else 4.0), deadline=60.0, watch=30.0,
                      api_processes=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 jobs on 4 GPUs instead of 1,000 on 8")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--rate", type=float, help="submissions per second (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, journals)")
    parser.add_argument("--out", type=Path, help="write chaos.json and performance.md here "
                        "(default: bench/chaos.json, docs/performance.md)")
    args = parser.parse_args(argv)
    the_plan = plan(args)
    out_json = (args.out / "chaos.json") if args.out else REPO / "bench" / "chaos.json"
    results_path = (args.out / "results.json") if args.out else REPO / "bench" / "results.json"
    docs_dir = args.out or REPO / "docs"
    workdir = new_workdir("chaos-")
    runner = chaos.Chaos(the_plan, workdir)

    def _terminate(signum, frame):
        runner.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    foreign = harness.ForeignCpu()
    try:
        with foreign:
            runner.start()
            result = runner.run()
    finally:
        runner.stop()
    result.update(seconds=round(time.monotonic() - started, 1), load_avg_before=load_before,
                  foreign_cpu_cores=foreign.cores(), quick=args.quick, host=harness.host_info(),
                  measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  verdict="met" if not chaos.failures(result) and result["all_final"] else "MISSED",
                  problems=chaos.failures(result))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    results = json.loads(results_path.read_text()) if results_path.exists() else report.empty_results(harness.host_info())
    doc = report.write(results, docs_dir, chaos=result)
    print(result["summary"])
    print(f"chaos: {result['verdict']} in {result['seconds']:.0f} s → {out_json}, {doc}"
          + (f"; logs kept in {workdir}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
