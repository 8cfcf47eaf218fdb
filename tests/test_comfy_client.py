"""ComfyClient against real simulator processes: real HTTP, real websockets, real faults.

Nothing of the client's own I/O is mocked. Where a test needs a network cut that the
simulator cannot make (a window in which the prompt finishes while the client cannot
reach the server), the client talks through `TcpProxy`, a plain TCP forwarder in this
file that the test can cut and restore.
"""
from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.support.procs import free_port, wait_until
from workers.comfy_client import (
    Cached,
    CancelOutcome,
    ComfyClient,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyPromptLost,
    ComfyProtocolError,
    ComfyUnreachable,
    ComfyValidationError,
    ComfyWaitTimeout,
    Executed,
    Executing,
    Failed,
    HistoryEntry,
    Interrupted,
    Preview,
    Progress,
    Started,
    Succeeded,
    output_refs,
)

PNG_MAGIC = b"\x89PNG"


def graph(steps: int = 5, sps: float = 0.05, fail_at: int = -1, prefix: str | None = None, preview: bool = False):
    inputs = {"steps": steps, "seconds_per_step": sps, "fail_at_step": fail_at}
    if preview:
        inputs["send_preview"] = True
    return {
        "1": {"class_type": "SlowSteps", "inputs": inputs},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix or _uniq()}},
    }


