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
