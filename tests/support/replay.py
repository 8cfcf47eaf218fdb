"""Replay a recorded ComfyUI transcript against a live server and compare.

A transcript (tests/transcripts/*.json, format in PROTOCOL.md) holds what a client
did (sockets opened, frames sent, HTTP requests) and what the real server answered.
`Replay` repeats the client's actions against another server, each one released by
the same websocket event it followed in the recording (e.g. "the 5th stable message
on `main`, then 3 progress frames"), plus the recorded pause after it (capped), and
records every answer.  The comparison helpers turn both sides into comparable forms:
ids, times and counters become placeholders; runs of per-step progress frames
collapse into one token so that one step more or less around an interrupt does not
matter.
"""
from __future__ import annotations

import difflib
import json
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
import websocket

TRANSCRIPTS = Path(__file__).resolve().parents[1] / "transcripts"


# -- frames ----------------------------------------------------------------------------
@dataclass
class Frame:
    """One server→client websocket frame (text message or decoded binary header)."""
    t: float                     # ms since the scenario started
    message: dict | None = None
    binary: dict | None = None

    @property
    def type(self) -> str:
        if self.message is not None:
            return self.message.get("type", "?")
        return f"binary{self.binary.get('event_type')}"

    @property
    def is_logs(self) -> bool:
        return self.type == "logs"

    @property
    def is_step(self) -> bool:
        """Per-step progress frames: their number varies with timing."""
        if self.binary is not None or self.type == "progress":
            return True
        if self.type == "progress_state":
            return any(n.get("state") == "running" and type(n.get("value")) is int
                       for n in self.message["data"]["nodes"].values())
        return False


def decode_binary(data: bytes) -> dict:
    event = struct.unpack(">I", data[:4])[0]
    out = {"length": len(data), "event_type": event}
    if event == 4:
        size = struct.unpack(">I", data[4:8])[0]
        out["metadata"] = json.loads(data[8:8 + size])
        out["image_magic_hex"] = data[8 + size:12 + size].hex()
    else:
        out["image_type_code"] = struct.unpack(">I", data[4:8])[0]
        out["image_magic_hex"] = data[8:12].hex()
    return out


# -- the recording ------------------------------------------------------------------------
@dataclass
class Transcript:
    name: str
    entries: list

    @classmethod
    def load(cls, name: str) -> "Transcript":
        return cls(name, json.loads((TRANSCRIPTS / name).read_text()))

    @property
    def actions(self) -> list[dict]:
        acts = [e for e in self.entries if e["dir"] == "http"
                or (e["dir"] == "ws" and e.get("event") in ("open", "sent", "client_close"))]
        return sorted(acts, key=lambda e: e["t_ms"])

    @property
    def frames(self) -> dict[str, list[Frame]]:
        out: dict[str, list[Frame]] = {}
        for e in self.entries:
            if e["dir"] == "ws" and e.get("event") == "open":
                out.setdefault(e["conn"], [])
            if e["dir"] == "ws" and "kind" in e:
                out.setdefault(e["conn"], []).append(
                    Frame(e["t_ms"], e.get("message"), e.get("binary") if e["kind"] == "binary" else None))
        return out

    @property
    def notes(self) -> list[dict]:
        return [e for e in self.entries if e["dir"] == "note"]


@dataclass
class Anchor:
    """Wait until `conn` has seen `stable` non-step frames and then `steps` step frames."""
    conn: str
    stable: int
    steps: int
    t: float
    label: str

    def reached(self, frames: list[Frame]) -> bool:
        stable = steps = 0
        for f in frames:
            if f.is_logs:
                continue
            if f.is_step:
                steps += 1
            else:
                stable += 1
                steps = 0
                if stable > self.stable:
                    return True
            if stable == self.stable and steps >= self.steps:
                return True
        return stable == self.stable and steps >= self.steps


def anchor_for(t: float, frames: dict[str, list[Frame]]) -> Anchor | None:
    best = None
    for conn, conn_frames in frames.items():
        stable = steps = 0
        for f in conn_frames:
            if f.t > t:
                break
            if f.is_logs:
                continue
            if f.is_step:
                steps += 1
            else:
                stable, steps = stable + 1, 0
            if best is None or f.t >= best.t:
                best = Anchor(conn, stable, steps, f.t, f"{conn}: {f.type} (stable #{stable} +{steps} step frames)")
    return best