def _uniq() -> str:
    # A fresh prefix per graph so that ComfyUI's cache never serves an unrelated run.
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def make_client():
    clients: list[ComfyClient] = []

    def make(url: str, **kw) -> ComfyClient:
        kw.setdefault("connect_timeout", 2.0)
        kw.setdefault("read_timeout", 5.0)
        kw.setdefault("submit_wait", 10.0)
        kw.setdefault("stall_timeout", 10.0)
        kw.setdefault("unreachable_deadline", 10.0)
        kw.setdefault("backoff_initial", 0.05)
        kw.setdefault("backoff_max", 0.5)
        kw.setdefault("poll_interval", 0.05)
        c = ComfyClient(url, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(sim, make_client):
    return make_client(sim.url)


def collect(c: ComfyClient, pid: str, timeout: float = 20):
    return list(c.events(pid, timeout=timeout))


def events_until(it, kind):
    """Advance an events iterator until an event of `kind` (returned) was seen."""
    for ev in it:
        if isinstance(ev, kind):
            return ev
    raise AssertionError(f"stream ended before a {kind.__name__}")


def run_in_thread(fn, *args, **kw):
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------- pure: recorded ComfyUI answers
TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"


def recorded_history(name: str) -> HistoryEntry:
    """The last non-empty /history/{id} body of a transcript recorded on a real ComfyUI."""
    found = None
    for e in json.loads((TRANSCRIPTS / name).read_text()):
        if e.get("dir") == "http" and "/history/" in e["url"] and isinstance(e.get("body"), dict) and e["body"]:
            (pid, raw), = e["body"].items()
            found = HistoryEntry.from_raw(pid, raw)
    assert found is not None, name
    return found


def test_history_outcomes_are_told_apart_by_the_last_message():
    ok = recorded_history("success.json")
    assert ok.outcome == "success" and isinstance(ok.terminal_event(), Succeeded)
    assert ok.terminal_event().outputs["2"]["images"][0]["filename"] == "rig_success_00001_.png"
    failed = recorded_history("execution_error.json").terminal_event()
    assert isinstance(failed, Failed) and failed.source == "history"
    assert (failed.node_id, failed.node_type, failed.exception_type) == ("1", "SlowSteps", "RuntimeError")
    assert failed.exception_message.startswith("SlowSteps failed on purpose at step 2")
    assert failed.traceback and failed.current_inputs["steps"] == [5]
    for name in ("interrupt_prompt_id.json", "interrupt_global.json", "queue_delete.json"):
        entry = recorded_history(name)
        assert entry.status_str == "error" and entry.outcome == "interrupted"
        ev = entry.terminal_event()
        assert isinstance(ev, Interrupted) and ev.node_id == "1" and ev.node_type == "SlowSteps"
    cached = recorded_history("caching.json")
    assert cached.cached_nodes == ["1"] and cached.number is not None


def test_output_refs_cover_every_list_of_files():
    temp = recorded_history("preview_image_node.json")
    refs = list(output_refs(temp.outputs))
    assert [(n, k, r["type"]) for n, k, r in refs] == [("2", "images", "temp")] * 2
    mixed = {"5": {"gifs": [{"filename": "a.mp4", "subfolder": "v", "type": "output", "format": "video/h264-mp4"}],
                   "animated": [True], "text": ["hello"]},
             "6": {"audio": [{"filename": "b.flac", "subfolder": "", "type": "output"}]}}
    assert [(n, k, r["filename"]) for n, k, r in output_refs(mixed)] == [("5", "gifs", "a.mp4"), ("6", "audio", "b.flac")]


def test_urls_and_error_bodies():
    c = ComfyClient("https://gpu-1.example:8443/comfy/api/", client_id="w1")
    assert c.base_url == "https://gpu-1.example:8443/comfy/api"
    assert c.ws_url == "wss://gpu-1.example:8443/comfy/api/ws"
    assert ComfyClient("http://127.0.0.1:8000").ws_url == "ws://127.0.0.1:8000/ws"
    with pytest.raises(ValueError):
        ComfyClient("127.0.0.1:8188")
    body = next(e for e in json.loads((TRANSCRIPTS / "validation_error.json").read_text())
                if e.get("dir") == "http" and e.get("status") == 400)["body"]
    err = ComfyValidationError(body["error"], body["node_errors"], prompt_id="p1")
    d = err.to_dict()
    assert set(d) == {"source", "code", "message", "details"}
    assert d["source"] == "comfyui" and d["code"] == "validation_error" and err.retryable is False
    assert d["details"]["node_errors"] == body["node_errors"] and d["details"]["prompt_id"] == "p1"
    assert "node 1 (SlowSteps): Required input is missing: steps" in d["message"]
    assert ComfyProtocolError("x", status_code=503, body="busy").retryable
    assert ComfyProtocolError("x", status_code=500, body="boom").to_dict()["code"] == "server_error"
    assert not ComfyProtocolError("x", status_code=500).retryable


# ---------------------------------------------------------------- happy path
@pytest.mark.timeout(30)
def test_success_events_and_png_outputs(client):
    sub = client.submit(graph(steps=5))
    assert sub.node_errors == {} and isinstance(sub.number, int)
    evs = collect(client, sub.prompt_id)
    assert all(e.prompt_id == sub.prompt_id for e in evs)
    kinds = [type(e) for e in evs]
    assert kinds[0] is Started and kinds[-1] is Succeeded
    assert Cached in kinds and kinds.index(Cached) < kinds.index(Executing)
    assert [e.node for e in evs if isinstance(e, Executing)] == ["1", "2"]
    progress = [e for e in evs if isinstance(e, Progress)]
    assert [p.value for p in progress] == [1, 2, 3, 4, 5] and {p.max for p in progress} == {5}
    assert {p.node for p in progress} == {"1"}
    executed = [e for e in evs if isinstance(e, Executed)]
    assert [e.node for e in executed] == ["2"]
    done = evs[-1]
    assert done.source == "ws" and done.outputs == {"2": executed[0].output}

    files = client.outputs(sub.prompt_id)
    assert len(files) == 1
    f = files[0]
    assert (f.node_id, f.kind, f.type) == ("2", "images", "output")
    assert f.data[:4] == PNG_MAGIC and f.content_type == "image/png"
    assert f.filename == executed[0].output["images"][0]["filename"]
    assert client.stats["watched"] == 0  # the finished stream released its watch


@pytest.mark.timeout(30)
def test_wait_returns_run_result_and_reports_events(client):
    seen = []
    sub = client.submit(graph(steps=3), prompt_id="caller-chosen-" + uuid.uuid4().hex[:6])
    assert sub.prompt_id.startswith("caller-chosen-")
    result = client.wait(sub.prompt_id, on_event=seen.append, timeout=20)
    assert result.ok and result.status == "success" and result.error is None
    assert list(result.outputs) == ["2"] and result.outputs["2"]["images"][0]["type"] == "output"
    assert isinstance(seen[0], Started) and isinstance(seen[-1], Succeeded)
    entry = client.history(sub.prompt_id)
    assert entry.outcome == "success" and entry.outputs == result.outputs


# ---------------------------------------------------------------- validation
@pytest.mark.timeout(30)
def test_validation_error_missing_input_keeps_node_errors(client):
    g = graph()
    del g["1"]["inputs"]["steps"]
    with pytest.raises(ComfyValidationError) as info:
        client.submit(g)
    err = info.value
    assert err.error["type"] == "prompt_outputs_failed_validation"
    assert set(err.error) >= {"type", "message", "details", "extra_info"}
    ne = err.node_errors["1"]
    assert ne["class_type"] == "SlowSteps" and ne["dependent_outputs"] == ["2"]
    e0 = ne["errors"][0]
    assert (e0["type"], e0["details"], e0["extra_info"]["input_name"]) == ("required_input_missing", "steps", "steps")
    assert e0["message"] == "Required input is missing"
    body = err.to_dict()
    assert body["source"] == "comfyui" and body["code"] == "validation_error" and not err.retryable
    assert body["details"]["node_errors"] == err.node_errors and "steps" in body["message"]
    assert client.stats["watched"] == 0  # the pre-registered watch was dropped


@pytest.mark.timeout(30)
def test_validation_error_unknown_class(client):
    g = graph()
    g["3"] = {"class_type": "NoSuchNodeType", "inputs": {}}
    with pytest.raises(ComfyValidationError) as info:
        client.submit(g)
    assert info.value.error["type"] == "invalid_prompt"
    assert "NoSuchNodeType" in info.value.error["message"]
    assert info.value.node_errors == {}


@pytest.mark.timeout(30)
def test_partly_valid_graph_is_accepted_with_node_errors(client):
    g = graph(steps=2)
    g["3"] = {"class_type": "SlowSteps", "inputs": {"steps": 0, "seconds_per_step": 0.0, "fail_at_step": -1}}
    g["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": _uniq()}}
    sub = client.submit(g)
    assert set(sub.node_errors) == {"3"}
    assert sub.node_errors["3"]["errors"][0]["type"] == "value_smaller_than_min"
    assert sub.node_errors["3"]["dependent_outputs"] == ["4"]
    result = client.wait(sub.prompt_id, timeout=20)
    assert list(result.outputs) == ["2"]
    assert [f.node_id for f in client.outputs(sub.prompt_id)] == ["2"]


