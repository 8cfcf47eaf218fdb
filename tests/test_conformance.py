"""Conformance: every recorded ComfyUI scenario, replayed against the simulator.

For each transcript in tests/transcripts/ a fresh simulator gets the same requests
and socket actions, released by the same websocket events as in the recording (see
tests/support/replay.py).  Then, per recorded exchange and per socket:

* HTTP: status code, Content-Type, and the body after normalization (prompt ids,
  times, tracebacks, the `number` counter relative to the scenario) must be equal,
  key order included; the few rules below relax single bodies, each for a reason.
* websockets: the sequence of message types and their (normalized) data, per
  connection; runs of per-step progress frames count as one token whose shape
  (progress_state → progress, previews, max) must match; the run just before an
  interrupt may be missing on one side.  `logs` messages are compared apart, as
  line kinds, since the server batches them.
"""
from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.procs import wait_until
from tests.support.replay import (TRANSCRIPTS, HttpResult, Normalizer, Replay, Transcript, compare_streams,
                                  differences, keys_only, log_lines, log_sizes, normalize_log, shape, tokens)

NAMES = sorted(p.name for p in TRANSCRIPTS.glob("*.json"))

# Bodies compared by their keys ("keys") or keys and value types ("shape") instead of
# their values, and why.
RELAXED = [
    (r".*", r"^GET /(api/)?system_stats$", "keys",
     "RAM, argv, Python/torch versions and the device are the recording machine's (a CPU box, whose "
     "device index is null); the simulator reports its own RAM and a simulated CUDA device"),
    (r".*", r"^GET /models/checkpoints$", "keys",
     "the recording rig had no checkpoint files; the simulator lists its --checkpoints"),
    (r"endpoints_after", r"^GET /(history|api/jobs)(\?(max_items|limit|status=failed).*)?$", "shape",
     "history and job listings hold the whole recording session (44 prompts from every scenario); the "
     "simulator is seeded with a few prompts of its own instead"),
]
# Values no two servers share, compared as placeholders (key -> placeholder), and why.
PLACEHOLDERS = {
    # wall-clock epoch milliseconds of the recording
    "timestamp": "<time>", "create_time": "<time>", "execution_start_time": "<time>",
    "execution_end_time": "<time>",
    # the real server's stack frames (absolute paths, line numbers); the simulator's own
    # frames are there instead
    "traceback": "<traceback>",
    # ComfyUI lists every node id its cache knows, earlier prompts' included: not run-specific
    "current_outputs": "<node ids>",
}
# Plugin classes the simulator adds: the recording rig had no StoryDiffusion installed.
PLUGIN_CLASSES = set(json.loads((TRANSCRIPTS.parent.parent / "comfyui_sim" / "data" /
                                 "storydiffusion_object_info.json").read_text())) - {
    "CheckpointLoaderSimple", "EmptyLatentImage", "VAEDecode", "SaveImage", "PreviewImage"}
# Recorded pauses are shortened to 150 ms (the websocket events still gate every action);
# logs_subscribe keeps longer ones: the server flushes log lines in batches, and the
# recording unsubscribed only after the last batch had arrived.
CAP_MS = {"logs_subscribe.json": 450.0}


@pytest.mark.parametrize("name", NAMES, ids=[n.removesuffix(".json") for n in NAMES])
def test_transcript(name, sim_factory):
    transcript = Transcript.load(name)
    sim = sim_factory()
    replay = Replay(transcript, sim.url, cap_ms=CAP_MS.get(name, 150.0))
    if name == "endpoints_after.json":
        seed_history(sim.url, replay)
    if name == "history_race_probe.json":
        replay.on_frame = probe_history
    replay.run()
    problems = list(replay.problems)

    expected_norm, actual_norm = normalizers(replay)
    for index, result in enumerate(replay.http):
        for problem in check_http(name, result, expected_norm, actual_norm):
            problems.append(f"{name}: HTTP #{index} {describe(result.entry)}: {problem}")

    recorded_frames = transcript.frames
    for conn, frames in recorded_frames.items():
        live = replay.conns.get(conn)
        live_frames = live.frames if live else []
        report = compare_streams(tokens(frames, expected_norm), tokens(live_frames, actual_norm))
        if report:
            problems.append(f"{name}: connection '{conn}', {report}")
        if log_lines(frames) != log_lines(live_frames):
            problems.append(f"{name}: connection '{conn}': log lines differ:\n  recorded {log_lines(frames)}"
                            f"\n  simulator {log_lines(live_frames)}")
        if log_sizes(frames)[:1] != log_sizes(live_frames)[:1] or \
                set(log_sizes(frames)[1:]) - {"NoneType"} != set(log_sizes(live_frames)[1:]) - {"NoneType"}:
            problems.append(f"{name}: connection '{conn}': logs 'size' fields differ: "
                            f"{log_sizes(frames)} vs {log_sizes(live_frames)}")

    if name == "history_race_probe.json":
        problems += check_race_probe(transcript, replay)
    assert not problems, "\n\n".join(problems) + f"\n\n(simulator output:\n{sim.output()[-3000:]})"


