"""deploy/k8s/, checked offline (no cluster runs on CI):

- every manifest against the Kubernetes schemas bundled in `kubernetes-validate`, strictly
  (an unknown field fails, as with kubectl's server-side field validation);
- the KEDA ScaledObject against KEDA's own CRD schema (vendored: tests/data/keda/), strictly too;
- what ties the manifests to the code: the trigger's query names the gauge the API exports, the
  images are those built from Dockerfile.api / Dockerfile.worker, every variable is a setting
  of common/settings.py, the queue name follows the pod's name, the grace period covers the
  prompts a draining worker finishes, the scaling bounds agree;
- the worker's preStop hook run for real: a worker that is PID 1 of its own PID namespace, as in
  its container, drains its prompts and exits; the job waiting behind them moves to another GPU.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from common.settings import Settings
from tests.support.procs import REPO, wait_until

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.33"  # native sidecars (restartPolicy on init containers) are on by default since 1.29
KEDA_CRD = REPO / "tests" / "data" / "keda" / "keda.sh_scaledobjects-v2.20.2.yaml"
GAUGE = "comfy_fleet_desired_gpus"
# Variables the manifests set that are not the service's settings: the pod's name (downward
# API), the ComfyUI image's own settings (docs/deploy.md), S3 credentials, the in-cluster Redis.
EXTERNAL = {"POD_NAME", "COMFYUI_PORT", "COMFYUI_LISTEN", "COMFYUI_FETCH_MODELS", "HF_TOKEN", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "REDIS_PASSWORD", "REDISCLI_AUTH"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[Path, dict]]:
    found = [(path, doc) for path in sorted(K8S.rglob("*.yaml")) for doc in documents(path)]
    return [(path, doc) for path, doc in found if doc["kind"] != "Kustomization"]


def one(kind: str, name: str | None = None) -> dict:
    matches = [doc for _, doc in manifests() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def config() -> dict[str, str]:
    return one("ConfigMap", "comfy-service-config")["data"]


def pod(name: str) -> dict:
    return one({"comfy-api": "Deployment", "comfy-gpu": "StatefulSet"}[name], name)["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    [found] = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name]
    return found


# ---- Schemas ----------------------------------------------------------------------------------

def test_every_manifest_validates_against_the_kubernetes_schemas():
    kinds = set()
    for path, doc in manifests():
        if doc["kind"] == "ScaledObject":
            continue  # a custom resource: KEDA's schema, below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "StatefulSet"}
    listed = {Path(entry) for entry in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]}
    assert {p.relative_to(K8S) for p in K8S.glob("*.yaml")} - listed == {Path("kustomization.yaml"),
                                                                        Path("secret.example.yaml")}


def test_the_kubernetes_schemas_catch_mistakes():
    statefulset = one("StatefulSet", "comfy-gpu")
    wrong_type = copy.deepcopy(statefulset)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "an hour"
    unknown_field = copy.deepcopy(statefulset)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["prestop"] = {}
    for broken in (wrong_type, unknown_field):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _strict(schema: dict) -> dict:
    """The CRD's schema with unknown fields refused, as the API server's strict field
    validation does (a structural schema prunes them otherwise, silently)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def scaled_object_validator() -> jsonschema.Validator:
    crd = documents(KEDA_CRD)[0]
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_the_scaled_object_validates_against_kedas_crd():
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    validator = scaled_object_validator()
    validator.validate(scaled)
    for mistake in ({"minReplicaCount": -1}, {"triggers": []}, {"minReplicas": 0},
                    {"fallback": {"failureThreshold": 3, "replicas": 1, "behavior": "sometimes"}}):
        broken = copy.deepcopy(scaled)
        broken["spec"].update(mistake)
        assert list(validator.iter_errors(broken)), mistake


# ---- What ties the manifests to the code --------------------------------------------------------

