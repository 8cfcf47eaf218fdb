"""The Python client (app/client.py) against a real fleet: typed results, errors, the event
stream's resume, downloads."""
from __future__ import annotations

import signal

import pytest

from app.client import (ApiError, ComfyServiceClient, Event, Fleet, FleetGpu, Image, LogLine, ServiceUnreachable, Task,
                        WaitTimeout, Worker, WorkflowInfo)
from tests.support.api import LENA, story
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(90)

PNG = b"\x89PNG\r\n\x1a\n"
# Fast simulated steps and model loads: a two-scene story of 20 steps takes about a second.
SIM_ARGS = ("--step-seconds", "0.02", "--load-seconds", "0.2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One GPU, shared: each test follows its own jobs only."""
    from tests.support.fleet import one_gpu_fleet

    fleet = one_gpu_fleet(tmp_path_factory, "client-fleet", *SIM_ARGS)
    yield fleet
    fleet.stop()


@pytest.fixture
def client(fleet):
    with ComfyServiceClient(fleet.url, timeout=10, reconnect_delay=0.2) as client:
        yield client


def logged(events: list[Event]) -> list[tuple]:
    """Events the server logs (those with an id), as comparable tuples. A queued event's position
    is computed when it is sent, so only its id and type are compared."""
    return [(e.id, e.type, None if e.type == "queued" else e.data) for e in events if e.id]


def take_logged(stream, count: int) -> list[Event]:
    head = []
    for event in stream:
        head.append(event)
        if len([e for e in head if e.id]) == count:
            return head
    raise AssertionError(f"the stream ended after {head}")


def test_generate_wait_and_download_give_typed_results(client, tmp_path):
    task = client.generate(story(seed=7))
    assert isinstance(task, Task) and task.status == "queued" and task.params["seed"] == 7
    assert task.workflow == "storydiffusion" and task.progress is None and not task.done  # waits: no progress

    seen: list[Event] = []
    final = client.wait(task.task_id, timeout=30, on_event=seen.append)
    assert final.status == "succeeded" and final.done and final.gpu == "gpu.test.0", final
    assert final.started_at and final.finished_at >= final.started_at
    types = [e.type for e in seen]
    assert types[0] == "queued" and types[-1] == "succeeded" and types.index("started") < types.index("progress")
    assert types.count("output") == 2 and seen[-1].final and seen[-1].task() == final
    percents = [e.data["percent"] for e in seen if e.type == "progress"]
    assert percents == sorted(percents) and len(set(percents)) >= 2  # progress moved, never back

    images = final.images
    assert [type(i) for i in images] == [Image, Image]
    assert [(i.content_type, i.width, i.height) for i in images] == [("image/png", 256, 256)] * 2
    assert client.url_of(images[0]) == f"{client.base_url}/api/v1/tasks/{task.task_id}/images/0"
    paths = client.download(task.task_id, tmp_path / "out")  # a task id works as well as a Task
    assert [p.name for p in paths] == [f"{task.task_id}-0.png", f"{task.task_id}-1.png"]
    for path, image in zip(paths, images):
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) == image.size
    assert client.image(task.task_id, 1) == paths[1].read_bytes()
    assert client.get(task.task_id) == final
    assert all(isinstance(line, LogLine) for line in client.logs(task.task_id))


def test_idempotent_generate_returns_the_first_task(client):
    body = {"workflow": "sdxl", "width": 256, "height": 256}
    first = client.generate(body, prompt="a lighthouse at dusk", idempotency_key="client-test-1")
    again = client.generate(body, prompt="a lighthouse at dusk", idempotency_key="client-test-1")
    assert again.task_id == first.task_id and first.params["prompt"] == "a lighthouse at dusk"
    assert client.wait(first.task_id, timeout=30).status == "succeeded"


