"""The benchmark suite runs end to end: `python -m bench --quick idle` (the cheapest figure)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.procs import REPO, SimProcess, free_port

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


@pytest.mark.timeout(150)
def test_comfyui_url_runs_the_real_twins_against_the_named_server(tmp_path):
    """`--comfyui-url` (`make bench COMFYUI_URL=…`): CI has no real ComfyUI, so a simulator
    stands in for the named server; the figures read only what a real one offers (history)."""
    sim = SimProcess(port=free_port(), args=[], workdir=tmp_path).start()
    try:
        run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path / "out"),
                              "--comfyui-url", sim.url, "idle_real", "overhead_real"], cwd=REPO,
                             capture_output=True, text=True, timeout=140)
    finally:
        sim.kill()
    assert run.returncode == 0, run.stdout + run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()[:2]] == ["idle_real", "overhead_real"], run.stdout
    figures = json.loads((tmp_path / "out" / "results.json").read_text())["figures"]
    for name in ("idle_real", "overhead_real"):
        assert "error" not in figures[name], figures[name]
        assert figures[name]["comfyui"]["url"] == sim.url
        assert figures[name]["comfyui"]["comfyui_version"]
        assert figures[name]["execution_ms"]["n"] > 0
    assert isinstance(figures["idle_real"]["value"]["median_ms"], float)
    assert figures["overhead_real"]["baseline"]["ms"]["n"] == figures["overhead_real"]["service_ms"]["n"] > 0
    report = (tmp_path / "out" / "performance.md").read_text()
    assert "## 1b. Service overhead per job on a real ComfyUI" in report and sim.url in report


def test_real_figures_need_a_comfyui_url(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), "idle_real"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "--comfyui-url" in run.stderr, run.stderr


def test_dispatch_bound_on_measured_costs_is_below_every_schedule_and_every_calibration_prompt():
    """The dispatch figure's judged bound: each GPU's envelope lies under all its measured
    prompts, and for a burst the bound is the total work over the fleet's capacity, which
    an exact split of equal jobs reaches and nothing beats."""
    from bench.dispatch import envelope, measured_bound

    points = [(4, 0.06), (10, 0.125), (25, 0.27), (70, 0.72), (4, 0.055), (10, 0.12)]
    a, b = envelope(points)
    assert all(y >= a * x + b - 1e-12 for x, y in points)
    assert any(abs(y - (a * x + b)) < 1e-12 for x, y in points)  # it touches the fastest prompt

    costs = [(0.01, 0.01), (0.02, 0.02)]  # two GPUs: 100 and 50 steps/s, one step-equivalent each per prompt
    steps = [9] * 30  # 10 step-equivalents per job, 300 in all, at 150 steps/s
    assert measured_bound([0.0] * 30, steps, costs) == pytest.approx(2.0)
    # 20 jobs on the fast GPU (20 × 0.1 s) and 10 on the slow one (10 × 0.2 s) both end at 2 s.
    assert 20 * (0.01 * 9 + 0.01) == pytest.approx(2.0) and 10 * (0.02 * 9 + 0.02) == pytest.approx(2.0)
    # A late, long job is bounded by its own time on the GPU that runs it soonest.
    assert measured_bound([0.0, 5.0], [1, 100], costs) == pytest.approx(5.0 + 0.01 * 100 + 0.01)