# ---------------------------------------------------------------- execution error
@pytest.mark.timeout(30)
def test_execution_error_carries_node_and_exception(client):
    sub = client.submit(graph(steps=5, fail_at=2))
    with pytest.raises(ComfyExecutionError) as info:
        client.wait(sub.prompt_id, timeout=20)
    err = info.value
    assert (err.node_id, err.node_type, err.exception_type) == ("1", "SlowSteps", "RuntimeError")
    assert err.exception_message == "SlowSteps failed on purpose at step 2"
    assert isinstance(err.traceback, list) and err.prompt_id == sub.prompt_id
    assert err.result.status == "error" and err.result.error["node_id"] == "1"
    d = err.to_dict()
    assert d["code"] == "execution_error" and d["details"]["exception_type"] == "RuntimeError"
    assert not err.retryable
    # The same outcome settled from history (what a reconnecting client would see).
    entry = client.history(sub.prompt_id)
    assert entry.outcome == "error"
    failed = entry.terminal_event()
    assert isinstance(failed, Failed) and failed.node_id == "1" and failed.exception_type == "RuntimeError"


# ---------------------------------------------------------------- cancel
@pytest.mark.timeout(40)
def test_cancel_running_prompt_leaves_the_next_one_alone(sim, client):
    long = client.submit(graph(steps=200, sps=0.05))
    nxt = client.submit(graph(steps=3))  # same client, queued behind the running one
    it = client.events(long.prompt_id, timeout=20)
    events_until(it, Progress)
    assert client.cancel(long.prompt_id) is CancelOutcome.INTERRUPTED
    rest = list(it)
    assert isinstance(rest[-1], Interrupted) and rest[-1].node_id == "1" and rest[-1].node_type == "SlowSteps"
    with pytest.raises(ComfyInterrupted):  # the stream is consumed; wait settles from history
        client.wait(long.prompt_id, timeout=10)
    assert client.wait(nxt.prompt_id, timeout=20).ok

    rec = sim.record()
    assert rec["interrupts"], rec
    for i in rec["interrupts"]:
        assert i["requested_prompt_id"] == long.prompt_id
        assert i["interrupted_prompt_id"] in (long.prompt_id, None)
    assert any(i["interrupted_prompt_id"] == long.prompt_id for i in rec["interrupts"])
    outcome = {b["prompt_id"]: b["outcome"] for b in rec["busy"]}
    assert outcome[long.prompt_id] == "interrupted" and outcome[nxt.prompt_id] == "success"