def normalizers(replay: Replay) -> tuple[Normalizer, Normalizer]:
    """One normalizer per side; prompt ids are numbered in submission order on both, and
    `number` is made relative to the count of JSON POST /prompt before its first sight."""
    expected, actual = Normalizer(PLACEHOLDERS), Normalizer(PLACEHOLDERS)
    posts = 0
    for result in replay.http:
        entry = result.entry
        if entry["method"] == "POST" and urlsplit(entry["url"]).path == "/prompt" \
                and not isinstance(entry.get("request_body"), str):
            if isinstance(entry.get("body"), dict) and "number" in entry["body"]:
                expected.see_number(entry["body"]["number"], posts)
            if isinstance(result.body, dict) and "number" in result.body:
                actual.see_number(result.body["number"], posts)
            posts += 1
        if isinstance(entry.get("body"), dict) and "prompt_id" in entry["body"] and isinstance(result.body, dict) \
                and "prompt_id" in result.body:
            expected.add_prompt(entry["body"]["prompt_id"])
            actual.add_prompt(result.body["prompt_id"])
    for recorded, live in replay.id_map.items():   # ids that only the scenario setup knows
        expected.add_prompt(recorded)
        actual.add_prompt(live)
    return expected, actual


# -- HTTP ---------------------------------------------------------------------------------
def describe(entry: dict) -> str:
    parts = urlsplit(entry["url"])
    return f"{entry['method']} {parts.path}{'?' + parts.query if parts.query else ''}"


def relaxed(name: str, entry: dict):
    for scenario, route, mode, _ in RELAXED:
        if re.search(scenario, name) and re.search(route, describe(entry)):
            return {"keys": keys_only, "shape": shape}[mode]
    return None


def check_http(name: str, result: HttpResult, expected_norm: Normalizer, actual_norm: Normalizer) -> list[str]:
    entry = result.entry
    problems = []
    if result.status != entry["status"]:
        problems.append(f"status {entry['status']} expected, got {result.status}")
    recorded_type = entry["response_headers"].get("Content-Type")
    if result.headers.get("Content-Type") != recorded_type:
        problems.append(f"Content-Type {recorded_type!r} expected, got {result.headers.get('Content-Type')!r}")
    if entry["response_headers"].get("Connection") == "close" and result.headers.get("Connection") != "close":
        problems.append("the recorded answer closed the connection, the simulator's does not")
    if "Content-Disposition" in entry["response_headers"]:
        want = expected_norm.text(entry["response_headers"]["Content-Disposition"])
        got = actual_norm.text(result.headers.get("Content-Disposition", ""))
        if want != got:
            problems.append(f"Content-Disposition {want!r} expected, got {got!r}")
        for header in ("Etag", "Last-Modified", "Accept-Ranges"):
            if header not in result.headers:
                problems.append(f"header {header} missing")

    if "body_magic_hex" in entry:   # a file download: bytes are not recorded, their kind is
        magic = result.body[:8].hex() if isinstance(result.body, bytes) else None
        if magic != entry["body_magic_hex"]:
            problems.append(f"file magic {entry['body_magic_hex']} expected, got {magic}")
        return problems
    if "body_summary" in entry:
        return problems + check_summary(name, entry["body_summary"], result, expected_norm, actual_norm)
    if "body_text" in entry:
        recorded = entry["body_text"]
    else:
        recorded = entry.get("body")
    live = result.body if result.kind != "bytes" else "<bytes>"
    view = relaxed(name, entry)
    if view is not None:
        return problems + differences(view(recorded), view(live), "body")
    return problems + differences(expected_norm(recorded), actual_norm(live), "body")


