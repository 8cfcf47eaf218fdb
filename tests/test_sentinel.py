"""Redis Sentinel: REDIS_URL=sentinel://... and a real failover under a running fleet.

The URL forms are checked as pure functions. Then a master, its replica and three Sentinels
(tests/support/sentinel.py) carry a fleet (simulator, worker, API under gunicorn) while the
master is SIGKILLed with jobs queued, running and arriving: every job finishes once, and the
API, its event streams, its rate limiter and the worker's heartbeat carry on against the
promoted replica without a restart.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis
import requests
import sseclient

from common import keys, redis_conn
from common.settings import Settings
from common.task_store import read_record
from tests.support.api import story, submit, wait_status
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(150)


# The URL forms (pure) ------------------------------------------------------------------------

def test_a_sentinel_url_names_its_sentinels_db_and_the_masters_credentials():
    parse = redis_conn.parse_sentinel_url
    assert parse("sentinel://10.0.0.1:26379,10.0.0.2:26380/2") == redis_conn.SentinelURL(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)), 2)
    assert parse("sentinel://:p%40ss@s1,s2:1/0") == redis_conn.SentinelURL((("s1", 26379), ("s2", 1)), 0, None, "p@ss")
    assert parse("SENTINEL://app:pw@[::1]:5000") == redis_conn.SentinelURL((("::1", 5000),), 0, "app", "pw")
    assert parse("sentinel://s1:26379/") == redis_conn.SentinelURL((("s1", 26379),), 0)
    for plain in ("redis://127.0.0.1:6379/0", "rediss://:pw@h:6380/0?ssl_cert_reqs=required", "unix:///run/r.sock"):
        assert parse(plain) is None


@pytest.mark.parametrize("url", ["sentinel:///0", "sentinel://s1,,s2/0", "sentinel://s1:port/0", "sentinel://s1/x",
                                 "sentinel://s1/0?socket_timeout=1"])
def test_a_malformed_sentinel_url_is_refused_at_start(url):
    with pytest.raises(ValueError, match="REDIS_URL"):
        Settings(REDIS_URL=url)


def test_celery_gets_kombus_form_one_url_per_sentinel_and_the_master_name():
    settings = Settings(REDIS_URL="sentinel://:p%40ss@s1:26379,[::1]:26380/3", REDIS_SENTINEL_MASTER="jobs",
                        REDIS_SENTINEL_PASSWORD="spw")
    assert redis_conn.celery_broker(settings) == (
        "sentinel://:p%40ss@s1:26379/3;sentinel://:p%40ss@[::1]:26380/3",
        {"master_name": "jobs", "sentinel_kwargs": {"password": "spw"}})
    plain = Settings(REDIS_URL="redis://:pw@h:6379/1")
    assert redis_conn.celery_broker(plain) == ("redis://:pw@h:6379/1", {})
    from common.producer import make_celery

    conf = make_celery(settings).conf
    assert conf.broker_transport_options["master_name"] == "jobs"
    assert conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout


def test_clients_through_sentinels_keep_the_options_and_the_bounded_pool():
    settings = Settings(REDIS_URL="sentinel://:pw@s1:26379,s2:26379/4", REDIS_SENTINEL_PASSWORD="spw")
    client = redis_conn.connect(settings, max_connections=7, wait=3, socket_timeout=5, client_name="comfy-api")
    pool = client.connection_pool
    assert isinstance(pool, redis_conn.SentinelBlockingConnectionPool)
    assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 7 and pool.timeout == 3
    assert pool.service_name == "mymaster"
    assert {k: pool.connection_kwargs[k] for k in ("db", "password", "client_name", "socket_timeout")} == {
        "db": 4, "password": "pw", "client_name": "comfy-api", "socket_timeout": 5}
    sentinel_kwargs = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert (sentinel_kwargs["password"], sentinel_kwargs["port"]) == ("spw", 26379)
    unbounded = redis_conn.connect(settings).connection_pool
    assert type(unbounded) is redis.sentinel.SentinelConnectionPool
    plain = redis_conn.connect(Settings(REDIS_URL="redis://h:1/2"), max_connections=9, client_name="x").connection_pool
    assert type(plain) is redis.BlockingConnectionPool and plain.max_connections == 9
    assert plain.connection_kwargs["client_name"] == "x"


# A failover under a running fleet --------------------------------------------------------------

GENERATE_LIMIT = 40  # per minute: above what the scenario submits, reached on purpose at the end
SIM_ARGS = ("--step-seconds", "0.05", "--load-seconds", "0.2")


def job(steps: int = 6) -> dict:
    return story(scenes=["[Lena] reads a letter"], steps=steps)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from tests.support.fleet import Fleet
    from tests.support.sentinel import SentinelGroup

    workdir = tmp_path_factory.mktemp("sentinel-fleet")
    group = SentinelGroup(workdir).start()
    # One prompt at a time on the GPU: jobs submitted behind the running one wait in Redis (in
    # the broker's queue) through the failover instead of inside the worker.
    fleet = Fleet(workdir=workdir, redis=group,
                  extra_env={"RATE_LIMIT_GENERATE": f"{GENERATE_LIMIT}/minute", "SSE_KEEPALIVE": "0.5",
                             "WORKER_CONCURRENCY": "1"})
    try:
        fleet.start_gpus(1, *SIM_ARGS)
        yield fleet
    finally:
        fleet.stop()


class Follower(threading.Thread):
    """A caller following one job's event stream to its end, reconnecting with Last-Event-ID
    whenever the stream breaks (as sseclient-based callers do)."""

    def __init__(self, base: str, task_id: str):
        super().__init__(daemon=True)
        self.base, self.task_id = base, task_id
        self.events: list[tuple[str | None, str]] = []  # (id, type); a queue position update has no id
        self.refused: list[int] = []  # status codes of reconnects that were not a stream
        self.streams = 0

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream"}
            ids = [event_id for event_id, _ in self.events if event_id]
            if ids:
                headers["Last-Event-ID"] = ids[-1]
            try:
                response = requests.get(f"{self.base}/api/v1/tasks/{self.task_id}/events", headers=headers,
                                        stream=True, timeout=10)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if response.status_code != 200:
                self.refused.append(response.status_code)
                response.close()
                time.sleep(0.2)
                continue
            self.streams += 1
            try:
                for event in sseclient.SSEClient(response).events():
                    self.events.append((event.id or None, event.event))
                    if event.event in ("succeeded", "failed", "cancelled"):
                        return
            except requests.RequestException:
                pass
            finally:
                response.close()


class Submitter(threading.Thread):
    """A caller submitting a job every `every` seconds, each with its own Idempotency-Key, and
    retrying one job (same key) until it is accepted: what a client does through an outage."""

    def __init__(self, base: str, every: float = 0.3):
        super().__init__(daemon=True)
        self.base, self.every = base, every
        self.accepted: list[dict] = []
        self.errors: list[tuple[float, int, dict]] = []  # (when, status, error body)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            key = uuid.uuid4().hex
            while True:
                response = requests.post(f"{self.base}/api/v1/generate", json=job(), timeout=20,
                                         headers={"Idempotency-Key": key})
                if response.status_code == 202:
                    self.accepted.append(response.json())
                    break
                self.errors.append((time.monotonic(), response.status_code, response.json()))
                time.sleep(0.1)
            self.stop.wait(self.every)


@pytest.fixture(scope="module")
def failover(fleet):
    """Jobs finished, running, waiting, arriving and submitted after a SIGKILL of the master,
    and what the callers saw meanwhile."""
    group = fleet.redis
    api_pid, worker_pid = fleet.api.proc.pid, fleet.workers[0].proc.pid
    done = [submit(fleet.url, job()) for _ in range(2)]
    for task in done:
        assert wait_status(fleet.url, task["task_id"])["status"] == "succeeded"
    running = submit(fleet.url, job(steps=60))  # ~3 s on the GPU: running when the master dies
    wait_until(lambda: requests.get(f"{fleet.url}/api/v1/tasks/{running['task_id']}", timeout=5).json()["status"]
               == "running", 20, what="the long job running")
    waiting = [submit(fleet.url, job()) for _ in range(2)]  # in the broker's queue behind it
    follower = Follower(fleet.url, waiting[0]["task_id"])
    follower.start()
    wait_until(lambda: follower.events, 10, what="the event stream open")
    submitter = Submitter(fleet.url)
    submitter.start()
    time.sleep(0.3)

    old = group.master()
    killed_at = time.monotonic()
    old.kill()
    new = group.wait_failover(old.port)
    promoted_at = time.monotonic()
    # The API is back when a request that needs Redis succeeds again.
    wait_until(lambda: requests.get(f"{fleet.url}/api/v1/tasks/{done[0]['task_id']}", timeout=5).status_code == 200,
               20, interval=0.05, what="the API reading from the new master")
    api_back_at = time.monotonic()
    time.sleep(1.0)
    submitter.stop.set()
    submitter.join(30)
    after = [submit(fleet.url, job()) for _ in range(2)]
    return {"done": done, "running": running, "waiting": waiting, "during": submitter.accepted, "after": after,
            "errors": submitter.errors, "follower": follower, "old": old, "new": new, "killed_at": killed_at,
            "promoted_at": promoted_at, "api_back_at": api_back_at, "api_pid": api_pid, "worker_pid": worker_pid}


def task_record(client: redis.Redis, task_id: str) -> dict:
    return read_record(client, task_id) or {}


def test_jobs_finished_waiting_arriving_and_after_the_failover_all_finish_once(fleet, failover):
    jobs = [*failover["done"], *failover["waiting"], *failover["during"], *failover["after"]]
    assert len(failover["during"]) >= 3, "the submitter got jobs in across the failover"
    ids = [j["task_id"] for j in jobs]
    assert len(set(ids)) == len(ids), "an idempotent retry queued a job twice"
    docs = [wait_status(fleet.url, task_id, timeout=60) for task_id in ids]
    assert [d["status"] for d in docs] == ["succeeded"] * len(docs), [(d["task_id"], d["error"]) for d in docs]
    master = failover["new"].client()
    prompts = fleet.sims[0].record()["submitted"]
    for doc in docs:
        assert len(doc["result"]["images"]) == 1  # one result set
        assert requests.get(fleet.url + doc["result"]["images"][0]["url"], timeout=5).status_code == 200
        record = task_record(master, doc["task_id"])
        assert record["attempts"] == 1 and prompts.count(record["prompt_id"]) == 1
    # ComfyUI got one prompt per job, plus the job that was running at the failover's.
    running_attempts = task_record(master, failover["running"]["task_id"]).get("attempts", 1)
    assert len(prompts) == len(docs) + running_attempts, prompts


def test_callers_see_a_short_503_window_and_no_process_restarts(fleet, failover):
    errors = failover["errors"]
    assert errors, "the submitter never saw the failover"
    for _, status, body in errors:
        assert status == 503 and body["error"]["source"] == "service", body
    window = failover["api_back_at"] - failover["killed_at"]
    assert window < 15, f"the API needed {window:.1f}s to reach the new master"
    # Same processes: nothing was restarted to follow the master.
    assert fleet.api.alive() and fleet.api.proc.pid == failover["api_pid"]
    assert fleet.workers[0].alive() and fleet.workers[0].proc.pid == failover["worker_pid"]
    assert requests.get(fleet.url + "/readyz", timeout=5).status_code == 200


def test_an_event_stream_open_across_the_failover_resumes_without_gaps_or_repeats(failover):
    follower = failover["follower"]
    follower.join(60)
    types = [t for _, t in follower.events]
    assert types[-1] == "succeeded", types
    assert follower.streams >= 2, "the stream never broke: the failover did not reach it"
    ids = [tuple(int(p) for p in i.split("-")) for i, _ in follower.events if i]
    assert ids == sorted(set(ids)), "an event repeated or came out of order after the resume"
    assert types[0] == "queued" and "started" in types and "output" in types


def test_status_and_a_new_event_stream_are_served_from_the_new_master(fleet, failover):
    task = submit(fleet.url, job())
    response = requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}/events", stream=True, timeout=20,
                            headers={"Accept": "text/event-stream"})
    assert response.status_code == 200
    types = [event.event for event in sseclient.SSEClient(response).events()]
    assert types[0] == "queued" and types[-1] == "succeeded", types
    assert wait_status(fleet.url, task["task_id"])["status"] == "succeeded"
    assert failover["new"].client().exists(keys.task(task["task_id"]))


def test_the_rate_limiter_counts_on_the_new_master(fleet, failover):
    # Bodies that fail validation still count against the submission budget, so the limit is
    # reached without queueing jobs; at most two windows' worth if a window turns over meanwhile.
    statuses = []
    for _ in range(2 * GENERATE_LIMIT + 2):
        response = requests.post(f"{fleet.url}/api/v1/generate", json={}, timeout=10)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {422}, statuses
    assert failover["new"].client().keys(f"LIMITS:LIMITER/{keys.RATE_LIMIT_PREFIX}/addr:*")
    assert failover["old"].proc.poll() is not None  # the old master is dead: nothing else counted


def test_the_workers_heartbeat_continues_on_the_new_master(fleet, failover):
    master = failover["new"].client()
    queue = fleet.workers[0].queue
    wait_until(lambda: master.zscore(keys.WORKERS, queue) > time.time() - 2, 10, what="a fresh heartbeat")
    assert master.hexists(keys.HEARTBEATS, queue)
    assert queue in json.dumps(requests.get(fleet.url + "/api/v1/workers", timeout=5).json())


def test_the_job_running_at_the_failover_finishes(fleet, failover):
    # Last in the module: by now the failover is long over. Its worker stays alive, so it is
    # reconciled within HEARTBEAT_TTL + grace once that exists; 15 s is ample.
    remaining = failover["promoted_at"] + 15 - time.monotonic()
    doc = wait_status(fleet.url, failover["running"]["task_id"], timeout=max(remaining, 1))
    assert doc["status"] == "succeeded"