@pytest.mark.timeout(40)
def test_cancel_pending_prompt_deletes_it_and_it_never_runs(sim, client):
    running = client.submit(graph(steps=200, sps=0.05))
    pending = client.submit(graph(steps=3))
    events_until(client.events(running.prompt_id, timeout=20), Progress)
    assert client.cancel(pending.prompt_id) is CancelOutcome.DELETED
    with pytest.raises(ComfyInterrupted) as info:
        client.wait(pending.prompt_id, timeout=5)
    assert info.value.reason == "deleted"
    assert pending.prompt_id not in client.queue().pending_ids()
    assert client.cancel(running.prompt_id) is CancelOutcome.INTERRUPTED
    with pytest.raises(ComfyInterrupted):
        client.wait(running.prompt_id, timeout=10)

    rec = sim.record()
    assert pending.prompt_id in rec["deleted"]
    assert pending.prompt_id not in [b["prompt_id"] for b in rec["busy"]]
    assert all(i["requested_prompt_id"] == running.prompt_id for i in rec["interrupts"])
    assert client.history(pending.prompt_id) is None


@pytest.mark.timeout(30)
def test_cancel_finished_and_unknown(sim, client):
    sub = client.submit(graph(steps=1))
    client.wait(sub.prompt_id, timeout=20)
    assert client.cancel(sub.prompt_id) is CancelOutcome.FINISHED
    assert client.cancel(str(uuid.uuid4())) is CancelOutcome.NOT_FOUND
    assert sim.record()["interrupts"] == []  # neither sent an interrupt


# ---------------------------------------------------------------- caching
@pytest.mark.timeout(30)
def test_identical_graph_is_served_from_cache(client):
    g = graph(steps=3)
    first = client.submit(g)
    client.wait(first.prompt_id, timeout=20)
    first_files = client.outputs(first.prompt_id)
    second = client.submit(g)
    evs = collect(client, second.prompt_id)
    cached = [e for e in evs if isinstance(e, Cached)]
    assert cached and sorted(cached[0].nodes) == ["1", "2"]
    assert not [e for e in evs if isinstance(e, (Executing, Progress))]
    assert [e.node for e in evs if isinstance(e, Executed)] == ["2"]  # re-sent with the earlier output
    assert isinstance(evs[-1], Succeeded)
    second_files = client.outputs(second.prompt_id)
    assert [f.filename for f in second_files] == [f.filename for f in first_files]
    assert second_files[0].data == first_files[0].data


# ---------------------------------------------------------------- dropped / stalled sockets
@pytest.mark.timeout(40)
def test_socket_dropped_mid_run_still_settles_as_success(sim, client):
    sim.faults(drop_websockets_at_step=3)
    sub = client.submit(graph(steps=20, sps=0.05))
    t0 = time.monotonic()
    evs = collect(client, sub.prompt_id)
    assert time.monotonic() - t0 < 10
    assert client.stats["reconnects"] >= 1
    assert {e.prompt_id for e in evs} == {sub.prompt_id}
    done = evs[-1]
    assert isinstance(done, Succeeded) and list(done.outputs) == ["2"]
    # The server's replay to the reconnected socket (`executing` without prompt_id) is attributed.
    assert [e.node for e in evs if isinstance(e, Executing) and e.replayed] == ["1"]
    values = [e.value for e in evs if isinstance(e, Progress)]
    assert values == sorted(values) and values[-1] == 20
    files = client.outputs(sub.prompt_id)
    assert files[0].data[:4] == PNG_MAGIC