def check_summary(name, summary, result: HttpResult, expected_norm, actual_norm) -> list[str]:
    """The recorder kept only a digest of a few large bodies; compare the same digest."""
    body = result.body
    if not isinstance(body, dict):
        return [f"a JSON object expected, got {type(body).__name__}"]
    if "node_classes" in summary:
        unknown = set(body) - set(summary["node_classes"]) - PLUGIN_CLASSES
        return [f"classes the real server does not have: {sorted(unknown)}"] if unknown else []
    if set(summary) == {"keys"}:
        return differences(sorted(summary["keys"]), sorted(body), "body keys")
    if "ids_in_order" in summary:
        # /history after the whole recording session: entries of the same shape.
        return [] if all(set(v) == {"prompt", "outputs", "status", "meta"} for v in body.values()) \
            else [f"history entries with unexpected keys: {[list(v) for v in body.values()][:2]}"]
    if "queue_running" in summary:
        digest = {k: [item[:2] for item in body[k]] for k in ("queue_running", "queue_pending")}
        return differences(expected_norm(summary), actual_norm(digest), "body")
    if "entries_count" in summary:   # /internal/logs/raw: the startup lines differ, the last ones must not
        problems = differences(sorted(summary["keys"]), sorted(body), "body keys")
        problems += differences(summary["size"], body.get("size"), "body.size")
        want = [normalize_log(e["m"]) for e in summary["last_entries"]]
        got = [normalize_log(e["m"]) for e in body.get("entries", [])[-len(want):]]
        return problems + differences(want, got, "last log lines")
    if len(summary) == 1:   # /history/{id} digest: {id: status}
        digest = {k: v["status"] for k, v in body.items()}
        return differences(expected_norm(summary), actual_norm(digest), "body")
    return [f"unknown body summary {list(summary)}"]


# -- scenario setups and hooks ---------------------------------------------------------------
def seed_history(url: str, replay: Replay) -> None:
    """endpoints_after ran after every other scenario: give the simulator a short history
    (successes around an interrupted prompt - the recording's failures were interrupts -, the
    oldest and newest entries being successes as there) and stand its last prompt in for the recording's last one, which the scenario
    deletes from /history."""
    ids = []
    for prefix, steps in (("seed_a", 1), ("seed_b", 200), ("seed_c", 1), ("seed_d", 1)):
        graph = {"1": {"class_type": "SlowSteps", "inputs": {"steps": steps, "seconds_per_step": 0.01,
                                                             "fail_at_step": -1}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}
        r = requests.post(url + "/prompt", json={"prompt": graph, "client_id": "seed"}, timeout=5)
        ids.append(r.json()["prompt_id"])
        if steps > 1:
            wait_until(lambda: [item[1] for item in requests.get(url + "/queue", timeout=5).json()["queue_running"]]
                       == ids[-1:], 10, what="the seeded long prompt to run")
            requests.post(url + "/interrupt", json={"prompt_id": ids[-1]}, timeout=5)
    wait_until(lambda: all(requests.get(f"{url}/history/{i}", timeout=5).json() for i in ids), 10,
               what="seeded prompts in /history")
    replay.id_map["6449d9f4-39e9-4551-94a1-148b42e38b44"] = ids[-1]


def probe_history(conn: str, frame, replay: Replay) -> None:
    """history_race_probe: fetch /history/{id} the moment execution_success and then
    executing{node: null} arrive, as the recorder did."""
    data = (frame.message or {}).get("data") or {}
    event = frame.type
    if event == "execution_success" or (event == "executing" and data.get("node") is None and "prompt_id" in data):
        present = bool(requests.get(f"{replay.base_url}/history/{data['prompt_id']}", timeout=5).json())
        replay.__dict__.setdefault("race", []).append((event, present))


def check_race_probe(transcript: Transcript, replay: Replay) -> list[str]:
    results = transcript.notes[-1]["results"]
    recorded = all(r["history_present_after_execution_success"] and r["history_present_after_executing_null"]
                   for r in results)
    seen = replay.__dict__.get("race", [])
    if len(seen) != 2 * len(results):
        return [f"history_race_probe: {len(seen)} probes made, {2 * len(results)} expected"]
    if recorded and not all(present for _, present in seen):
        return [f"history_race_probe: /history lagged behind the websocket: {seen}"]
    return []


def test_every_transcript_is_covered():
    """A new transcript file is picked up automatically; make sure none is unreadable."""
    for name in NAMES:
        transcript = Transcript.load(name)
        assert transcript.entries[0]["dir"] == "meta", name
        assert transcript.actions, name
    assert len(NAMES) >= 21
