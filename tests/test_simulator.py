"""The simulator's own behaviour: pure decisions first, then real processes."""
from __future__ import annotations

import copy
import io
import json
import socket
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from comfyui_sim import config as sim_config
from comfyui_sim import graph, jobs
from comfyui_sim.executor import save_image_path
from comfyui_sim.faults import parse_request
from comfyui_sim.nodes import NodeRegistry, story_scenes
from comfyui_sim.validation import validate_prompt
from tests.support.procs import wait_until
from tests.support.replay import LiveConn

DATA = Path(__file__).parent / "data"
REGISTRY = NodeRegistry(("juggernautXL_v8Rundiffusion.safetensors", "sd_xl_base_1.0.safetensors"),
                        Path("/nonexistent-input-dir"))
SCHEMAS = REGISTRY.schemas


def slow(steps=3, sps=0.0, fail=-1, prefix="t", **extra):
    return {"1": {"class_type": "SlowSteps", "inputs": {"steps": steps, "seconds_per_step": sps,
                                                        "fail_at_step": fail, **extra}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def sdxl(seed=42, steps=6, width=1024, height=1024, batch=1, ckpt="sd_xl_base_1.0.safetensors", prefix="sdxl"):
    """A plain SDXL txt2img graph, as ComfyUI's default workflow builds it."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dawn", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def story_graph(scenes: str, width=512, height=768, steps=4, prefix="story"):
    g = json.loads((DATA / "storydiffusion_txt2img_api.json").read_text())
    g["78"]["inputs"].update(scene_text=scenes, width=width, height=height)
    g["352"]["inputs"]["steps"] = steps
    g["85"]["inputs"]["filename_prefix"] = prefix
    return g


# ================================================================== validation (pure)
def validate(prompt, partial=None):
    return validate_prompt(prompt, SCHEMAS, REGISTRY.custom_validators(), partial)


def test_valid_graph_is_accepted_and_values_are_converted_like_comfyui():
    g = slow(steps="4", sps=1)
    result = validate(g)
    assert result.ok and result.outputs == ["2"] and result.node_errors == {}
    # ComfyUI writes converted values back into the queued graph, not into the caller's.
    assert result.prompt["1"]["inputs"]["steps"] == 4 and result.prompt["1"]["inputs"]["seconds_per_step"] == 1.0
    assert g["1"]["inputs"]["steps"] == "4"


def test_missing_input_reports_the_node_and_its_dependent_output():
    g = slow()
    del g["1"]["inputs"]["steps"]
    result = validate(g)
    assert not result.ok
    assert result.error == {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                            "details": "", "extra_info": {}}
    assert result.node_errors == {"1": {"errors": [{
        "type": "required_input_missing", "message": "Required input is missing", "details": "steps",
        "extra_info": {"input_name": "steps"}}], "dependent_outputs": ["2"], "class_type": "SlowSteps"}}


@pytest.mark.parametrize("change, kind, message", [
    ({"steps": "abc"}, "invalid_input_type", "Failed to convert an input value to a INT value"),
    ({"steps": 0}, "value_smaller_than_min", "Value 0 smaller than min of 1"),
    ({"steps": 10001}, "value_bigger_than_max", "Value 10001 bigger than max of 10000"),
    ({"seconds_per_step": "x"}, "invalid_input_type", "Failed to convert an input value to a FLOAT value"),
])
def test_bad_values(change, kind, message):
    g = slow()
    g["1"]["inputs"].update(change)
    error = validate(g).node_errors["1"]["errors"][0]
    assert (error["type"], error["message"]) == (kind, message)
    assert error["extra_info"]["input_config"][0] in ("INT", "FLOAT")


def test_combo_values_must_be_in_the_list_and_long_lists_are_not_echoed():
    g = sdxl()
    g["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    g["3"]["inputs"]["sampler_name"] = "warp_drive"
    errors = validate(g).node_errors
    ckpt = errors["4"]["errors"][0]
    assert ckpt["type"] == "value_not_in_list"
    assert ckpt["details"] == ("ckpt_name: 'missing.safetensors' not in "
                               "['juggernautXL_v8Rundiffusion.safetensors', 'sd_xl_base_1.0.safetensors']")
    assert ckpt["extra_info"]["input_config"][0] == REGISTRY.checkpoints
    sampler = errors["3"]["errors"][0]
    assert sampler["details"] == "sampler_name: 'warp_drive' not in (list of length 44)"
    assert sampler["extra_info"]["input_config"] is None
    assert errors["4"]["dependent_outputs"] == ["9"] and errors["3"]["dependent_outputs"] == ["9"]


@pytest.mark.parametrize("mutate, error_type, message, details", [
    (lambda g: g.update({"3": {"class_type": "NoSuchNodeType", "inputs": {}}}),
     "invalid_prompt", "Cannot execute because node NoSuchNodeType does not exist.", "Node ID '#3'"),
    (lambda g: g["1"].pop("class_type"),
     "invalid_prompt", "Cannot execute because a node is missing the class_type property.", "Node ID '#1'"),
    (lambda g: g.pop("2"), "prompt_no_outputs", "Prompt has no outputs", ""),
])
def test_whole_prompt_errors(mutate, error_type, message, details):
    g = slow()
    mutate(g)
    result = validate(g)
    assert result.error == {"type": error_type, "message": message, "details": details, "extra_info": {}}
    assert result.node_errors == {}


def test_link_to_a_missing_node_is_an_exception_on_the_output():
    g = slow()
    g["2"]["inputs"]["images"] = ["99", 0]
    result = validate(g)
    assert result.error["details"] == "Exception when validating node: '99'"
    error = result.node_errors["2"]["errors"][0]
    assert error["type"] == "exception_during_validation" and error["details"] == "'99'"
    assert error["extra_info"]["exception_type"] == "KeyError"
    assert isinstance(error["extra_info"]["traceback"], list)


def test_deeper_broken_link_is_reported_on_the_linked_node():
    g = sdxl()
    g["8"]["inputs"]["samples"] = ["3", 0]
    g["3"]["inputs"]["model"] = ["404", 0]
    error = validate(g).node_errors["3"]["errors"][0]
    assert error["type"] == "exception_during_inner_validation"
    assert error["extra_info"]["input_name"] == "samples" and error["extra_info"]["linked_node"] == ["3", 0]


def test_linked_types_must_match():
    g = sdxl()
    g["8"]["inputs"]["vae"] = ["4", 1]   # a CLIP where a VAE belongs
    error = validate(g).node_errors["8"]["errors"][0]
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "vae, received_type(CLIP) mismatch input_type(VAE)"


def test_partly_valid_graph_runs_the_valid_outputs_only():
    g = slow(prefix="good")
    g["3"] = {"class_type": "SlowSteps", "inputs": {"steps": 0, "seconds_per_step": 0.0, "fail_at_step": -1}}
    g["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}
    result = validate(g)
    assert result.ok and result.outputs == ["2"]
    assert list(result.node_errors) == ["3"] and result.node_errors["3"]["dependent_outputs"] == ["4"]
    assert validate(g, partial=["4"]).ok is False


def test_load_image_checks_the_file_instead_of_the_list():
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "not_uploaded.png"}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    error = validate(g).node_errors["1"]["errors"][0]
    assert error == {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                     "details": "image - Invalid image file: not_uploaded.png", "extra_info": {"input_name": "image"}}


def test_storydiffusion_graph_validates():
    assert validate(story_graph("[Taylor] wakes up")).ok


# ================================================================== graph, files, jobs, config (pure)
def test_execution_order_follows_comfyui_staging():
    g = story_graph("[Taylor] a")
    order = graph.execution_order(g, ["85"], set(), lambda n: SCHEMAS[g[n]["class_type"]]["output_node"])
    assert order == ["84", "213", "78", "81", "352", "80", "85"]
    # Cached inputs are not staged at all.
    assert graph.execution_order(g, ["85"], {"80"}, lambda n: n == "85") == ["85"]


def test_cache_keys_follow_inputs_not_node_ids():
    a = slow(prefix="x")
    b = {"7": a["1"], "8": {**a["2"], "inputs": {"images": ["7", 0], "filename_prefix": "x"}}}
    ka, kb = graph.signatures(a), graph.signatures(b)
    assert ka["1"] == kb["7"] and ka["2"] == kb["8"]
    c = copy.deepcopy(a)
    c["1"]["inputs"]["steps"] = 4
    kc = graph.signatures(c)
    assert kc["1"] != ka["1"] and kc["2"] != ka["2"]   # a change upstream changes everything downstream


def test_save_image_path_counts_past_the_highest_existing_file(tmp_path):
    (tmp_path / "job_00007_.png").write_bytes(b"")
    (tmp_path / "job_x_00099_.png").write_bytes(b"")
    folder, name, counter, sub = save_image_path("job", tmp_path)
    assert (name, counter, sub) == ("job", 8, "")
    folder, name, counter, sub = save_image_path("tasks/abc", tmp_path)
    assert (folder, name, counter, sub) == ((tmp_path / "tasks").resolve(), "abc", 1, "tasks")
    with pytest.raises(Exception, match="outside the output folder"):
        save_image_path("../escape", tmp_path)


def test_story_scenes_drop_lines_without_a_character_and_captions():
    text = "[Taylor] wake up ;\njust a note\n[Lecun] drives#caption text\n\n[NC] empty street"
    assert story_scenes(text) == ["[Taylor] wake up ;", "[Lecun] drives", "[NC] empty street"]


def test_jobs_query_errors():
    assert jobs.parse_query({"status": "bogus"})[1] == \
        "Invalid status value(s): bogus. Valid values: pending, in_progress, completed, failed"
    assert jobs.parse_query({"limit": "0"})[1] == "limit must be a positive integer"
    args, error = jobs.parse_query({"status": "completed,failed", "sort_order": "asc", "offset": "-3"})
    assert error is None and args["status"] == ["completed", "failed"] and args["offset"] == 0


def test_settings_come_from_flags_or_environment():
    env = {"COMFYUI_SIM_PORT": "9000", "COMFYUI_SIM_SPEED": "2.5", "COMFYUI_SIM_CHECKPOINTS": "a.safetensors, b.ckpt"}
    cfg = sim_config.parse(["--port", "9100"], env)
    assert (cfg.port, cfg.speed, cfg.checkpoints) == (9100, 2.5, ("a.safetensors", "b.ckpt"))
    assert sim_config.parse([], {}).step_seconds == 0.25


def test_fault_requests_are_checked():
    assert parse_request({"stall": True, "fail_at_step": None})[1] == []
    assert parse_request({"stall": 1})[1] == ["stall has the wrong type"]
    assert parse_request({"explode": True})[1] == ["unknown fault 'explode'"]
    assert parse_request({"speed": 0})[1] == ["speed must be > 0"]


# ================================================================== helpers for live simulators
class Socket:
    """A websocket of one clientId, collecting text messages."""

    def __init__(self, sim, client_id="tester"):
        self.client_id = client_id
        self.conn = LiveConn(sim.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}", time.monotonic())

    @property
    def messages(self):
        return [f.message for f in self.conn.frames if f.message is not None]

    def wait(self, predicate, timeout=15.0, what="a message"):
        return wait_until(lambda: next((m for m in self.messages if predicate(m)), None), timeout, what=what)

    def close(self):
        self.conn.close()


def submit(sim, prompt, client_id="tester", **extra):
    r = requests.post(sim.url + "/prompt", json={"prompt": prompt, "client_id": client_id, **extra}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["prompt_id"]


def finished(sim, prompt_id, timeout=20.0):
    return wait_until(lambda: requests.get(f"{sim.url}/history/{prompt_id}", timeout=5).json().get(prompt_id),
                      timeout, what=f"history of {prompt_id}")


def fetch_png(sim, ref):
    r = requests.get(sim.url + "/view", params=ref, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def is_progress(prompt_id, node=None):
    return lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id and \
        (node is None or m["data"]["node"] == node)


# ================================================================== graphs on a live simulator
def test_storydiffusion_graph_makes_one_png_per_scene(sim):
    ws = Socket(sim)
    scenes = "[Taylor] wake up in the bed ;\nnot a scene\n[Taylor] have breakfast#by the window\n[NC] a quiet street"
    pid = submit(sim, story_graph(scenes, width=512, height=768, steps=3, prefix="story/task1"))
    entry = finished(sim, pid)
    assert entry["status"]["status_str"] == "success"
    refs = entry["outputs"]["85"]["images"]
    assert [r["filename"] for r in refs] == ["task1_00001_.png", "task1_00002_.png", "task1_00003_.png"]
    assert {r["subfolder"] for r in refs} == {"story"}
    for ref in refs:
        assert fetch_png(sim, ref).size == (512, 768)
    ws.wait(lambda m: m["type"] == "executing" and m["data"]["node"] is None, what="end of the prompt")
    progress = [m["data"]["value"] for m in ws.messages if is_progress(pid, "352")(m)]
    assert progress == [1, 2, 3] * 3   # each scene is a full sampler run
    executed = [m["data"]["node"] for m in ws.messages if m["type"] == "executing" and m["data"]["node"]]
    assert executed == ["84", "213", "78", "81", "352", "80", "85"]
    ws.close()


def test_storydiffusion_without_scene_lines_fails_like_the_plugin(sim):
    pid = submit(sim, story_graph("no character here"))
    entry = finished(sim, pid)
    error = entry["status"]["messages"][-1]
    assert error[0] == "execution_error"
    assert error[1]["node_type"] == "StoryDiffusion_CLIPTextEncode"
    assert (error[1]["exception_type"], error[1]["exception_message"]) == \
        ("TypeError", "exceptions must derive from BaseException\n")


def test_sdxl_graph_loads_once_caches_and_reports_vram(sim_factory):
    sim = sim_factory("--step-seconds", "0.02", "--load-seconds", "0.8", "--vram", "12",
                      env={"COMFYUI_SIM_GPU_NAME": "NVIDIA L4"})
    ws = Socket(sim)
    device = requests.get(sim.url + "/system_stats", timeout=5).json()["devices"][0]
    assert device["type"] == "cuda" and "NVIDIA L4" in device["name"] and device["vram_total"] == 12 * 1024 ** 3
    idle_free = device["vram_free"]

    first = submit(sim, sdxl(seed=1, steps=20, batch=2))
    ws.wait(is_progress(first), what="sampling")
    busy_free = requests.get(sim.url + "/system_stats", timeout=5).json()["devices"][0]["vram_free"]
    assert busy_free < idle_free - 6 * 1024 ** 3   # checkpoint + activations
    refs = finished(sim, first)["outputs"]["9"]["images"]
    assert [fetch_png(sim, r).size for r in refs] == [(1024, 1024), (1024, 1024)]

    second = submit(sim, sdxl(seed=2, steps=20, batch=2))       # new seed: only the sampler onwards runs
    finished(sim, second)
    same = submit(sim, sdxl(seed=2, steps=20, batch=2))         # identical: nothing runs, same files
    cached = finished(sim, same)
    assert cached["status"]["messages"][1][1]["nodes"] == ["4", "6", "7", "5", "3", "8", "9"]
    assert cached["outputs"] == finished(sim, second)["outputs"]

    busy = {b["prompt_id"]: b["end"] - b["start"] for b in sim.record()["busy"]}
    assert busy[first] >= 0.8 + 20 * 0.02          # checkpoint load + 20 steps
    assert 20 * 0.02 <= busy[second] < 0.8         # checkpoint still loaded
    assert busy[same] < 0.2
    ws.close()


def test_switching_checkpoints_costs_a_load(sim_factory):
    sim = sim_factory("--step-seconds", "0.01", "--load-seconds", "0.5")
    a = submit(sim, sdxl(ckpt="sd_xl_base_1.0.safetensors", steps=2))
    b = submit(sim, sdxl(ckpt="juggernautXL_v8Rundiffusion.safetensors", steps=2))
    finished(sim, a), finished(sim, b)
    busy = [e["end"] - e["start"] for e in sim.record()["busy"]]
    assert all(d >= 0.5 for d in busy), busy


# ================================================================== faults
def test_stall_freezes_the_run_silently_and_resume_continues(sim):
    ws = Socket(sim)
    pid = submit(sim, sdxl(steps=60))
    ws.wait(is_progress(pid), what="first step")
    assert sim.faults(stall=True)["stall"] is True
    time.sleep(0.3)   # the node reaches its next check within a step (0.02 s)
    count = len(ws.messages)
    time.sleep(0.6)
    assert len(ws.messages) == count                     # nothing sent while stalled
    assert requests.get(sim.url + "/queue", timeout=2).json()["queue_running"][0][1] == pid   # HTTP answers
    sim.faults(stall=False)
    assert finished(sim, pid)["status"]["status_str"] == "success"
    ws.close()


def test_interrupt_while_stalled_takes_effect_on_resume(sim):
    pid = submit(sim, slow(steps=200, sps=0.01))
    wait_until(lambda: sim.record()["running"], 5, what="running")
    sim.faults(stall=True)
    requests.post(sim.url + "/interrupt", json={"prompt_id": pid}, timeout=5)
    time.sleep(0.2)
    assert requests.get(f"{sim.url}/history/{pid}", timeout=5).json() == {}
    sim.faults(reset=True)
    assert finished(sim, pid)["status"]["messages"][-1][0] == "execution_interrupted"
    assert sim.record()["interrupts"][0]["interrupted_prompt_id"] == pid


def test_crash_at_step_kills_the_process(sim):
    sim.faults(crash_at_step=3)
    submit(sim, sdxl(steps=10))
    wait_until(lambda: sim.proc.poll() is not None, 10, what="the simulator to die")
    with pytest.raises(requests.ConnectionError):
        requests.get(sim.url + "/system_stats", timeout=1)
    sim.restart()   # a fresh process on the same port forgets everything
    assert requests.get(sim.url + "/queue", timeout=5).json() == {"queue_running": [], "queue_pending": []}


def test_crash_now_answers_first(sim):
    assert sim.faults(crash=True)["stall"] is False
    wait_until(lambda: sim.proc.poll() is not None, 5, what="the simulator to die")


def test_drop_websockets_now_and_at_a_step(sim):
    ws = Socket(sim)
    sim.faults(drop_websockets=True)
    wait_until(lambda: ws.conn.done, 5, what="the socket to be closed")
    ws = Socket(sim)                     # reconnecting works
    assert ws.wait(lambda m: m["type"] == "status")["data"]["sid"] == "tester"
    assert sim.faults(drop_websockets_at_step=3)["drop_websockets_at_step"] == 3
    pid = submit(sim, sdxl(steps=8))
    wait_until(lambda: ws.conn.done, 10, what="the socket to be dropped at step 3")
    assert max(m["data"]["value"] for m in ws.messages if is_progress(pid)(m)) == 2
    assert sim.faults()["drop_websockets_at_step"] is None          # one-shot
    assert finished(sim, pid)["status"]["status_str"] == "success"   # the run itself goes on
    ws.close()


def test_fail_at_step_fails_every_sampler(sim_factory):
    sim = sim_factory("--step-seconds", "0.01", "--fail-at-step", "2")
    entry = finished(sim, submit(sim, sdxl()))
    event, data = entry["status"]["messages"][-1]
    assert (event, data["node_id"], data["exception_type"]) == ("execution_error", "3", "RuntimeError")
    assert data["exception_message"].endswith("step 2 (comfyui_sim fault)\n")
    assert data["current_inputs"]["steps"] == [6] and data["executed"] == ["4", "5", "7", "6"]
    sim.faults(fail_at_step=None)
    assert finished(sim, submit(sim, sdxl(seed=5)))["status"]["status_str"] == "success"
    assert sim.faults(reset=True)["fail_at_step"] == 2     # reset goes back to the start-up settings


def test_slow_start_refuses_connections_then_answers(sim_factory):
    started = time.monotonic()
    sim = sim_factory("--slow-start", "1.5", wait=False)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=0.5).close()
    sim.wait_ready(timeout=15)
    assert time.monotonic() - started >= 1.5


def test_speed_factor_scales_sampler_steps(sim_factory):
    sim = sim_factory("--step-seconds", "0.05", "--load-seconds", "0", "--speed", "0.5")
    slow_run = submit(sim, sdxl(steps=10, seed=1, width=512, height=512))
    finished(sim, slow_run)
    sim.faults(speed=5.0)
    fast_run = submit(sim, sdxl(steps=10, seed=2, width=512, height=512))
    finished(sim, fast_run)
    busy = {b["prompt_id"]: b["end"] - b["start"] for b in sim.record()["busy"]}
    assert busy[slow_run] >= 10 * 0.05 / 0.5
    assert busy[fast_run] < 10 * 0.05 / 0.5 / 3


# ================================================================== queue, record, routes
def test_backlog_runs_back_to_back(sim):
    ids = [submit(sim, slow(steps=3, sps=0.02, prefix=f"b{i}")) for i in range(5)]
    for pid in ids:
        finished(sim, pid)
    record = sim.record()
    assert record["submitted"] == ids and [b["prompt_id"] for b in record["busy"]] == ids
    assert all(b["outcome"] == "success" for b in record["busy"])
    gaps = [nxt["start"] - prev["end"] for prev, nxt in zip(record["busy"], record["busy"][1:])]
    assert max(gaps) < 0.005, gaps


def test_record_lists_deleted_prompts_and_interrupts(sim):
    running = submit(sim, slow(steps=100, sps=0.01, prefix="r"))
    pending = [submit(sim, slow(steps=1, prefix=f"p{i}")) for i in range(3)]
    requests.post(sim.url + "/queue", json={"delete": [pending[0]]}, timeout=5)
    requests.post(sim.url + "/queue", json={"clear": True}, timeout=5)
    requests.post(sim.url + "/interrupt", json={"prompt_id": "not-running"}, timeout=5)
    requests.post(sim.url + "/interrupt", data=b"", timeout=5)
    assert finished(sim, running)["status"]["messages"][-1][0] == "execution_interrupted"
    record = sim.record()
    assert record["deleted"] == [pending[0], pending[1], pending[2]]
    assert [(i["requested_prompt_id"], i["interrupted_prompt_id"]) for i in record["interrupts"]] == \
        [("not-running", None), (None, running)]
    assert [b["outcome"] for b in record["busy"]] == ["interrupted"]


def test_record_file_survives_a_sigkill_and_a_restart(sim_factory, tmp_path):
    journal = tmp_path / "record.jsonl"
    sim = sim_factory("--step-seconds", "0.02", "--record-file", str(journal))
    done = submit(sim, slow(steps=2, sps=0.01, prefix="cs_job-a"))
    finished(sim, done)
    submit(sim, slow(steps=500, sps=0.01, prefix="cs_job-b"))   # still running at the kill
    wait_until(lambda: sim.record()["running"], 5, what="the long prompt running")
    sim.restart()                                               # SIGKILL, same port, same file
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    kinds = [(e["e"], e.get("prefixes") or e.get("outcome")) for e in entries]
    assert kinds == [("boot", None), ("queued", ["cs_job-a"]), ("started", None), ("ended", "success"),
                     ("queued", ["cs_job-b"]), ("started", None), ("boot", None)]
    assert sim.record()["busy"] == []                           # the memory record did not survive


def test_every_route_answers_under_api_too(sim):
    pid = submit(sim, slow(steps=1, prefix="api"))
    entry = finished(sim, pid)
    for path in ("/system_stats", "/features", "/prompt", "/queue", "/history", f"/history/{pid}",
                 "/object_info/SaveImage", "/embeddings", "/models", "/models/checkpoints", f"/api/jobs/{pid}"):
        plain = requests.get(sim.url + path, timeout=5)
        api = requests.get(sim.url + "/api" + path, timeout=5)
        assert (plain.status_code, api.status_code) == (200, 200), path
        if path != "/system_stats":   # vram/ram figures move between two calls
            assert plain.json() == api.json(), path
    ref = entry["outputs"]["2"]["images"][0]
    assert requests.get(sim.url + "/api/view", params=ref, timeout=5).content[:4] == b"\x89PNG"
    api_pid = requests.post(sim.url + "/api/prompt", json={"prompt": slow(steps=1, prefix="api2")}, timeout=5)
    assert finished(sim, api_pid.json()["prompt_id"])
    for path in ("/api/interrupt", "/api/free"):
        assert requests.post(sim.url + path, json={}, timeout=5).status_code == 200
    # Like ComfyUI: /internal is a sub-application and is not mirrored under /api.
    assert requests.get(sim.url + "/internal/logs/raw", timeout=5).status_code == 200
    assert requests.get(sim.url + "/api/internal/logs/raw", timeout=5).status_code == 404


def test_free_memory_drops_the_cache_and_unload_models_the_checkpoint(sim_factory):
    sim = sim_factory("--step-seconds", "0.01", "--load-seconds", "0.3")
    g = sdxl(steps=2)
    finished(sim, submit(sim, g))
    requests.post(sim.url + "/free", json={"unload_models": True}, timeout=5)
    again = finished(sim, submit(sim, g))                    # still cached: nothing runs
    assert again["status"]["messages"][1][1]["nodes"] == list(g)
    requests.post(sim.url + "/free", json={"free_memory": True}, timeout=5)
    rerun = finished(sim, submit(sim, g))
    assert rerun["status"]["messages"][1][1]["nodes"] == []
    assert rerun["outputs"]["9"]["images"][0]["filename"] == "sdxl_00002_.png"
    assert requests.post(sim.url + "/free", data=b"", timeout=5).status_code == 500


def test_preview_method_makes_samplers_send_previews(sim_factory):
    sim = sim_factory("--step-seconds", "0.01", "--preview-method", "auto")
    ws = Socket(sim)
    ws.conn.ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    ws.wait(lambda m: m["type"] == "feature_flags")
    finished(sim, submit(sim, sdxl(steps=3)))
    wait_until(lambda: sum(f.binary is not None for f in ws.conn.frames) == 3, 5, what="3 previews")
    assert {f.binary["event_type"] for f in ws.conn.frames if f.binary} == {4}
    ws.close()


def test_without_client_id_progress_and_interrupts_reach_everyone(sim):
    a, b = Socket(sim, "a"), Socket(sim, "b")
    r = requests.post(sim.url + "/prompt", json={"prompt": slow(steps=200, sps=0.01, prefix="nocid")}, timeout=5)
    pid = r.json()["prompt_id"]
    for ws in (a, b):
        ws.wait(is_progress(pid), what="broadcast progress")
    requests.post(sim.url + "/interrupt", timeout=5)
    for ws in (a, b):
        ws.wait(lambda m: m["type"] == "execution_interrupted", what="broadcast interrupt")
        kinds = {m["type"] for m in ws.messages}
        assert not kinds & {"execution_start", "executing", "execution_cached"}, kinds
    a.close(), b.close()