def test_keda_scales_the_gpu_statefulset_on_the_gauge_the_api_exports(redis_server):
    from app import create_app

    scaled = one("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    gpus = one("StatefulSet", target["name"])
    assert (target["kind"], target["apiVersion"], gpus["apiVersion"]) == ("StatefulSet", "apps/v1", "apps/v1")
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(meta)
    # Replicas = ceil(gauge / threshold) under AverageValue: threshold 1 makes them the gauge.
    assert (trigger["metricType"], float(meta["threshold"]), float(meta["activationThreshold"])) == \
        ("AverageValue", 1.0, 0.0)
    assert meta["ignoreNullValues"] == "false" and scaled["spec"]["fallback"]["behavior"] == "currentReplicas"
    named = set(re.findall(r"\b[a-z_:][a-z0-9_:]*\b(?!\s*\()", meta["query"])) - {"by", "without"}
    assert named == {GAUGE}, meta["query"]

    app = create_app(Settings(REDIS_URL=redis_server.url, LOG_DIR=""))
    exported = app.test_client().get("/metrics").get_data(as_text=True)
    assert re.search(rf"^# TYPE {GAUGE} gauge$", exported, re.M) and re.search(rf"^{GAUGE} 0\.0$", exported, re.M)

    settings = Settings(**config())
    assert scaled["spec"]["minReplicaCount"] == settings.scale_min_gpus == 0  # to zero when idle
    assert scaled["spec"]["maxReplicaCount"] == settings.scale_max_gpus
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0  # the gauge holds SCALE_DOWN_DELAY


def image_name(reference: str) -> str:
    """`registry/comfy-service/api:tag` → `comfy-service/api`; compose's `${IMAGE_PREFIX:-x}` → `x`."""
    reference = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", reference)
    return "/".join(reference.split(":")[0].split("/")[-2:])


def test_images_are_those_the_dockerfiles_build():
    built = {}
    for service in yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"].values():
        build = service.get("build")
        if isinstance(build, dict) and build.get("dockerfile") in ("Dockerfile.api", "Dockerfile.worker"):
            built[image_name(service["image"])] = build["dockerfile"]
    assert built == {"comfy-service/api": "Dockerfile.api", "comfy-service/worker": "Dockerfile.worker"}
    assert image_name(container(pod("comfy-api"), "api")["image"]) == "comfy-service/api"
    assert image_name(container(pod("comfy-gpu"), "worker")["image"]) == "comfy-service/worker"
    assert container(pod("comfy-gpu"), "comfyui")["image"].startswith("comfy-service/comfyui:0.8.")
    overridable = {entry["name"] for entry in yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]}
    assert overridable == {"comfy-service/api", "comfy-service/worker", "comfy-service/comfyui"}
    # The uid the images run as (USER in the Dockerfiles), and the API's port.
    assert "USER 10001:10001" in (REPO / "Dockerfile.api").read_text()
    assert "USER 10001:10001" in (REPO / "Dockerfile.worker").read_text()
    for name in ("comfy-api", "comfy-gpu"):
        assert pod(name)["securityContext"]["runAsUser"] == 10001
    api = container(pod("comfy-api"), "api")
    assert api["ports"][0]["containerPort"] == int({e["name"]: e["value"] for e in api["env"]}["API_PORT"]) == 8080


def env_names() -> set[str]:
    names = set(config())
    names |= set(one("Secret", "comfy-service-secrets")["stringData"])
    for _, doc in manifests():
        spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            names |= {e["name"] for e in c.get("env", [])}
    return names


def test_every_variable_is_a_setting_of_the_service_or_named_external():
    aliases = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        aliases |= set(getattr(alias, "choices", None) or [alias])
    unknown = env_names() - aliases - EXTERNAL
    assert not unknown, f"not in common/settings.py: {unknown}"
    settings = Settings(**config())  # every value parses as the service parses it
    assert settings.storage_backend == "s3" and settings.s3_bucket
    assert settings.visibility_timeout > settings.job_timeout