@pytest.mark.timeout(40)
def test_prompt_finishing_while_disconnected_is_settled_from_history(sim, make_client):
    proxy = TcpProxy(sim.port).start()
    try:
        c = make_client(proxy.url)
        sub = c.submit(graph(steps=6, sps=0.05))
        it = c.events(sub.prompt_id, timeout=20)
        events_until(it, Progress)
        proxy.cut()  # every connection reset, new ones refused: the client is blind
        wait_until(lambda: sim_history_has(sim, sub.prompt_id), 10, what="the run to finish on the server")
        time.sleep(0.3)  # the client keeps failing to reconnect meanwhile
        assert not c.connected
        proxy.resume()
        rest = list(it)
        assert isinstance(rest[-1], Succeeded) and rest[-1].source == "history"
        assert list(rest[-1].outputs) == ["2"]
        assert c.outputs(sub.prompt_id)[0].data[:4] == PNG_MAGIC
    finally:
        proxy.close()


@pytest.mark.timeout(40)
def test_stall_is_detected_and_the_run_completes_when_cleared(sim, make_client):
    c = make_client(sim.url, stall_timeout=0.5)
    sub = c.submit(graph(steps=20, sps=0.05))
    it = c.events(sub.prompt_id, timeout=30)
    events_until(it, Progress)
    sim.faults(stall=True)
    t, box = run_in_thread(list, it)
    wait_until(lambda: c.stats["stalls"] >= 1, 10, what="the client to notice the stall")
    assert t.is_alive()  # not settled: the prompt is still running (stalled) on the server
    sim.faults(stall=False)
    t.join(20)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert isinstance(box["value"][-1], Succeeded)
    assert c.stats["reconnects"] >= 1


# ---------------------------------------------------------------- server down / restarted
@pytest.mark.timeout(60)
def test_crash_raises_unreachable_then_prompt_lost_after_restart(sim, make_client):
    c = make_client(sim.url, unreachable_deadline=1.5)
    sim.faults(crash_at_step=2)
    sub = c.submit(graph(steps=10, sps=0.05))
    t0 = time.monotonic()
    with pytest.raises(ComfyUnreachable) as info:
        c.wait(sub.prompt_id, timeout=20)
    assert info.value.retryable and info.value.to_dict()["code"] == "unreachable"
    assert time.monotonic() - t0 < 10
    with pytest.raises(ComfyUnreachable):
        c.queue()

    sim.restart()
    with pytest.raises(ComfyPromptLost) as lost:
        c.wait(sub.prompt_id, timeout=15)
    assert lost.value.retryable and lost.value.to_dict()["code"] == "prompt_lost"
    # The same client carries on against the restarted server.
    assert c.wait(c.submit(graph(steps=2)).prompt_id, timeout=20).ok


@pytest.mark.timeout(40)
def test_server_not_up_yet(sim_factory, make_client):
    slow = sim_factory("--step-seconds", "0.02", "--slow-start", "2", wait=False)
    impatient = make_client(slow.url, submit_wait=0.3)
    patient = make_client(slow.url, submit_wait=15)  # created before the server is up
    t0 = time.monotonic()
    with pytest.raises(ComfyUnreachable):
        impatient.submit(graph(steps=1))
    assert time.monotonic() - t0 < 2
    sub = patient.submit(graph(steps=2))  # waits for the server, then submits once
    assert patient.wait(sub.prompt_id, timeout=20).ok
    assert impatient.wait(impatient.submit(graph(steps=1)).prompt_id, timeout=20).ok


@pytest.mark.timeout(30)
def test_unreachable_errors_for_thin_calls(make_client):
    c = make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ComfyUnreachable) as info:
        c.system_stats()
    assert info.value.retryable and info.value.to_dict()["source"] == "comfyui"
    with pytest.raises(ComfyUnreachable):
        c.queue()


