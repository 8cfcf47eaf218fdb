"""The event stream (SSE) and webhooks, over real HTTP against a real fleet.

The stream is read with sseclient-py, the way a caller's code would; webhooks go to a receiver
this test starts, which checks each signature with the Standard Webhooks reference library.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
import sseclient
from standardwebhooks import Webhook

from tests.support.api import story, submit, wait_status
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_" + base64.b64encode(b"comfy-service-test-secret-32bytes").decode()


def stream(base: str, task_id: str, last_event_id: str | None = None, **kwargs) -> requests.Response:
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return requests.get(f"{base}/api/v1/tasks/{task_id}/events", headers=headers, stream=True, timeout=30, **kwargs)


def read_events(response: requests.Response, stop_after: int | None = None, out: list | None = None) -> list:
    """(id, event, data) of each event until the server closes the stream, or `stop_after`;
    appended to `out` as they arrive when given."""
    out = [] if out is None else out
    for event in sseclient.SSEClient(response).events():
        out.append((event.id, event.event, json.loads(event.data)))
        if stop_after is not None and len(out) >= stop_after:
            break
    response.close()
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One GPU whose jobs take about a second, with a webhook worker and a fast retry schedule."""
    from tests.support.fleet import one_gpu_fleet

    receiver = Receiver()
    fleet = one_gpu_fleet(tmp_path_factory, "events-fleet", "--step-seconds", "0.04",
                          WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}",
                          WEBHOOK_BACKOFF="0.3", WEBHOOK_BACKOFF_MAX="2", WEBHOOK_MAX_ATTEMPTS="4",
                          WEBHOOK_PROGRESS_INTERVAL="0", SSE_KEEPALIVE="0.5")
    fleet.add_webhook_worker()
    fleet.receiver = receiver
    yield fleet
    fleet.stop()
    receiver.close()


def test_stream_tells_a_job_from_queued_to_its_final_document(fleet):
    task = submit(fleet.url, story(steps=8))
    response = stream(fleet.url, task["task_id"])
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    events = read_events(response)  # ends when the server closes the stream after the final event

    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "queued" and events[0][2]["queue_position"] in (0, None)  # nothing ahead of it
    # Taken by the GPU's worker and queued inside its ComfyUI: still queued, now with its GPU.
    assert kinds[1] == "queued" and events[1][2]["gpu"] == "gpu.test.0"
    assert kinds[2] == "started" and events[2][2]["gpu"] == "gpu.test.0"
    assert kinds[-1] == "succeeded"
    assert kinds.count("output") == 2  # one image per scene, each as it is stored
    percents = [data["percent"] for _, kind, data in events if kind == "progress"]
    assert len(percents) >= 3 and percents == sorted(percents)
    assert all(set(data) >= {"node", "step", "max"} for _, kind, data in events if kind == "progress")

    final = events[-1][2]
    assert final == requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5).json()
    outputs = [data for _, kind, data in events if kind == "output"]
    assert [o["url"] for o in outputs] == [image["url"] for image in final["result"]["images"]]
    image = requests.get(fleet.url + outputs[0]["url"], timeout=5)
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    ids = [event_id for event_id, _, _ in events]
    assert all(ids) and len(set(ids)) == len(ids)  # every logged event has its own id


def test_reconnecting_with_last_event_id_loses_and_repeats_nothing(fleet):
    task = submit(fleet.url, story(steps=10))
    first = read_events(stream(fleet.url, task["task_id"]), stop_after=4)  # then the connection drops
    resumed = read_events(stream(fleet.url, task["task_id"], last_event_id=first[-1][0]))
    assert resumed[-1][1] == "succeeded"

    everything = read_events(stream(fleet.url, task["task_id"]))  # the whole log, read after the end
    assert [e[0] for e in first + resumed] == [e[0] for e in everything]
    assert [e[1] for e in first + resumed] == [e[1] for e in everything]

    # It saw the end: 204 tells an EventSource to stop reconnecting.
    again = stream(fleet.url, task["task_id"], last_event_id=everything[-1][0])
    assert again.status_code == 204