# -- the live side --------------------------------------------------------------------------
class LiveConn:
    def __init__(self, url: str, t0: float, on_frame=None) -> None:
        self.t0 = t0
        self.frames: list[Frame] = []
        self.cond = threading.Condition()
        self.done = False
        self.on_frame = on_frame
        self.ws = websocket.create_connection(url, timeout=10, enable_multithread=True)
        self.ws.settimeout(None)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data()
            except Exception:  # noqa: BLE001 - closed either way
                break
            now = (time.monotonic() - self.t0) * 1000
            if opcode == websocket.ABNF.OPCODE_TEXT:
                frame = Frame(now, message=json.loads(data.decode()))
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                frame = Frame(now, binary=decode_binary(data))
            else:
                break
            with self.cond:
                self.frames.append(frame)
                self.cond.notify_all()
            if self.on_frame:
                self.on_frame(frame)
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait(self, anchor: Anchor, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: anchor.reached(self.frames) or self.done, timeout) \
                and anchor.reached(self.frames)

    def close(self) -> None:
        try:
            self.ws.close(timeout=2)
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(3)


@dataclass
class HttpResult:
    entry: dict            # the recorded exchange
    status: int
    headers: dict
    body: object           # parsed JSON, text, or bytes
    kind: str              # "json" | "text" | "bytes" | "empty"


@dataclass
class Replay:
    transcript: Transcript
    base_url: str
    cap_ms: float = 150.0          # longest recorded pause we sit through
    anchor_timeout: float = 20.0
    id_map: dict = field(default_factory=dict)     # recorded -> live: prompt ids, temp file name parts
    http: list[HttpResult] = field(default_factory=list)
    conns: dict[str, LiveConn] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    on_frame: object = None        # fn(conn_name, frame, replay) for scenario hooks

    def run(self) -> "Replay":
        t0 = time.monotonic()
        recorded = self.transcript.frames
        prev_end = 0.0
        try:
            for action in self.transcript.actions:
                anchor = anchor_for(action["t_ms"], recorded)
                if anchor is not None and anchor.conn in self.conns:
                    if not self.conns[anchor.conn].wait(anchor, self.anchor_timeout):
                        self.problems.append(f"{self.transcript.name}: never saw {anchor.label} before "
                                             f"{_describe(action)}")
                        break
                base = max(anchor.t if anchor else 0.0, prev_end)
                time.sleep(min(max(action["t_ms"] - base, 0.0), self.cap_ms) / 1000)
                self._do(action, t0)
                prev_end = action.get("t_end_ms", action["t_ms"])
        finally:
            for conn in self.conns.values():
                conn.close()
        return self

    def _do(self, action: dict, t0: float) -> None:
        if action["dir"] == "ws":
            name = action["conn"]
            if action["event"] == "open":
                query = urlsplit(action["url"]).query
                url = self.base_url.replace("http", "ws", 1) + "/ws" + (f"?{query}" if query else "")
                hook = (lambda f, n=name: self.on_frame(n, f, self)) if self.on_frame else None
                self.conns[name] = LiveConn(url, t0, hook)
            elif action["event"] == "sent":
                self.conns[name].ws.send(json.dumps(action["message"]))
            else:
                self.conns[name].close()
            return
        self.http.append(self.request(action))

    def _learn_names(self, recorded, live) -> None:
        """PreviewImage files carry a random part; map the recorded one to the live one."""
        if isinstance(recorded, str) and isinstance(live, str):
            a, b = TEMP_NAME.search(recorded), TEMP_NAME.search(live)
            if a and b:
                self.id_map.setdefault(a.group(0), b.group(0))
        elif isinstance(recorded, dict) and isinstance(live, dict):
            for k in recorded:
                if self.live_id(k) in live:
                    self._learn_names(recorded[k], live[self.live_id(k)])
        elif isinstance(recorded, list) and isinstance(live, list):
            for a, b in zip(recorded, live):
                self._learn_names(a, b)

    def live_id(self, value: str) -> str:
        for recorded, live in self.id_map.items():
            value = value.replace(recorded, live)
        return value

    def request(self, entry: dict) -> HttpResult:
        parts = urlsplit(entry["url"])
        url = self.base_url + self.live_id(parts.path) + ("?" + self.live_id(parts.query) if parts.query else "")
        body = entry.get("request_body")
        kwargs: dict = {}
        if isinstance(body, dict) and "multipart_files" in body:
            kwargs["data"] = body.get("multipart_form", {})
            kwargs["files"] = {name: (f["filename"], sample_png(f["bytes"]), f["content_type"])
                               for name, f in body["multipart_files"].items()}
        elif isinstance(body, str):
            kwargs["data"] = body.encode()
        elif body is not None:
            kwargs["data"] = json.dumps(_replace_ids(body, self.live_id))
            kwargs["headers"] = {"Content-Type": "application/json"}
        r = requests.request(entry["method"], url, timeout=15, **kwargs)
        ctype = r.headers.get("Content-Type", "")
        if not r.content:
            parsed, kind = "", "empty"
        elif "json" in ctype:
            parsed, kind = r.json(), "json"
        elif ctype.startswith("text/"):
            parsed, kind = r.text, "text"
        else:
            parsed, kind = r.content, "bytes"
        recorded_body = entry.get("body")
        self._learn_names(recorded_body, parsed)
        if entry["method"] == "POST" and parts.path.endswith("/prompt") and isinstance(recorded_body, dict) \
                and "prompt_id" in recorded_body and kind == "json" and "prompt_id" in parsed:
            self.id_map[recorded_body["prompt_id"]] = parsed["prompt_id"]
        return HttpResult(entry, r.status_code, dict(r.headers), parsed, kind)


