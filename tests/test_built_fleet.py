"""The built fleet: the images built from this tree, run as the compose file's `sim` profile.

Builds the API and worker images (deploy/images/build.sh; offline base images from Debian's
archive when no registry answers; an unchanged tree reuses the images it built before), starts
redis, nginx in front of two API replicas, two ComfyUI simulators with their workers, the webhook
worker and Flower under podman-compose, waits until the fleet is ready (podman runs no
healthchecks without systemd, and podman-compose does not wait for `service_healthy`: the test
polls), and then, only through nginx: generates and follows the event stream to the end,
downloads the image, cancels a running job, SIGKILLs the worker container running a job (and its
simulator's, so that GPU loses the job) and sees that job finish on the other GPU, and checks that Flower lists both workers. Then it tears it all
down (containers, network, volumes).

What it runs is docker-compose.yml itself, with only these changes in its copy: the third-party
images that cannot be pulled here (redis, nginx) are replaced by STAND-INS built from Debian's
packages (tests/built_fleet/*.Dockerfile, named localhost/comfy-standin/*), the published ports
are free loopback ports, relative paths are made absolute, and the services the test does not
use (logdy, Prometheus, Alertmanager, the alert receiver) are left out.

It needs root podman, podman-compose and debootstrap (deploy/setup-host.sh installs them); it
skips, saying why, without them, except where COMFY_REQUIRE_BUILT_FLEET=1 (.ci/run), where it
fails instead.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.api import LENA
from tests.support.procs import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
STANDINS = REPO / "tests" / "built_fleet"
BASE = "localhost/comfy-base/debian:bookworm"
# Official image in the compose file -> the stand-in this test uses instead.
STANDIN_FOR = {"redis": "localhost/comfy-standin/redis:bookworm", "nginx": "localhost/comfy-standin/nginx:bookworm"}
SERVICES = ["redis", "api", "nginx", "flower", "webhooks", "comfyui-sim-0", "comfyui-sim-1", "worker-sim-0",
            "worker-sim-1"]
WORKER_HOST = "ci"
REQUIRED = os.environ.get("COMFY_REQUIRE_BUILT_FLEET") == "1"

pytestmark = pytest.mark.timeout(1500)


def _why_not() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (sudo deploy/setup-host.sh installs it with Debian's packages)"
    if os.geteuid() != 0:
        return "the built-fleet test runs root podman (networks with DNS, published ports): run as root"
    if shutil.which("podman-compose", path=str(Path(sys.executable).parent)) is None:
        return "podman-compose is missing from the virtual environment (make install)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-500:]}"
    if not Path("/usr/libexec/podman/catatonit").exists():
        return "catatonit is missing (compose's `init: true`; Debian package catatonit)"
    if not Path("/usr/lib/cni/dnsname").exists():
        return "the CNI dnsname plugin is missing (golang-github-containernetworking-plugin-dnsname)"
    return None


def run(cmd: list[str], timeout: float = 900, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def image_exists(name: str) -> bool:
    return run(["podman", "image", "exists", name], check=False).returncode == 0


def registry_reachable() -> bool:
    """Can the official base image be pulled? (No: build offline, from Debian's archive.)"""
    python_image = next(line.split("=", 1)[1] for line in (REPO / "Dockerfile.api").read_text().splitlines()
                        if line.startswith("ARG PYTHON_IMAGE="))
    return run(["podman", "pull", "-q", python_image], timeout=120, check=False).returncode == 0


def build_standin(service: str) -> None:
    image = STANDIN_FOR[service]
    dockerfile = STANDINS / f"{service}.Dockerfile"
    tag = f"{image.rsplit(':', 1)[0]}:src-{abs(hash(dockerfile.read_text())) % 10**12}"  # noqa: S324 - a cache key
    if image_exists(tag):
        run(["podman", "tag", tag, image])
        return
    run(["podman", "build", "--pull=never", "--format", "docker", "-f", str(dockerfile), "-t", image, "-t", tag,
         str(STANDINS)], timeout=900)


def derived_compose(workdir: Path, http_port: int, flower_port: int) -> Path:
    """docker-compose.yml with stand-ins, free ports and absolute paths (see the module docs)."""
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    kept = {name: copy.deepcopy(services[name]) for name in SERVICES}
    for name, svc in kept.items():
        if name in STANDIN_FOR:
            svc["image"] = STANDIN_FOR[name]
        svc.pop("build", None)  # the images are built above, from the same Dockerfiles
        deps = svc.get("depends_on")
        if isinstance(deps, dict):
            svc["depends_on"] = {k: v for k, v in deps.items() if k in kept}
        svc["volumes"] = [str(REPO / v[2:]) if v.startswith("./") else v for v in svc.get("volumes", [])]
        if not svc["volumes"]:
            svc.pop("volumes")
    kept["nginx"]["ports"] = [f"127.0.0.1:{http_port}:8080"]
    kept["flower"]["ports"] = [f"127.0.0.1:{flower_port}:5555"]
    doc["services"] = kept
    doc["volumes"] = {name: spec for name, spec in doc["volumes"].items()
                      if any(v.split(":")[0] == name for svc in kept.values() for v in svc.get("volumes", []))}
    path = workdir / "docker-compose.built-fleet.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class BuiltFleet:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.project = f"comfy-ci-{secrets.token_hex(3)}"
        self.http_port, self.flower_port = free_port(), free_port()
        self.flower_auth = ("ops", secrets.token_hex(8))
        self.env = {**os.environ, "REDIS_PASSWORD": secrets.token_hex(16),
                    "FLOWER_BASIC_AUTH": ":".join(self.flower_auth), "LOGDY_PASS": secrets.token_hex(8),
                    "WORKER_HOST": WORKER_HOST, "IMAGE_PREFIX": "comfy-service", "IMAGE_TAG": "dev",
                    "COMPOSE_PROJECT_NAME": self.project}
        self.compose_file: Path | None = None
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        exe = str(Path(sys.executable).parent / "podman-compose")
        return run([exe, "-p", self.project, "-f", str(self.compose_file), *args], timeout=timeout, check=check,
                   env=self.env, cwd=REPO)

    def build(self) -> None:
        start = time.monotonic()
        args = ["bash", str(REPO / "deploy/images/build.sh"), "--engine", "podman"]
        if not registry_reachable():
            args.append("--offline")
        out = run(args, timeout=1200, env=self.env)
        sys.stderr.write(out.stdout[-2000:])
        for service in STANDIN_FOR:
            build_standin(service)
        self.timings["build"] = time.monotonic() - start

    def up(self) -> None:
        start = time.monotonic()
        self.compose_file = derived_compose(self.workdir, self.http_port, self.flower_port)
        self.compose("--profile", "sim", "up", "-d", *SERVICES, timeout=600)
        self.wait_ready()
        replicas = [c for c in self.containers() if c.get("Labels", {}).get("com.docker.compose.service") == "api"]
        assert len(replicas) == 2, f"two API replicas (deploy.replicas), found {[c['Names'] for c in replicas]}"
        self.timings["up"] = time.monotonic() - start

    def containers(self) -> list[dict]:
        out = run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                   "--format", "json"])
        return json.loads(out.stdout or "[]")

    def container_of(self, service: str) -> str:
        for c in self.containers():
            if c.get("Labels", {}).get("com.docker.compose.service") == service:
                return c["Names"][0]
        raise AssertionError(f"no container for {service}: {[c['Names'] for c in self.containers()]}")

    def wait_ready(self, timeout: float = 240) -> None:
        def ready():
            dead = [c["Names"][0] for c in self.containers() if c.get("State") in ("exited", "stopped")]
            if dead:
                raise AssertionError(f"containers exited: {dead}\n{self.logs(dead)}")
            r = requests.get(self.url + "/readyz", timeout=3)
            if r.status_code != 200:
                return False
            workers = requests.get(self.url + "/api/v1/workers", timeout=3).json()
            return len(workers.get("workers", workers) if isinstance(workers, dict) else workers) >= 2
        wait_until(ready, timeout, interval=1, what="the fleet ready through nginx (two workers)")

    def logs(self, names: list[str] | None = None) -> str:
        names = names or [c["Names"][0] for c in self.containers()]
        parts = []
        for name in names:
            out = run(["podman", "logs", "--tail", "60", name], check=False)
            parts.append(f"==== {name}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        return "\n".join(parts)

    def down(self) -> None:
        """Everything goes: podman-compose 1.6's `down` leaves containers that others depend on, so
        the project's pod, containers, network and volumes are removed by name and label after it."""
        if self.compose_file is not None:
            self.compose("down", "-v", "-t", "5", timeout=300, check=False)
        label = f"label=io.podman.compose.project={self.project}"
        run(["podman", "pod", "rm", "-f", "-t", "5", f"pod_{self.project}"], check=False)
        names = [c["Names"][0] for c in self.containers()]
        if names:
            run(["podman", "rm", "-f", "-v", "-t", "5", *names], check=False)
        run(["podman", "network", "rm", "-f", f"{self.project}_default"], check=False)
        volumes = run(["podman", "volume", "ls", "-q", "--filter", label], check=False).stdout.split()
        if volumes:
            run(["podman", "volume", "rm", "-f", *volumes], check=False)
        left = [c["Names"][0] for c in self.containers()]
        assert not left, f"containers left after tear-down: {left}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, request):
    reason = _why_not()
    if reason:
        if REQUIRED:
            pytest.fail(f"COMFY_REQUIRE_BUILT_FLEET=1 but the built-fleet test cannot run: {reason}")
        pytest.skip(reason)
    built = BuiltFleet(tmp_path_factory.mktemp("built-fleet"))
    started = time.monotonic()
    try:
        built.build()
        built.up()
        yield built
    except BaseException:
        if built.compose_file is not None:
            sys.__stderr__.write(f"\n---- built fleet logs\n{built.logs()}\n")
        raise
    finally:
        built.down()
        built.timings["total"] = time.monotonic() - started
        sys.__stderr__.write(f"\nbuilt fleet timings (s): {json.dumps({k: round(v) for k, v in built.timings.items()})}\n")


@pytest.fixture
def show_logs_on_failure(fleet, request):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.__stderr__.write(f"\n---- built fleet logs of {request.node.nodeid}\n{fleet.logs()}\n")


def submit(fleet: BuiltFleet, body: dict) -> str:
    r = requests.post(fleet.url + "/api/v1/generate", json=body, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def task(fleet: BuiltFleet, task_id: str) -> dict:
    return requests.get(f"{fleet.url}/api/v1/tasks/{task_id}", timeout=5).json()


def wait_final(fleet: BuiltFleet, task_id: str, timeout: float = 120) -> dict:
    return wait_until(lambda: (d := task(fleet, task_id))["status"] in ("succeeded", "failed", "cancelled") and d,
                      timeout, interval=0.5, what=f"task {task_id} to end")


def long_story(scenes: int = 4, steps: int = 30) -> dict:
    return {"characters": [LENA], "scenes": [f"[Lena] scene {i}" for i in range(scenes)], "width": 256,
            "height": 256, "steps": steps}


def test_generate_follow_the_event_stream_and_download_through_nginx(fleet, show_logs_on_failure):
    task_id = submit(fleet, {"workflow": "sdxl", "prompt": "a lighthouse at dusk", "width": 256, "height": 256,
                             "steps": 8})
    events, final = [], None
    with requests.get(f"{fleet.url}/api/v1/tasks/{task_id}/events", stream=True, timeout=(5, 120)) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
                events.append(kind)
            elif line.startswith("data:") and kind in ("succeeded", "failed", "cancelled"):
                final = json.loads(line.split(":", 1)[1])
                break
    assert final is not None and final["status"] == "succeeded", (events, final)
    assert "started" in events and "output" in events, events
    image = requests.get(f"{fleet.url}/api/v1/tasks/{task_id}/images/0", timeout=10)
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
    assert image.content[:8] == b"\x89PNG\r\n\x1a\n" and len(image.content) == final["result"]["images"][0]["size"]


def test_flower_lists_both_workers(fleet, show_logs_on_failure):
    def both():
        r = requests.get(f"http://127.0.0.1:{fleet.flower_port}/api/workers?refresh=1", auth=fleet.flower_auth,
                         timeout=15)
        r.raise_for_status()
        names = {name.split("@")[0] for name in r.json()}
        assert names >= {f"gpu.{WORKER_HOST}.0", f"gpu.{WORKER_HOST}.1"}, f"Flower lists {sorted(r.json())}"
        return True
    wait_until(both, 60, interval=1, what="Flower listing both GPU workers")
    assert requests.get(f"http://127.0.0.1:{fleet.flower_port}/api/workers", timeout=5).status_code == 401


def test_cancel_a_running_job_through_nginx(fleet, show_logs_on_failure):
    task_id = submit(fleet, long_story())
    wait_until(lambda: task(fleet, task_id)["status"] == "running", 60, interval=0.3, what="the job running")
    r = requests.delete(f"{fleet.url}/api/v1/tasks/{task_id}", timeout=10)
    assert r.status_code in (200, 202), r.text
    assert wait_final(fleet, task_id, 60)["status"] == "cancelled"


def test_a_killed_worker_container_loses_no_job(fleet, show_logs_on_failure):
    task_id = submit(fleet, long_story(scenes=3, steps=20))
    doc = wait_until(lambda: (d := task(fleet, task_id))["status"] == "running" and d.get("gpu") and d, 60,
                     interval=0.3, what="the job running on a GPU")
    gpu = doc["gpu"]
    index = gpu.rsplit(".", 1)[1]
    # The worker and its ComfyUI both die: that GPU lost the job, which must run on the other one.
    # (A worker killed alone leaves the job to its ComfyUI, and the outputs are collected there.)
    run(["podman", "kill", "--signal", "KILL", fleet.container_of(f"worker-sim-{index}"),
         fleet.container_of(f"comfyui-sim-{index}")])
    final = wait_final(fleet, task_id, 240)
    assert final["status"] == "succeeded", final
    assert final["gpu"] != gpu, f"the job finished on {final['gpu']}, the GPU whose worker was killed"
    assert len(final["result"]["images"]) == 3
    # The rest of the fleet kept serving.
    assert requests.get(fleet.url + "/healthz", timeout=5).status_code == 200