# ---------------------------------------------------------------- several prompts at once
@pytest.mark.timeout(40)
def test_two_prompts_in_flight_on_one_client(client):
    # Like the worker: two threads, each submitting and following its own prompt; one runs
    # while the other waits inside ComfyUI's queue.
    def job(steps: int, sps: float):
        sub = client.submit(graph(steps=steps, sps=sps))
        return sub, collect(client, sub.prompt_id)

    ta, ra = run_in_thread(job, 4, 0.05)
    tb, rb = run_in_thread(job, 6, 0.03)
    ta.join(25), tb.join(25)
    assert "error" not in ra and "error" not in rb, (ra.get("error"), rb.get("error"))
    finals = []
    for (sub, evs), steps in ((ra["value"], 4), (rb["value"], 6)):
        assert {e.prompt_id for e in evs} == {sub.prompt_id}
        assert isinstance(evs[0], Started) and isinstance(evs[-1], Succeeded)
        assert [e.value for e in evs if isinstance(e, Progress)] == list(range(1, steps + 1))
        finals.append(evs[-1].outputs["2"]["images"][0]["filename"])
    assert finals[0] != finals[1]
    assert client.stats["watched"] == 0


@pytest.mark.timeout(40)
def test_reattach_from_a_new_client_instance(sim, make_client):
    first = make_client(sim.url)
    sub = first.submit(graph(steps=20, sps=0.05))
    events_until(first.events(sub.prompt_id, timeout=20), Progress)
    first.close()  # the worker "restarts"; ComfyUI keeps running the prompt
    again = make_client(sim.url, client_id=first.client_id)
    result = again.wait(sub.prompt_id, timeout=20)
    assert result.ok and list(result.outputs) == ["2"]


@pytest.mark.timeout(30)
def test_wait_timeout_leaves_the_prompt_watchable(client):
    sub = client.submit(graph(steps=30, sps=0.05))
    with pytest.raises(ComfyWaitTimeout):
        client.wait(sub.prompt_id, timeout=0.3)
    assert client.wait(sub.prompt_id, timeout=20).ok


# ---------------------------------------------------------------- logs, previews, misc
@pytest.mark.timeout(30)
def test_log_subscription_receives_prompt_lines(client):
    assert client.subscribe_logs() is True
    sub = client.submit(graph(steps=2))
    client.wait(sub.prompt_id, timeout=20)
    lines: list[str] = []

    def have_both():
        lines.extend(e.m for e in client.drain_logs())
        text = "".join(lines)
        return "got prompt" in text and "Prompt executed" in text

    wait_until(have_both, 5, what="log lines of the run")
    assert client.subscribe_logs(enabled=False) is True


@pytest.mark.timeout(40)
def test_log_subscription_is_renewed_after_a_reconnect(sim, make_client):
    proxy = TcpProxy(sim.port).start()
    try:
        c = make_client(proxy.url)
        c.connect(5)
        assert c.subscribe_logs() is True
        proxy.cut()
        wait_until(lambda: not c.connected, 5, what="the client to notice the cut")
        # While this client is away the server logs something and, finding its socket gone,
        # drops the subscription (as ComfyUI does for a socket that disconnects).
        r = requests.post(sim.url + "/prompt", json={"prompt": graph(steps=1), "client_id": "someone-else"}, timeout=5)
        assert r.status_code == 200
        time.sleep(0.8)
        proxy.resume()
        wait_until(lambda: c.connected, 10, what="the client to reconnect")
        c.drain_logs()
        c.wait(c.submit(graph(steps=1)).prompt_id, timeout=20)
        lines: list[str] = []

        def have_both():
            lines.extend(e.m for e in c.drain_logs())
            return "got prompt" in "".join(lines) and "Prompt executed" in "".join(lines)

        wait_until(have_both, 5, what="log lines after the reconnect")
    finally:
        proxy.close()