def test_the_gpu_pod_names_its_queue_runs_comfyui_on_the_gpu_and_drains_before_it_goes():
    spec = pod("comfy-gpu")
    comfyui, worker = container(spec, "comfyui"), container(spec, "worker")
    assert comfyui["restartPolicy"] == "Always" and comfyui in spec["initContainers"]  # stops after the worker
    assert comfyui["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in str(worker["resources"])
    env = {e["name"]: e for e in worker["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The kubelet expands $(POD_NAME); the worker then names its queue as common/settings.py does.
    values = {k: e["value"].replace("$(POD_NAME)", "comfy-gpu-3") for k, e in env.items() if "value" in e}
    settings = Settings(**config(), **values)
    assert settings.queue_name == "gpu.comfy-gpu-3.0" and settings.worker_host == "comfy-gpu-3"
    port = {e["name"]: e.get("value") for e in comfyui["env"]}["COMFYUI_PORT"]
    assert settings.comfyui_url == f"http://127.0.0.1:{port}"
    # The grace period covers the prompts a draining worker finishes (WORKER_CONCURRENCY of them).
    assert spec["terminationGracePeriodSeconds"] >= settings.job_timeout * settings.worker_concurrency
    assert worker["lifecycle"]["preStop"]["exec"]["command"][:2] == ["sh", "-c"]
    assert worker.get("command", ["python", "-m", "workers"]) == ["python", "-m", "workers"]  # PID 1
    # The API stays in its Service while the GPU fleet is at zero.
    api = container(pod("comfy-api"), "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"


# ---- The preStop hook, for real --------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.timeout(150)
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                    reason="needs root and util-linux's unshare/nsenter for a PID namespace")
def test_prestop_drains_the_worker_and_the_waiting_job_moves(fleet_factory):
    from tests.support.api import submit, wait_status
    from tests.support.fleet import Proc

    fleet = fleet_factory()
    sim_a, sim_b = fleet.add_sim("--step-seconds", "0.15"), fleet.add_sim("--step-seconds", "0.15")
    # Worker A as in its container: PID 1 of its own PID namespace (unshare --fork).
    a = Proc("worker-0", ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "workers"],
             {**fleet.env(), "COMFYUI_URL": sim_a.url, "GPU_QUEUE": "gpu.test.0", "WORKER_CONCURRENCY": "2"},
             fleet.workdir / "worker-0.log").start()
    fleet.workers.append(a)
    fleet.wait_workers(1)
    fleet.start_api()
    jobs = [submit(fleet.url, {"workflow": "sdxl", "prompt": f"job {i}", "width": 256, "height": 256, "steps": 20})
            for i in range(3)]  # 3 s each: one runs, one waits inside ComfyUI, one in Celery

    def doc(job: dict) -> dict:
        return requests.get(f"{fleet.url}/api/v1/tasks/{job['task_id']}", timeout=5).json()

    # Worker A takes the first two at once, and either may reach ComfyUI first. GPU A freezes
    # mid-run until the drain has begun, so the third job is still in Celery when the hook runs,
    # however long worker B takes to start on a loaded host.
    wait_until(lambda: any(doc(job)["status"] == "running" for job in jobs[:2]), 20, what="a job running on GPU A")
    sim_a.faults(stall=True)
    fleet.add_worker(sim_b, queue="gpu.test.1")
    fleet.wait_workers(2)
    assert sorted((d["status"], d["gpu"]) for d in map(doc, jobs[:2])) == [
        ("queued", "gpu.test.0"), ("running", "gpu.test.0")]
    waiting = doc(jobs[2])
    assert (waiting["status"], waiting["gpu"]) == ("queued", None), waiting

    [worker_pid] = _children(a.proc.pid)  # the namespace's PID 1, seen from here
    hook = container(pod("comfy-gpu"), "worker")["lifecycle"]["preStop"]["exec"]["command"]
    ran = subprocess.Popen(["nsenter", "--target", str(worker_pid), "--pid", "--mount", *hook],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: doc(jobs[2])["gpu"] == "gpu.test.1", 30, what="the waiting job moved to GPU B")
        assert ran.poll() is None, "the hook ended while its worker's prompts were still inside ComfyUI"
    finally:
        sim_a.faults(stall=False)
    released = time.monotonic()
    _, stderr = ran.communicate(timeout=120)
    took = time.monotonic() - released
    # When a PID namespace's init exits, the kernel kills what is left in it, the hook included
    # (in a pod: the container stops): either way the hook lasted until the worker had exited.
    assert ran.returncode in (0, -9), (ran.returncode, stderr)
    assert a.proc.wait(10) is not None

    docs = [wait_status(fleet.url, job["task_id"], timeout=30) for job in jobs]
    assert [d["status"] for d in docs] == ["succeeded"] * 3, docs
    finished = [doc(d) for d in docs]
    assert [d["gpu"] for d in finished] == ["gpu.test.0", "gpu.test.0", "gpu.test.1"]  # the drained GPU kept two
    assert took >= 3.0  # it waited for the prompt still queued inside ComfyUI (3 s), not only for the signal
    wait_until(lambda: not a.alive(), 5, what="worker A's namespace gone")