def test_errors_carry_the_error_document(client, fleet):
    with pytest.raises(ApiError) as invalid:
        client.generate(characters=[LENA], scenes=["[Bob] shows up"])
    error = invalid.value
    assert (error.status, error.source, error.code) == (422, "service", "invalid_parameters")
    assert error.details["errors"][0]["field"] == "scenes" and "[Bob]" in error.message
    assert str(error).startswith("service/invalid_parameters: ")

    with pytest.raises(ApiError) as pinned:  # a GPU the fleet never had: the caller's mistake, no retry
        client.generate(story(), gpu="gpu.nowhere.0")
    assert (pinned.value.status, pinned.value.code, pinned.value.retry_after) == (422, "unknown_gpu", None)
    assert pinned.value.details["available"]["gpus"] == ["gpu.test.0"]

    with pytest.raises(ApiError) as unknown:
        client.get("00000000-0000-4000-8000-000000000000")
    assert (unknown.value.status, unknown.value.code) == (404, "task_not_found")
    with pytest.raises(ApiError) as no_stream:  # the event stream refuses unknown tasks the same way
        next(client.events("00000000-0000-4000-8000-000000000000"))
    assert no_stream.value.code == "task_not_found"


def test_unreachable_service_is_not_an_api_error():
    client = ComfyServiceClient(f"http://127.0.0.1:{free_port()}", timeout=2, max_reconnects=1, reconnect_delay=0.01)
    with pytest.raises(ServiceUnreachable) as caught:
        client.workers()
    assert not isinstance(caught.value, ApiError) and "Connection refused" in str(caught.value)
    with pytest.raises(ServiceUnreachable):
        next(client.events("00000000-0000-4000-8000-000000000000"))


def test_workers_and_workflows_are_typed(client):
    workers = client.workers()
    assert [type(w) for w in workers] == [Worker] and workers[0].queue == "gpu.test.0"
    worker = workers[0]
    assert worker.comfyui_ok and not worker.draining and worker.gpu.name == "NVIDIA GeForce RTX 4090"
    assert worker.gpu.memory_total_mb == 24 * 1024 and worker.host_stats.ram_total_mb > 0

    workflows = {w.name: w for w in client.workflows()}
    assert all(isinstance(w, WorkflowInfo) for w in workflows.values())
    assert workflows["storydiffusion"].default and not workflows["sdxl"].default
    assert {"characters", "scenes"} <= set(workflows["storydiffusion"].required)
    assert workflows["sdxl"].properties["steps"]["maximum"] == 100


def test_the_fleet_is_typed(client):
    fleet = client.fleet()
    assert isinstance(fleet, Fleet) and fleet.current == 1 and fleet.action in ("up", "down", "hold") and fleet.reason
    assert [type(g) for g in fleet.gpus] == [FleetGpu] and fleet.gpus[0].queue == "gpu.test.0"


def test_events_resume_after_a_drop_without_losing_or_repeating(client):
    task = client.generate(story(steps=40))
    stream = client.events(task.task_id)
    head = take_logged(stream, 3)
    stream.close()  # drop the connection mid-job
    rest = list(client.events(task.task_id, last_event_id=[e for e in head if e.id][-1].id))
    assert rest[-1].type == "succeeded" and not any(e.final for e in head)

    whole = list(client.events(task.task_id))  # the finished task's log, read from the start
    assert logged(head + rest) == logged(whole)
    assert len({e.id for e in whole}) == len(whole) and [e.type for e in whole].count("progress") >= 5
    # Resuming after the final event: the server answers 204 and the stream is empty.
    assert list(client.events(task.task_id, last_event_id=whole[-1].id)) == []


def test_wait_times_out_and_cancel_ends_the_task(client):
    task = client.generate(story(steps=100))
    with pytest.raises(WaitTimeout):
        client.wait(task.task_id, timeout=0.3)
    assert isinstance(WaitTimeout("x"), TimeoutError)
    cancelled = client.cancel(task.task_id)
    assert cancelled.cancel_requested or cancelled.status == "cancelled"
    assert client.wait(task.task_id, timeout=20).status == "cancelled"
    with pytest.raises(ApiError) as finished:
        client.cancel(task.task_id)
    assert (finished.value.status, finished.value.code) == (409, "task_finished")


def test_events_reconnect_through_an_api_restart(fleet):
    """A real dropped connection: the API process dies mid-stream and comes back; the same
    iterator goes on where it was, and matches a full read of the finished task."""
    client = ComfyServiceClient(fleet.url, timeout=5, reconnect_delay=0.2, max_reconnects=30)
    task = client.generate(story(steps=60))
    stream = client.events(task.task_id)
    head = take_logged(stream, 3)
    fleet.api.stop(signal.SIGKILL)
    fleet.start_api()  # same port; the job ran on meanwhile
    rest = list(stream)
    assert rest[-1].type == "succeeded"
    assert logged(head + rest) == logged(list(client.events(task.task_id)))