@pytest.mark.timeout(30)
def test_log_subscription_without_the_route_returns_false(make_client):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = make_client(f"http://127.0.0.1:{server.server_address[1]}")
        assert c.subscribe_logs() is False
        with pytest.raises(ComfyProtocolError) as info:
            c.system_stats()  # not ComfyUI: a clear protocol error with the status
        assert info.value.status_code == 501
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(30)
def test_preview_frames_are_delivered_when_asked(sim, make_client):
    c = make_client(sim.url, previews=True)
    sub = c.submit(graph(steps=3, preview=True))
    evs = collect(c, sub.prompt_id)
    previews = [e for e in evs if isinstance(e, Preview)]
    assert previews and all(p.prompt_id == sub.prompt_id for p in previews)
    assert previews[0].data[:2] == b"\xff\xd8" and previews[0].image_type == "image/jpeg"
    plain = [e for e in collect(c, c.submit(graph(steps=2)).prompt_id) if isinstance(e, Preview)]
    assert plain == []


@pytest.mark.timeout(30)
def test_preview_frames_are_ignored_by_default(client):
    sub = client.submit(graph(steps=3, preview=True))
    evs = collect(client, sub.prompt_id)
    assert not [e for e in evs if isinstance(e, Preview)] and isinstance(evs[-1], Succeeded)


@pytest.mark.timeout(30)
def test_thin_calls(sim, client):
    stats = client.system_stats()
    assert stats.comfyui_version and stats.devices
    info = client.object_info("SlowSteps")
    assert info["SlowSteps"].output == ["IMAGE"]
    assert client.object_info("NoSuchNode") == {}
    assert client.prompt_queue_remaining() == 0
    q = client.queue()
    assert q.running == [] and q.pending == []
    client.free(free_memory=True)
    client.interrupt(str(uuid.uuid4()))  # targeted at nothing: harmless
    client.delete_from_queue([str(uuid.uuid4())])
    assert client.history(str(uuid.uuid4())) is None


@pytest.mark.timeout(30)
def test_queue_items_are_typed(client):
    running = client.submit(graph(steps=100, sps=0.05))
    pending = client.submit(graph(steps=2), extra_data={"job": "x"})
    events_until(client.events(running.prompt_id, timeout=20), Progress)
    q = client.queue()
    assert q.running_ids() == [running.prompt_id] and q.pending_ids() == [pending.prompt_id]
    item = q.pending[0]
    assert item.number == pending.number and item.client_id == client.client_id
    assert item.extra_data.get("job") == "x" and item.outputs_to_execute == ["2"]
    assert item.graph["1"]["class_type"] == "SlowSteps"
    assert client.prompt_queue_remaining() == 2
    urgent = client.submit(graph(steps=2), front=True)
    assert urgent.number < pending.number
    assert client.queue().pending_ids() == [urgent.prompt_id, pending.prompt_id]
    for sub in (urgent, pending, running):
        client.cancel(sub.prompt_id)


@pytest.mark.timeout(30)
def test_api_path_prefix(sim, make_client):
    c = make_client(sim.url + "/api/")
    assert c.ws_url == f"ws://127.0.0.1:{sim.port}/api/ws"
    assert c.wait(c.submit(graph(steps=1)).prompt_id, timeout=20).ok


@pytest.mark.timeout(30)
def test_close_stops_the_reader_quickly(sim):
    c = ComfyClient(sim.url, poll_interval=0.1)
    c.connect(5)
    reader = c._reader
    t0 = time.monotonic()
    c.close()
    assert not reader.is_alive() and time.monotonic() - t0 < 2
    with ComfyClient(sim.url) as c2:
        c2.connect(5)
    assert not c2._reader.is_alive()


# ---------------------------------------------------------------- helpers
def sim_history_has(sim, prompt_id: str) -> bool:
    return bool(requests.get(f"{sim.url}/history/{prompt_id}", timeout=2).json())


class TcpProxy:
    """A loopback TCP forwarder the test can cut (reset every connection, refuse new ones)
    and resume on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                down, _ = ls.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                self._conns.update((down, up))
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        if self._listener is not None:
            try:  # wakes the blocked accept() and stops listening (close alone does neither on Linux)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def resume(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()