TEMP_NAME = re.compile(r"ComfyUI_temp_[a-z]{5}_")


def _describe(action: dict) -> str:
    if action["dir"] == "http":
        return f"{action['method']} {urlsplit(action['url']).path} (t={action['t_ms']}ms)"
    return f"ws {action['conn']} {action['event']} (t={action['t_ms']}ms)"


def _replace_ids(value, fix):
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, list):
        return [_replace_ids(v, fix) for v in value]
    if isinstance(value, dict):
        return {fix(k): _replace_ids(v, fix) for k, v in value.items()}
    return value


def sample_png(size: int) -> bytes:
    """A valid PNG of exactly `size` bytes; equal sizes give equal bytes (the recorded
    upload scenario sends the same file twice, then a different one)."""
    from io import BytesIO

    from PIL import Image
    buf = BytesIO()
    Image.new("RGB", (1, 1), (size % 256, 7, 7)).save(buf, format="PNG")
    data = buf.getvalue()
    return data + b"\0" * max(0, size - len(data))


# -- making both sides comparable ------------------------------------------------------------
class Normalizer:
    """Replaces what legitimately differs between two servers with placeholders:
    prompt ids (numbered by submission), the `number` counter (kept relative to the
    scenario's first POST /prompt), PreviewImage's random file names, and the values
    of the keys in `placeholders` (key -> placeholder, chosen by the caller)."""

    def __init__(self, placeholders: dict[str, str]) -> None:
        self.placeholders = placeholders
        self.ids: dict[str, str] = {}
        self.number_base: float | None = None

    def add_prompt(self, prompt_id: str) -> None:
        self.ids.setdefault(prompt_id, f"<prompt#{len(self.ids)}>")

    def see_number(self, number, posts_before: int) -> None:
        if self.number_base is None and isinstance(number, (int, float)):
            self.number_base = abs(number) - posts_before

    def number(self, n):
        if not isinstance(n, (int, float)) or isinstance(n, bool) or self.number_base is None:
            return n
        return f"<n{'-' if n < 0 else '+'}{abs(n) - self.number_base:g}>"

    def __call__(self, value, key: str | None = None):
        if key in self.placeholders and value is not None:
            return self.placeholders[key]
        if isinstance(value, dict):
            return {self.text(k): self(v, k) for k, v in value.items()}
        if isinstance(value, list):
            if len(value) in (2, 5) and isinstance(value[1], str) and value[1] in self.ids:   # a queue item
                return [self.number(value[0])] + [self(v) for v in value[1:]]
            return [self(v) for v in value]
        if key in ("number", "priority"):
            return self.number(value)
        if isinstance(value, float):
            return f"{value!r}f"   # keep 1.0 and 1 apart: ComfyUI sends both
        if isinstance(value, str):
            return self.text(value)
        return value

    def text(self, s: str) -> str:
        for prompt_id, token in self.ids.items():
            if prompt_id in s:
                s = s.replace(prompt_id, token)
        return re.sub(r"ComfyUI_temp_[a-z]{5}_", "ComfyUI_temp_<rnd>_", s)


UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def shape(value):
    """Keys and types only (for bodies whose values depend on the whole server run);
    a dict keyed by prompt ids is one entry's shape."""
    if isinstance(value, dict):
        if value and all(UUID.match(k) for k in value):
            return {"<prompt id>": shape(next(iter(value.values())))}
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def keys_only(value):
    """Dict keys only: values, their types and list lengths may all differ."""
    if isinstance(value, dict):
        return {k: keys_only(v) for k, v in value.items()}
    return "list" if isinstance(value, list) else "value"