def test_stream_of_a_waiting_job_updates_its_position_and_ends_cancelled(fleet):
    # The worker holds two prompts in ComfyUI (running + next); the third and fourth wait in Redis.
    # A position counts the jobs ahead on the GPU, the running one included. The two in ComfyUI
    # last past every wait below (~96 s each) and end only when cancelled: a position that moved
    # because one of them finished would not be the update this test asks for.
    running = [submit(fleet.url, story(scenes=["[Lena] reads a letter"] * 24, steps=100)) for _ in range(2)]
    ahead, target = submit(fleet.url, story(steps=40)), submit(fleet.url, story(steps=40))
    response = stream(fleet.url, target["task_id"])
    seen: list = []
    reader = threading.Thread(target=read_events, args=(response,), kwargs={"out": seen}, daemon=True)
    reader.start()
    try:
        # The stream reads the position once a second, and says it only when it changed: the
        # update below is a change only from what the stream itself last said, not from what a
        # GET saw in between.
        def stream_says(position: int) -> bool:
            said = [data["queue_position"] for _, kind, data in list(seen) if kind == "queued"]
            return said[-1:] == [position]
        wait_until(lambda: requests.get(f"{fleet.url}/api/v1/tasks/{target['task_id']}", timeout=5).json()[
            "queue_position"] == 3 and stream_says(3), 10, what="the target to wait behind three, stream included")
        requests.delete(f"{fleet.url}/api/v1/tasks/{ahead['task_id']}", timeout=10)
        # Position updates are not logged events: they come without an id.
        wait_until(lambda: any(kind == "queued" and data["queue_position"] == 2 and event_id is None
                               for event_id, kind, data in list(seen)), 10, what="a position update")
        for task in running:
            requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=10)
        wait_until(lambda: any(kind == "started" for _, kind, _ in list(seen)), 20, what="the target to start")
    finally:
        requests.delete(f"{fleet.url}/api/v1/tasks/{target['task_id']}", timeout=10)
    reader.join(20)
    assert seen[0][1] == "queued" and seen[0][0] is not None
    assert seen[-1][1] == "cancelled" and seen[-1][2]["status"] == "cancelled"


def test_a_waiting_job_has_no_event_log_and_its_stream_is_the_same_without_one(fleet):
    # A one-entry stream costs ~4.7 KB: a job that only waits has none. Its submit event comes
    # from its record, with the id its next transition writes it under, first, into the log.
    client = redis.Redis.from_url(fleet.redis.url)
    running = [submit(fleet.url, story(steps=100)) for _ in range(2)]  # the worker's two slots, for long
    target = submit(fleet.url, story(steps=40))
    try:
        wait_until(lambda: requests.get(f"{fleet.url}/api/v1/tasks/{target['task_id']}", timeout=5).json()[
            "queue_position"] == 2, 10, what="the target to wait behind two")
        assert not client.exists(f"cs:events:{target['task_id']}")
        created_ms = json.loads(client.hget(f"cs:task:{target['task_id']}", "created_ms"))
        first = read_events(stream(fleet.url, target["task_id"]), stop_after=1)
        assert first == [(f"{created_ms}-0", "queued", {"task_id": target["task_id"], "status": "queued",
                                                       "queue_position": 2, "gpu": None})]
        requests.delete(f"{fleet.url}/api/v1/tasks/{target['task_id']}", timeout=10)  # its next event
    finally:
        for task in running:
            requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=10)
    log = client.xrange(f"cs:events:{target['task_id']}")
    assert [(i.decode(), f[b"type"]) for i, f in log] == [(first[0][0], b"queued"), (log[1][0].decode(), b"cancelled")]
    # Resumed from the id it saw while there was no log: the rest, nothing repeated.
    resumed = read_events(stream(fleet.url, target["task_id"], last_event_id=first[0][0]))
    assert [kind for _, kind, _ in resumed] == ["cancelled"]
    assert [e[0] for e in read_events(stream(fleet.url, target["task_id"]))] == [first[0][0], resumed[0][0]]


def test_stream_errors_are_json(fleet):
    missing = requests.get(f"{fleet.url}/api/v1/tasks/00000000-0000-4000-8000-000000000000/events", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"
    task = submit(fleet.url, story(steps=2))
    bad = stream(fleet.url, task["task_id"], last_event_id="not-an-id")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"
    wait_status(fleet.url, task["task_id"])


def test_many_open_streams_do_not_hold_the_api(fleet):
    """Streams wait in greenlets with Redis connections of their own: with 150 open (more than
    redis-py's default pool of 100), the API still answers at once and every stream follows."""
    task = submit(fleet.url, story(steps=100))
    streams = [stream(fleet.url, task["task_id"]) for _ in range(150)]
    try:
        assert all(s.status_code == 200 for s in streams)
        started = time.monotonic()
        for _ in range(20):
            assert requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5).status_code == 200
        assert time.monotonic() - started < 4
        requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=10)
        ends = [read_events(s)[-1][1] for s in streams[:10]]  # each stream got to the end
        assert ends == ["cancelled"] * 10
    finally:
        for s in streams:
            s.close()


