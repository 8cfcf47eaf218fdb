"""deploy/setup-host.sh, which `make test` and .ci/run both run first: it names what is missing
and the one command that installs it, and passes where everything is there."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "setup-host.sh"


def test_passes_where_everything_is_installed():
    done = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_names_what_is_missing_and_the_command_that_installs_it(tmp_path):
    # A PATH with only the basic tools the script itself uses: redis-server, nginx, promtool, ... are missing.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "sort", "sed", "dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = subprocess.run([str(bin_dir / "bash"), str(SCRIPT), "--check"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PATH": str(bin_dir)})
    assert done.returncode == 1
    assert "missing nginx prometheus prometheus-alertmanager redis-server" in done.stderr, done.stderr
    assert f"sudo {SCRIPT.parent}/setup-host.sh" in done.stderr
    # --check installs nothing, even as root.
    assert "installing" not in done.stdout


def test_make_test_and_ci_run_use_it():
    assert "bash deploy/setup-host.sh" in (REPO / ".ci/run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "test: setup $(STAMP)" in makefile and "\tbash deploy/setup-host.sh" in makefile
    assert "deploy/setup-host.sh" in (REPO / "README.md").read_text()