def differences(expected, actual, path: str = "$") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        if list(expected) != list(actual):
            missing = [k for k in expected if k not in actual]
            extra = [k for k in actual if k not in expected]
            if missing or extra:
                out.append(f"{path}: keys differ (missing {missing}, unexpected {extra})")
            else:
                out.append(f"{path}: key order differs ({list(expected)} vs {list(actual)})")
        for k in expected:
            if k in actual:
                out += differences(expected[k], actual[k], f"{path}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items expected, got {len(actual)}: "
                    f"{_short(expected)} vs {_short(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: expected {_short(expected)}, got {_short(actual)}"]
    return []


def _short(value, limit: int = 160) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


# -- websocket streams as tokens ----------------------------------------------------------------
@dataclass
class Token:
    kind: str                 # message type, or "STEPS" for a collapsed run
    data: object              # normalized payload (or the run's summary)

    def __str__(self) -> str:
        return f"{self.kind} {_short(self.data, 220)}"


def tokens(frames: list[Frame], norm: Normalizer) -> list[Token]:
    out: list[Token] = []
    run: list[Frame] = []

    def flush():
        if not run:
            return
        groups, current = set(), []
        maxima = set()
        for f in run:
            if f.type == "progress_state" and current:
                groups.add(tuple(current))
                current = []
            current.append(f.type)
            if f.type == "progress":
                maxima.add((f.message["data"]["node"], f.message["data"]["max"]))
            if f.binary is not None:
                maxima.add(("binary-meta", json.dumps(norm(_binary_summary(f.binary)), sort_keys=True)))
        groups.add(tuple(current))
        out.append(Token("STEPS", {"groups": sorted(groups), "node_max": sorted(maxima)}))
        run.clear()

    for f in frames:
        if f.is_logs:
            continue
        if f.is_step:
            run.append(f)
            continue
        flush()
        out.append(Token(f.type, norm(f.message.get("data"))))
    flush()
    return out


def _binary_summary(binary: dict) -> dict:
    keep = {"event_type": binary["event_type"], "image_magic_hex": binary.get("image_magic_hex")}
    if "metadata" in binary:
        keep["metadata"] = binary["metadata"]
    if "image_type_code" in binary:
        keep["image_type_code"] = binary["image_type_code"]
    return keep


def compare_streams(expected: list[Token], actual: list[Token]) -> str | None:
    """None when equal; else a readable report of the first difference.  A progress
    run right before execution_interrupted may be present on one side only."""
    def drop_optional(seq):
        return [t for i, t in enumerate(seq)
                if not (t.kind == "STEPS" and i + 1 < len(seq) and seq[i + 1].kind == "execution_interrupted")]

    for exp, act in ((expected, actual), (drop_optional(expected), drop_optional(actual))):
        mismatch = _first_mismatch(exp, act)
        if mismatch is None:
            return None
    index, detail = mismatch
    context = "\n".join(difflib.unified_diff([str(t) for t in exp], [str(t) for t in act],
                                             "recorded", "simulator", lineterm="", n=2))
    return f"message #{index}: {detail}\n{context}"


def _first_mismatch(expected: list[Token], actual: list[Token]):
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.kind != a.kind:
            return i, f"expected {e.kind}, got {a.kind}"
        diffs = differences(e.data, a.data, f"{e.kind}.data")
        if diffs:
            return i, "; ".join(diffs[:4])
    if len(expected) != len(actual):
        i = min(len(expected), len(actual))
        extra = expected[i:] if len(expected) > len(actual) else actual[i:]
        return i, (f"{len(expected)} messages recorded, {len(actual)} received; first unmatched: {extra[0]}")
    return None


def log_lines(frames: list[Frame]) -> list[str]:
    """The log text pushed to a socket, line kinds only (numbers and tracebacks vary)."""
    lines = []
    for f in frames:
        if not f.is_logs:
            continue
        for entry in f.message["data"]["entries"]:
            lines.append(normalize_log(entry["m"]))
    return lines


def normalize_log(m: str) -> str:
    m = re.sub(r"Prompt executed in [\d.]+ seconds", "Prompt executed in <n> seconds", m)
    if m.startswith("Traceback (most recent call last):"):
        last = [line for line in m.splitlines() if line.strip()][-1]
        return f"Traceback … {last}"
    return m


def log_sizes(frames: list[Frame]) -> list[str]:
    return [type(f.message["data"]["size"]).__name__ for f in frames if f.is_logs]