def test_streams_beyond_sse_max_streams_get_503_and_slots_come_back(fleet_factory):
    fleet = fleet_factory(SSE_MAX_STREAMS="3")
    fleet.start_gpus(1, "--step-seconds", "0.05")
    task = submit(fleet.url, story(steps=100))
    url = f"{fleet.url}/api/v1/tasks/{task['task_id']}/events"
    for _ in range(5):  # HEAD and closed streams give their slot back
        requests.head(url, timeout=5)
    held = [stream(fleet.url, task["task_id"]) for _ in range(3)]
    assert [s.status_code for s in held] == [200] * 3
    refused = requests.get(url, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_streams"
    assert refused.headers["Retry-After"]
    held.pop().close()
    # The server notices the closed stream at its next write (a keep-alive at the latest).
    wait_until(lambda: stream(fleet.url, task["task_id"]).status_code == 200 or None, 40,
               what="a slot to come back")
    for s in held:
        s.close()
    requests.delete(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=10)


def test_stream_of_a_job_whose_log_expired_still_ends_with_its_document(fleet):
    task = submit(fleet.url, story(steps=2))
    done = wait_status(fleet.url, task["task_id"])
    full = read_events(stream(fleet.url, task["task_id"]))
    redis.Redis.from_url(fleet.redis.url).delete(f"cs:events:{task['task_id']}")  # as EVENTS_TTL would
    late = read_events(stream(fleet.url, task["task_id"]))
    assert late == [(full[-1][0], "succeeded", done)]
    assert stream(fleet.url, task["task_id"], last_event_id=full[-1][0]).status_code == 204


# Webhooks ---------------------------------------------------------------------------------


class Receiver:
    """An HTTP endpoint that records each request and answers from a script of status codes."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: dict[str, list[int]] = {}  # path → status codes to answer, then 200
        self.delay: dict[str, float] = {}  # path → seconds to wait before answering
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived = time.monotonic()
                time.sleep(receiver.delay.get(self.path, 0))
                with receiver.lock:
                    codes = receiver.script.get(self.path, [])
                    status = codes.pop(0) if codes else 200
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": arrived, "answered": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.server.shutdown()


def test_final_document_is_signed_and_retried_after_two_500s(fleet):
    receiver = fleet.receiver
    path = "/hooks/retried"
    receiver.script[path] = [500, 500]
    task = submit(fleet.url, story(steps=2, callback_url=receiver.url(path)))
    assert task["callback"] == {"url": receiver.url(path), "events": [], "state": "pending", "attempts": 0,
                                "last_status": None, "last_error": None, "delivered_at": None}
    done = wait_status(fleet.url, task["task_id"])
    wait_until(lambda: len(receiver.received(path)) >= 3, 20, what="three delivery attempts")

    attempts = receiver.received(path)
    assert [a["answered"] for a in attempts] == [500, 500, 200]
    verifier = Webhook(SECRET)
    for attempt in attempts:
        payload = verifier.verify(attempt["body"], attempt["headers"])  # raises on a bad signature
        assert payload["type"] == "task.succeeded"
        assert payload["data"]["task_id"] == task["task_id"] and payload["data"]["status"] == "succeeded"
        assert payload["data"]["result"] == done["result"]
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1  # receivers deduplicate by it
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.3 * 0.9 and gaps[1] >= 0.6 * 0.9, gaps  # each waited its backoff: 0.3 s, then 0.6 s

    def delivered():
        callback = requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5).json()["callback"]
        return callback["state"] == "delivered" and callback
    callback = wait_until(delivered, 10, what="the delivery state")
    assert callback["attempts"] == 3 and callback["last_status"] == 200 and callback["delivered_at"]


def test_a_tampered_body_or_another_secret_fails_verification(fleet):
    receiver = fleet.receiver
    path = "/hooks/verify"
    task = submit(fleet.url, story(steps=2, callback_url=receiver.url(path)))
    wait_status(fleet.url, task["task_id"])
    wait_until(lambda: receiver.received(path), 15, what="the delivery")
    delivery = receiver.received(path)[0]
    from standardwebhooks.webhooks import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery["body"].replace(b"succeeded", b"failed"), delivery["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(os.urandom(24)).decode()).verify(delivery["body"], delivery["headers"])


def test_progress_webhooks_when_asked_and_a_failed_job_reports_its_error(fleet):
    receiver = fleet.receiver
    path = "/hooks/progress"
    body = story(steps=10, callback_url=receiver.url(path), callback_events=["started", "progress", "output"])
    task = submit(fleet.url, body)
    wait_status(fleet.url, task["task_id"])
    def types():
        return [json.loads(r["body"])["type"] for r in receiver.received(path)]
    # Deliveries run in parallel: the final one may overtake the outputs (receivers order by data).
    wait_until(lambda: {"task.started", "task.progress", "task.succeeded"} <= set(types())
               and types().count("task.output") == 2, 15, what=f"every kind of delivery ({types()})")
    time.sleep(0.5)
    assert types().count("task.output") == 2 and types().count("task.succeeded") == 1

    failing = "/hooks/failed"
    fleet.sims[0].faults(fail_at_step=1)  # ComfyUI fails the run
    try:
        bad = submit(fleet.url, story(callback_url=receiver.url(failing)))
        assert wait_status(fleet.url, bad["task_id"])["status"] == "failed"
    finally:
        fleet.sims[0].faults(reset=True)
    wait_until(lambda: receiver.received(failing), 15, what="the failure delivery")
    payload = json.loads(receiver.received(failing)[0]["body"])
    assert payload["type"] == "task.failed" and payload["data"]["error"]["source"] == "comfyui"


def test_a_receiver_that_never_recovers_is_given_up_on(fleet):
    receiver = fleet.receiver
    path = "/hooks/down"
    receiver.script[path] = [503] * 10
    task = submit(fleet.url, story(steps=2, callback_url=receiver.url(path)))
    wait_status(fleet.url, task["task_id"])

    def failed():
        callback = requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5).json()["callback"]
        return callback["state"] == "failed" and callback
    callback = wait_until(failed, 20, what="the delivery to be given up")
    assert callback["attempts"] == 4 and callback["last_status"] == 503  # WEBHOOK_MAX_ATTEMPTS
    assert len(receiver.received(path)) == 4


def test_a_4xx_answer_is_final(fleet):
    receiver = fleet.receiver
    path = "/hooks/gone"
    receiver.script[path] = [410]
    task = submit(fleet.url, story(steps=2, callback_url=receiver.url(path)))
    wait_status(fleet.url, task["task_id"])
    wait_until(lambda: requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}", timeout=5).json()[
        "callback"]["state"] == "failed", 15, what="the delivery to fail")
    time.sleep(1)
    assert len(receiver.received(path)) == 1


@pytest.mark.parametrize("body, code", [
    ({"callback_url": "http://169.254.169.254/latest/meta-data/"}, "callback_not_allowed"),
    ({"callback_url": "http://localhost:1/x"}, "callback_not_allowed"),
    ({"callback_url": "ftp://127.0.0.1/x"}, "invalid_callback_url"),
    ({"callback_url": "http://user:pw@127.0.0.1/x"}, "invalid_callback_url"),
    ({"callback_url": 42}, "invalid_callback_url"),
    ({"callback_url": "http://127.0.0.1:{port}/x", "callback_events": ["everything"]}, "invalid_callback_events"),
    ({"callback_events": ["progress"]}, "invalid_parameters"),
])
def test_callbacks_outside_the_allowlist_are_refused(fleet, body, code):
    body = {k: v.format(port=fleet.receiver.port) if isinstance(v, str) else v for k, v in body.items()}
    before = redis.Redis.from_url(fleet.redis.url).scard("cs:active")
    response = requests.post(fleet.url + "/api/v1/generate", json=story(steps=2, **body), timeout=10)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["source"] == "service" and error["code"] == code
    assert redis.Redis.from_url(fleet.redis.url).scard("cs:active") == before  # nothing queued


def test_callbacks_are_refused_where_webhooks_are_not_configured(fleet_factory):
    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.02")
    response = requests.post(fleet.url + "/api/v1/generate",
                             json=story(steps=2, callback_url="http://127.0.0.1:9/x"), timeout=10)
    assert response.status_code == 422 and response.json()["error"]["code"] == "webhooks_disabled"


def test_a_finished_job_keeps_its_event_log_only_events_ttl_and_its_graphs_not_at_all(fleet):
    task = submit(fleet.url, story(steps=2))
    wait_status(fleet.url, task["task_id"])
    client = redis.Redis.from_url(fleet.redis.url)
    record_ttl = client.ttl(f"cs:task:{task['task_id']}")
    assert 0 < client.ttl(f"cs:events:{task['task_id']}") <= 3600 < record_ttl  # EVENTS_TTL; the record stays
    assert not client.exists(f"cs:payload:{task['task_id']}")  # nothing runs the graphs again
    # Compact under Redis' default config: the record's own hash a listpack (its long values,
    # compressed, beside it), whatever the workflow put in it.
    assert client.object("encoding", f"cs:task:{task['task_id']}") == b"listpack"
    assert set(client.hkeys(f"cs:taskz:{task['task_id']}")) >= {b"params", b"result"}
    assert client.ttl(f"cs:taskz:{task['task_id']}") == pytest.approx(record_ttl, abs=2)


def test_a_stream_ends_cleanly_when_redis_goes_away_and_the_reconnect_says_why(fleet_factory):
    fleet = fleet_factory()
    fleet.start_gpus(1, "--step-seconds", "0.1")
    task = submit(fleet.url, story(steps=60))
    response = stream(fleet.url, task["task_id"])
    events = sseclient.SSEClient(response).events()
    assert next(events).event == "queued"
    fleet.redis.stop()
    started = time.monotonic()
    rest = list(events)  # the server ends the stream instead of hanging or sending garbage
    assert time.monotonic() - started < 15 and all(e.event != "succeeded" for e in rest)
    again = requests.get(f"{fleet.url}/api/v1/tasks/{task['task_id']}/events", timeout=10)
    assert again.status_code == 503 and again.json()["error"]["code"] == "broker_unavailable"


def test_a_slow_receiver_delays_no_job(fleet):
    receiver = fleet.receiver
    path = "/hooks/slow"
    receiver.delay[path] = 4.0
    first = submit(fleet.url, story(steps=2, callback_url=receiver.url(path)))
    second = submit(fleet.url, story(steps=2, callback_url=receiver.url(path)))
    started = time.monotonic()
    assert wait_status(fleet.url, first["task_id"])["status"] == "succeeded"
    assert wait_status(fleet.url, second["task_id"])["status"] == "succeeded"
    assert time.monotonic() - started < 4.0  # both done while the receiver still sits on the first
    assert not receiver.received(path)  # nothing answered yet: the GPU never waited for it
    wait_until(lambda: len(receiver.received(path)) == 2, 20, what="both deliveries")


def test_a_lost_webhook_message_is_sent_again(fleet_factory):
    """The message queueing a final webhook disappears (its sender died right after the job's
    transition, or Redis lost it): the monitor notices it owed and queues it again."""
    receiver = Receiver()
    try:
        fleet = fleet_factory(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}",
                              WEBHOOK_RESEND_AFTER="3")
        fleet.start_gpus(1, "--step-seconds", "0.02")  # no webhook worker yet: deliveries wait in Redis
        client = redis.Redis.from_url(fleet.redis.url)
        task = submit(fleet.url, story(steps=2, callback_url=receiver.url("/lost")))
        wait_status(fleet.url, task["task_id"])
        wait_until(lambda: client.llen("cs.webhooks") == 1, 5, what="the queued delivery")
        client.delete("cs.webhooks")  # lost
        fleet.add_webhook_worker()
        wait_until(lambda: receiver.received("/lost"), 30, what="the delivery sent again")
        delivery = receiver.received("/lost")[0]
        assert Webhook(SECRET).verify(delivery["body"], delivery["headers"])["data"]["task_id"] == task["task_id"]
        assert delivery["headers"]["webhook-id"] == f"msg_{task['task_id']}_succeeded"
        wait_until(lambda: client.zcard("cs:webhooks:pending") == 0, 10, what="the debt settled")
        time.sleep(4)  # settled: not sent a third time
        assert len(receiver.received("/lost")) == 1
    finally:
        receiver.close()


def test_made_up_last_event_ids_neither_hang_nor_break_the_stream(fleet):
    task = submit(fleet.url, story(steps=10))
    too_big = stream(fleet.url, task["task_id"], last_event_id="99999999999999999999-0")  # beyond Redis' ids
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "invalid_last_event_id"
    future = stream(fleet.url, task["task_id"], last_event_id=f"{(int(time.time()) + 3600) * 1000}-0")
    assert future.status_code == 200  # the job still runs: nothing after that id yet
    started = time.monotonic()
    assert read_events(future) == []  # and once it ends, the stream closes instead of waiting forever
    assert time.monotonic() - started < 30
