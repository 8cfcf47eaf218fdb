"""The bare-host systemd units (deploy/comfyui/), run as systemd would run them, without systemd.

The units' own command lines are read from the files, their specifiers and variables expanded as
systemd does (`%i`, `${VAR}` from Environment= and EnvironmentFile=), and run in order against an
EMPTY state directory (all that StateDirectory= gives). ComfyUI itself is stood in for by the
simulator behind a `main.py` that takes ComfyUI 0.8's command line and, like ComfyUI, refuses a
--user-directory that does not exist. The install paths (/opt/comfyui, /var/lib/comfyui) are
moved under a temporary folder; nothing else in the commands changes.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support.procs import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "comfyui"

STAND_IN_MAIN = '''"""STAND-IN for ComfyUI's main.py (tests/test_systemd_units.py): ComfyUI 0.8's command line,
served by the comfy-service simulator."""
import argparse
import os
import sys


def is_valid_directory(path):  # as ComfyUI's cli_args does for --user-directory
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"The path '{path}' does not exist.")
    return path


parser = argparse.ArgumentParser()
parser.add_argument("--listen", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8188)
parser.add_argument("--cuda-device", type=int)
parser.add_argument("--disable-auto-launch", action="store_true")
parser.add_argument("--output-directory")
parser.add_argument("--input-directory")
parser.add_argument("--temp-directory")
parser.add_argument("--user-directory", type=is_valid_directory)
args = parser.parse_args()
os.execv(sys.executable, [sys.executable, "-m", "comfyui_sim", "--host", args.listen, "--port", str(args.port),
                          "--output-dir", args.output_directory])
'''


def read_unit(name: str) -> dict[str, list[str]]:
    """The [Service] settings of a unit file, continuation lines joined, each key a list."""
    text = re.sub(r"\\\n\s*", " ", (UNITS / name).read_text())
    settings: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


class Host:
    """The bare host in a folder: /opt/comfyui and /var/lib/comfyui moved, an env file per GPU."""

    def __init__(self, root: Path):
        self.root = root
        self.opt = root / "opt" / "comfyui"
        self.state = root / "var" / "lib" / "comfyui"
        self.etc = root / "etc" / "comfy-service"
        (self.opt / "ComfyUI" / "models" / "checkpoints").mkdir(parents=True)
        self.state.mkdir(parents=True)
        self.etc.mkdir(parents=True)
        for script in ("fetch-models.sh", "prune-outputs.sh"):
            shutil.copy2(UNITS / script, self.opt / script)
        (self.opt / "ComfyUI" / "main.py").write_text(STAND_IN_MAIN)
        (self.opt / "venv" / "bin").mkdir(parents=True)
        python = self.opt / "venv" / "bin" / "python"  # ComfyUI's venv: this test's interpreter
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
        # One small model, present and listed with its real checksum: the unit's model check passes.
        model = self.opt / "ComfyUI" / "models" / "checkpoints" / "tiny.safetensors"
        model.write_bytes(b"tiny model")
        import hashlib

        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        (self.opt / "models.txt").write_text(f"checkpoints/tiny.safetensors {digest} {model.stat().st_size} "
                                             "https://example.invalid/tiny.safetensors\n")

    def path(self, text: str) -> str:
        return (text.replace("/opt/comfyui", str(self.opt)).replace("/var/lib/comfyui", str(self.state))
                .replace("/etc/comfy-service", str(self.etc)))

    def environment(self, unit: dict, instance: str) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "LOG_DIR": ""}
        for item in unit.get("Environment", []):
            for pair in shlex.split(item):
                key, value = pair.split("=", 1)
                env[key] = self.path(value.replace("%i", instance))
        for item in unit.get("EnvironmentFile", []):
            path = Path(self.path(item.lstrip("-").replace("%i", instance)))
            if not path.exists() and item.startswith("-"):
                continue
            for line in path.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, value = line.split("=", 1)
                    env[key.strip()] = value.strip()
        return env

    def command(self, line: str, instance: str, env: dict[str, str]) -> list[str]:
        line = self.path(line.replace("%i", instance)).lstrip("-@+!")
        line = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), line)
        return shlex.split(line)


def test_comfyui_unit_starts_on_an_empty_state_directory(tmp_path):
    host = Host(tmp_path)
    port = free_port()
    (host.etc / "gpu-0.env").write_text(f"GPU_INDEX=0\nCOMFYUI_PORT={port}\nCOMFYUI_LISTEN=127.0.0.1\n")
    unit = read_unit("comfyui@.service")
    env = host.environment(unit, "0")
    state = host.state / "gpu-0"
    state.mkdir()  # StateDirectory=comfyui/gpu-%i: systemd creates this folder, empty, and nothing in it
    cwd = host.path(unit["WorkingDirectory"][0])
    start = host.command(unit["ExecStart"][0], "0", env)

    # Without the units' preparation, ComfyUI refuses to start (the defect this guards against).
    refused = subprocess.run(start, cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "does not exist" in refused.stderr

    for line in unit["ExecStartPre"]:
        pre = subprocess.run(host.command(line, "0", env), cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=60)
        assert pre.returncode == 0, f"{line}: {pre.stdout}{pre.stderr}"
    for folder in ("user", "input", "output", "temp"):
        assert (state / folder).is_dir(), folder
    proc = subprocess.Popen(start, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            return requests.get(f"http://127.0.0.1:{port}/system_stats", timeout=1).status_code == 200
        wait_until(up, 20, interval=0.2, what="ComfyUI (simulator) started by comfyui@0's ExecStart")
    finally:
        proc.kill()
        proc.wait(10)


def test_prune_unit_deletes_old_output_copies_like_the_image(tmp_path):
    host = Host(tmp_path)
    state = host.state / "gpu-1"
    for folder in ("output", "temp", "user", "input"):
        (state / folder).mkdir(parents=True)
    old, fresh = state / "output" / "sub" / "old.png", state / "output" / "fresh.png"
    old.parent.mkdir()
    old_temp, kept_input = state / "temp" / "old.tmp", state / "input" / "old-input.png"
    for f in (old, fresh, old_temp, kept_input):
        f.write_bytes(b"png")
    two_days_ago = time.time() - 2 * 86400
    for f in (old, old_temp, kept_input):
        os.utime(f, (two_days_ago, two_days_ago))

    unit = read_unit("comfyui-prune@.service")
    env = host.environment(unit, "1")
    assert env["COMFYUI_OUTPUT_RETENTION_MINUTES"] == "1440"
    for line in unit["ExecStart"]:
        done = subprocess.run(host.command(line, "1", env), env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    assert fresh.exists() and kept_input.exists()
    assert not old.exists() and not old_temp.exists() and not old.parent.exists()

    # The env file's retention wins over the unit's default; 0 keeps everything.
    (host.etc / "gpu-1.env").write_text("COMFYUI_OUTPUT_RETENTION_MINUTES=0\n")
    os.utime(fresh, (two_days_ago, two_days_ago))
    env = host.environment(unit, "1")
    subprocess.run(host.command(unit["ExecStart"][0], "1", env), env=env, check=True, timeout=30)
    assert fresh.exists()

    # The image prunes with the same script.
    assert "prune-outputs.sh" in (UNITS / "entrypoint.sh").read_text()
    assert "prune-outputs.sh" in (UNITS / "Dockerfile").read_text()
    timer = (UNITS / "comfyui-prune@.timer").read_text()
    assert "OnUnitActiveSec=10min" in timer
    assert "comfyui-prune@.timer" in (UNITS / "install.sh").read_text()
