"""The benchmark suite runs end to end: `python -m bench --quick idle` (the cheapest figure)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(90)


def test_quick_idle_figure_writes_results_and_report(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), "idle"], cwd=REPO,
                         capture_output=True, text=True, timeout=80)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("idle "), run.stdout
    figure = json.loads((tmp_path / "results.json").read_text())["figures"]["idle"]
    assert "error" not in figure, figure
    assert isinstance(figure["value"]["median_ms"], float) and figure["value"]["median_ms"] >= 0
    assert isinstance(figure["baseline"]["ms"]["p50"], float)
    assert "GPU idle gap" in (tmp_path / "performance.md").read_text()
    assert (tmp_path / "perf-idle.png").stat().st_size > 0
