"""The websocket reader thread and the per-prompt watches it feeds.

One `_Reader` thread per client owns the socket. It connects (``clientId`` = the
client's id), demultiplexes text frames by ``prompt_id`` into `_Watch` objects, and
reconnects with exponential backoff when the socket drops or stalls. Whenever it cannot
be sure it saw everything for a watched prompt (a disconnect, a stall, a finish signal
without an outcome) it marks the watch *dirty* and resolves it over HTTP:

* ``/queue`` lists it (running or pending) → it is alive; live events continue;
* ``/history/{id}`` has it → the outcome is settled from there (success, or error vs
  interrupt told apart by the last ``status.messages`` entry);
* neither → ComfyUI lost it (restart): the watch fails with `ComfyPromptLost`.

A watch that cannot be resolved because ComfyUI does not answer for longer than
``unreachable_deadline`` fails with `ComfyUnreachable`.
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Optional

import websocket

from ._http import Http
from .errors import ComfyError, ComfyPromptLost, ComfyUnreachable
from .models import (
    TERMINAL_TYPES,
    Cached,
    Event,
    Executed,
    Executing,
    Failed,
    HistoryEntry,
    Interrupted,
    LogEntry,
    Preview,
    Progress,
    QueueState,
    Started,
    Succeeded,
)

log = logging.getLogger("workers.comfy")

_FINISHED_KEEP = 256  # finished watches nobody consumed are kept this long (oldest dropped)
_HISTORY_GRACE = 3.0  # s: a "finished" signal with no history entry yet is retried this long


class _Watch:
    """Interest in one prompt: buffered events plus what is known about its state."""

    def __init__(self, prompt_id: str, *, submitted: bool, max_events: int):
        self.prompt_id = prompt_id
        self.cond = threading.Condition()
        self.events: deque[Event] = deque()
        self.max_events = max_events
        self.dropped = 0
        self.terminal: Optional[Event] = None
        self.error: Optional[ComfyError] = None
        self.submitted = submitted          # POST /prompt acknowledged (or attached to an existing prompt)
        self.dirty = submitted              # state unknown: resolve over HTTP
        self.gap = False                    # some messages may have been missed (disconnect/stall)
        self.grace_until = 0.0
        self.trouble_since = time.monotonic()
        self.registered_gen = -1
        self.outputs: dict[str, dict[str, Any]] = {}
        self.cached_nodes: list[str] = []
        self.success_seen = False
        self.cancel_requested = False
        self.started = False                # execution_start seen: ComfyUI runs it (or ran it)
        self.last_node: Optional[str] = None
        self.finished_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.terminal is not None or self.error is not None

    def push(self, ev: Event) -> None:
        with self.cond:
            if self.finished:
                return
            if len(self.events) >= self.max_events and not isinstance(ev, TERMINAL_TYPES):
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("prompt %s: consumer is not reading events; dropped %d", self.prompt_id, self.dropped)
                return
            self.events.append(ev)
            self.cond.notify_all()

    def finish(self, terminal: Optional[Event] = None, error: Optional[ComfyError] = None) -> bool:
        with self.cond:
            if self.finished:
                return False
            if terminal is not None:
                self.terminal = terminal
                self.events.append(terminal)
            else:
                self.error = error
            self.dirty = False
            self.finished_at = time.monotonic()
            self.cond.notify_all()
            return True

    def next(self, timeout: Optional[float]) -> Optional[Event]:
        """Next event (the terminal one last); raises the watch's error once events are drained;
        None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                if self.events:
                    return self.events.popleft()
                if self.error is not None:
                    raise self.error
                if self.terminal is not None:  # already handed out
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.cond.wait(remaining if remaining is not None else 1.0)


class _Reader(threading.Thread):
    def __init__(self, *, http: Http, ws_url: str, client_id: str, headers: dict[str, str],
                 connect_timeout: float, stall_timeout: float, unreachable_deadline: float,
                 backoff_initial: float, backoff_max: float, poll_interval: float, previews: bool,
                 max_events: int, on_log: Optional[Callable[[LogEntry], None]], log_buffer: int,
                 ping_interval: float = 20.0):
        super().__init__(name=f"comfy-ws-{client_id[:8]}", daemon=True)
        self.http = http
        self.ws_url = f"{ws_url}?clientId={client_id}"
        self.client_id = client_id
        self.headers = headers
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.unreachable_deadline = unreachable_deadline
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.poll_interval = poll_interval
        self.previews = previews
        self.max_events = max_events
        self.ping_interval = ping_interval
        self.last_ping = 0.0

        self.lock = threading.RLock()
        self.watches: "OrderedDict[str, _Watch]" = OrderedDict()
        self.connected = threading.Event()
        self.stop_event = threading.Event()
        self.wake = threading.Event()

        self.ws: Optional[websocket.WebSocket] = None
        self.gen = 0                      # bumped on every successful connect
        self.reconnects = 0               # connects after the first
        self.stalls = 0
        self.last_frame = time.monotonic()
        self.activity = time.monotonic()  # last submit/attach: the stall clock starts no earlier
        self.down_since: Optional[float] = None
        self.last_error: Optional[str] = None
        self.backoff = backoff_initial
        self.next_resolve = 0.0
        self.running_pid: Optional[str] = None
        self.server_features: dict[str, Any] = {}

        self.logs_enabled = False
        self.on_log = on_log
        self.log_buffer: deque[LogEntry] = deque(maxlen=log_buffer)

    # ------------------------------------------------------------ watch registry (any thread)
    def watch(self, prompt_id: str, *, submitted: bool) -> tuple[_Watch, bool]:
        """Get or create the watch for `prompt_id`. Returns (watch, created)."""
        with self.lock:
            w = self.watches.get(prompt_id)
            if w is not None:
                return w, False
            w = _Watch(prompt_id, submitted=submitted, max_events=self.max_events)
            w.registered_gen = self.gen if self.connected.is_set() else -1
            w.gap = submitted  # attached to an existing prompt: earlier messages were not seen
            self.watches[prompt_id] = w
            self.activity = time.monotonic()
            self._evict_finished()
        self.wake.set()
        return w, True

    def mark_submitted(self, w: _Watch) -> None:
        with self.lock:
            w.submitted = True
            w.trouble_since = time.monotonic()
            self.activity = time.monotonic()
            # A reconnect between registration and the POST's answer may have lost messages.
            if w.registered_gen != self.gen or not self.connected.is_set():
                w.dirty = True
                w.gap = True
        self.wake.set()

    def mark_dirty(self, w: _Watch, grace: float = 0.0) -> None:
        with self.lock:
            if not w.finished:
                w.dirty = True
                w.trouble_since = time.monotonic()
                if grace:
                    w.grace_until = time.monotonic() + grace
        self.wake.set()

    def rekey(self, w: _Watch, new_id: str) -> None:
        with self.lock:
            self.watches.pop(w.prompt_id, None)
            w.prompt_id = new_id
            self.watches[new_id] = w
            w.dirty = True
            w.gap = True

    def forget(self, prompt_id: str, w: Optional[_Watch] = None) -> None:
        with self.lock:
            cur = self.watches.get(prompt_id)
            if cur is not None and (w is None or cur is w):
                del self.watches[prompt_id]

    def _evict_finished(self) -> None:
        finished = [pid for pid, w in self.watches.items() if w.finished]
        for pid in finished[: max(0, len(finished) - _FINISHED_KEEP)]:
            del self.watches[pid]

    def _unfinished(self) -> list[_Watch]:
        with self.lock:
            return [w for w in self.watches.values() if w.submitted and not w.finished]

    # ------------------------------------------------------------ lifecycle
    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        log.debug("comfy reader started for %s", self.ws_url)
        try:
            while not self.stop_event.is_set():
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - the reader must survive anything
                    log.exception("comfy reader: unexpected error (continuing)")
                    self._drop_ws("internal error")
                    self.stop_event.wait(0.5)
        finally:
            self._close_ws()
            for w in self._unfinished():
                w.finish(error=ComfyUnreachable("client closed while waiting", prompt_id=w.prompt_id))
            log.debug("comfy reader stopped")

    def _step(self) -> None:
        if self.ws is None:
            self.wake.clear()  # before trying: a wake-up during the attempt cuts the backoff sleep short
            if not self._connect():
                self._resolve_dirty()
                self._check_deadlines()
                self.wake.wait(self.backoff)
                self.backoff = min(self.backoff * 2, self.backoff_max)
                return
        self._resolve_dirty()
        self._check_deadlines()
        self._recv_one()

    # ------------------------------------------------------------ socket
    def _connect(self) -> bool:
        try:
            ws = websocket.create_connection(self.ws_url, timeout=self.connect_timeout,
                                             header=[f"{k}: {v}" for k, v in self.headers.items()],
                                             enable_multithread=True)
        except Exception as exc:  # noqa: BLE001 - refused, DNS, handshake status, timeout...
            self._note_down(f"websocket connect failed: {exc!r}")
            return False
        try:
            if self.previews:
                ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            ws.settimeout(self.poll_interval)
        except Exception as exc:  # noqa: BLE001
            _quiet_close(ws)
            self._note_down(f"websocket setup failed: {exc!r}")
            return False
        with self.lock:
            self.ws = ws
            first = self.gen == 0
            self.gen += 1
            if not first:
                self.reconnects += 1
            now = time.monotonic()
            self.last_frame = now
            was_down = self.down_since
            self.down_since = None
            self.backoff = self.backoff_initial
            self.next_resolve = 0.0  # settle before reading: frames wait in the socket meanwhile
            # Anything unfinished may have missed messages while we were not connected.
            for w in self.watches.values():
                if w.submitted and not w.finished:
                    w.dirty = True
                    w.gap = True
        if self.logs_enabled:  # the server dropped the subscription with the old socket
            self._resubscribe_logs()
        self.connected.set()  # only now: a submit waiting for the socket must find the logs flowing
        if not first:
            log.info("comfy websocket reconnected (%s, reconnect #%d)", self.ws_url, self.reconnects)
        elif was_down is not None:
            log.info("comfy websocket connected (%s) after %.1fs", self.ws_url, time.monotonic() - was_down)
        else:
            log.debug("comfy websocket connected (%s)", self.ws_url)
        return True

    def _note_down(self, why: str) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("comfy: %s; retrying with backoff", why)
        else:
            log.debug("comfy: %s", why)
        self.last_error = why

    def _drop_ws(self, why: str, graceful: bool = False) -> None:
        with self.lock:
            ws, self.ws = self.ws, None
            self.connected.clear()
            if ws is not None:
                now = time.monotonic()
                for w in self.watches.values():
                    if w.submitted and not w.finished:
                        w.dirty = True
                        w.gap = True
                        w.trouble_since = now
        if ws is not None:
            # ComfyUI unregisters a clientId when the handler of ANY socket of that id ends, even
            # if a newer socket of the same id registered meanwhile (which then receives nothing).
            # So close gracefully when we are the ones closing, and give the server a moment to
            # finish with the old socket before the same clientId reconnects.
            if graceful:
                try:
                    ws.close(timeout=0.5)
                except Exception:  # noqa: BLE001
                    _quiet_close(ws)
            else:
                _quiet_close(ws)
            self._note_down(f"websocket lost ({why})")
            self.stop_event.wait(self.backoff_initial)

    def _close_ws(self) -> None:
        with self.lock:
            ws, self.ws = self.ws, None
            self.connected.clear()
        if ws is not None:
            try:
                ws.close(timeout=0.5)
            except Exception:  # noqa: BLE001
                _quiet_close(ws)

    def _recv_one(self) -> None:
        ws = self.ws
        try:
            opcode, data = ws.recv_data()
        except websocket.WebSocketTimeoutException:
            self._keepalive()
            self._check_stall()
            return
        except (websocket.WebSocketConnectionClosedException, OSError, websocket.WebSocketException) as exc:
            self._drop_ws(f"{type(exc).__name__}: {exc}")
            return
        self.last_frame = time.monotonic()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            try:
                msg = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
            except ValueError:
                log.debug("comfy: ignoring a non-JSON text frame")
                return
            if isinstance(msg, dict):
                self._on_message(msg)
        elif opcode == websocket.ABNF.OPCODE_BINARY:
            self._on_binary(bytes(data))
        elif opcode == websocket.ABNF.OPCODE_CLOSE:
            self._drop_ws("server closed the websocket")

    def _keepalive(self) -> None:
        """Ping a quiet socket now and then, so proxies in front of ComfyUI keep it open.
        (Pongs are not data frames: they do not reset the stall clock.)"""
        now = time.monotonic()
        if self.ping_interval <= 0 or now - max(self.last_frame, self.last_ping) < self.ping_interval:
            return
        self.last_ping = now
        try:
            self.ws.ping()
        except Exception as exc:  # noqa: BLE001
            self._drop_ws(f"ping failed: {exc!r}")

    def _check_stall(self) -> None:
        if self.stall_timeout <= 0:
            return
        unfinished = self._unfinished()
        if not unfinished:
            return
        silent = time.monotonic() - max(self.last_frame, self.activity)
        if silent > self.stall_timeout:
            self.stalls += 1
            log.warning("comfy websocket silent for %.1fs while %d prompt(s) are unfinished: reconnecting",
                        silent, len(unfinished))
            self._drop_ws("stalled", graceful=True)  # the next step reconnects (backoff applies to failures)

    # ------------------------------------------------------------ messages
    def _on_message(self, msg: dict[str, Any]) -> None:
        mtype = msg.get("type")
        data = msg.get("data")
        if not isinstance(data, dict):
            data = {}
        if mtype == "status":
            return
        if mtype == "logs":
            self._on_logs(data)
            return
        if mtype == "feature_flags":
            self.server_features = data
            return

        pid = data.get("prompt_id")
        replayed = False
        if mtype == "executing" and pid is None and data.get("node") is not None:
            # Replay to a reconnecting socket: no prompt_id. Attribute it to the prompt we know runs.
            pid, replayed = self.running_pid, True
        if not isinstance(pid, str):
            return

        if mtype == "execution_start":
            self.running_pid = pid
        elif mtype in ("execution_success", "execution_error", "execution_interrupted") or (
                mtype == "executing" and data.get("node") is None):
            if self.running_pid == pid:
                self.running_pid = None

        with self.lock:
            w = self.watches.get(pid)
        if w is None or w.finished:
            return  # nobody waits for this prompt: drop it (no unbounded buffering)

        if mtype == "execution_start":
            w.started = True
            w.push(Started(pid, data.get("timestamp")))
        elif mtype == "execution_cached":
            nodes = [str(n) for n in data.get("nodes") or []]
            w.cached_nodes = nodes
            w.push(Cached(pid, nodes))
        elif mtype == "executing":
            node = data.get("node")
            if node is None:
                self._on_done_signal(w)
            else:
                w.last_node = str(node)
                w.push(Executing(pid, str(node), data.get("display_node", node if replayed else None), replayed))
        elif mtype == "progress":
            node = data.get("node")
            w.push(Progress(pid, None if node is None else str(node), _int(data.get("value")), _int(data.get("max"))))
        elif mtype == "executed":
            node = str(data.get("node"))
            output = data.get("output") if isinstance(data.get("output"), dict) else {}
            _merge_output(w.outputs, node, output)
            w.push(Executed(pid, node, data.get("display_node"), output))
        elif mtype == "execution_success":
            w.success_seen = True
            if w.gap:
                # Executed messages may have been missed: take outputs from history once written.
                self.mark_dirty(w, grace=_HISTORY_GRACE)
            else:
                w.finish(Succeeded(pid, outputs=dict(w.outputs), source="ws"))
        elif mtype == "execution_error":
            w.finish(Failed(pid, node_id=_str(data.get("node_id")), node_type=data.get("node_type"),
                            exception_type=data.get("exception_type"),
                            exception_message=data.get("exception_message"),
                            traceback=list(data.get("traceback") or []),
                            executed=[str(x) for x in data.get("executed") or []],
                            current_inputs=data.get("current_inputs") or {}, source="ws"))
        elif mtype == "execution_interrupted":
            w.finish(Interrupted(pid, node_id=_str(data.get("node_id")), node_type=data.get("node_type"),
                                 executed=[str(x) for x in data.get("executed") or []], source="ws"))
        # progress_state and unknown types: ignored

    def _on_done_signal(self, w: _Watch) -> None:
        """`executing {node: null}` without an outcome seen: history is written by now; settle from it."""
        self.mark_dirty(w, grace=_HISTORY_GRACE)
        self.next_resolve = 0.0

    def _on_binary(self, data: bytes) -> None:
        if not self.previews or len(data) < 8:
            return
        try:
            (event_type,) = struct.unpack(">I", data[:4])
            if event_type == 1:  # legacy preview: [type][format][image]; not tagged: the running prompt
                (fmt,) = struct.unpack(">I", data[4:8])
                pid, node, image_type, image = self.running_pid, None, "image/png" if fmt == 2 else "image/jpeg", data[8:]
            elif event_type == 4:  # [type][meta len][meta json][image]
                (mlen,) = struct.unpack(">I", data[4:8])
                meta = json.loads(data[8:8 + mlen].decode("utf-8"))
                pid, node = meta.get("prompt_id"), meta.get("node_id")
                image_type, image = meta.get("image_type", "image/jpeg"), data[8 + mlen:]
            else:
                return
        except (struct.error, ValueError, UnicodeDecodeError, AttributeError):
            log.debug("comfy: ignoring a malformed binary frame")
            return
        if not pid:
            return
        with self.lock:
            w = self.watches.get(pid)
        if w is not None and not w.finished:
            w.push(Preview(pid, node if node is not None else w.last_node, image_type, image))

    # ------------------------------------------------------------ logs
    def _on_logs(self, data: dict[str, Any]) -> None:
        for e in data.get("entries") or []:
            if not isinstance(e, dict):
                continue
            entry = LogEntry(t=str(e.get("t", "")), m=str(e.get("m", "")))
            cb = self.on_log
            if cb is not None:
                try:
                    cb(entry)
                except Exception:  # noqa: BLE001 - a bad callback must not kill the reader
                    log.exception("comfy: on_log callback failed")
            else:
                self.log_buffer.append(entry)

    def _resubscribe_logs(self) -> None:
        try:
            r = self.http.request("PATCH", "/internal/logs/subscribe",
                                  json_body={"clientId": self.client_id, "enabled": True})
            if r.status_code != 200:
                log.warning("comfy: re-subscribing to logs answered HTTP %s", r.status_code)
        except ComfyError as exc:
            log.warning("comfy: re-subscribing to logs failed: %s", exc)

    # ------------------------------------------------------------ settling over HTTP
    def _resolve_dirty(self) -> None:
        now = time.monotonic()
        if now < self.next_resolve:
            return
        with self.lock:
            dirty = [w for w in self.watches.values() if w.dirty and w.submitted and not w.finished]
        if not dirty:
            return
        ws_up = self.ws is not None
        gen = self.gen
        try:
            q = self.http.queue_state()
            self._note_running(q)
            for w in dirty:
                self._resolve_one(w, q, ws_up and gen == self.gen)
            self.next_resolve = 0.0 if not ws_up else now + 0.05
        except ComfyError as exc:
            log.debug("comfy: resolving %d prompt(s) failed: %s", len(dirty), exc)
            self.last_error = str(exc)
            self.next_resolve = time.monotonic() + min(max(self.backoff, 0.2), self.backoff_max)
            return
        if not ws_up:
            # Without a socket, poll: a job finishing during a websocket outage still settles.
            self.next_resolve = time.monotonic() + min(max(self.backoff, 0.2), 2.0)

    def _note_running(self, q: QueueState) -> None:
        running = q.running_ids()
        self.running_pid = running[0] if running else None

    def _resolve_one(self, w: _Watch, q: QueueState, live: bool) -> None:
        pid = w.prompt_id
        now = time.monotonic()
        if pid in q.running_ids():
            w.started = True
        if q.contains(pid) and not w.success_seen:
            w.trouble_since = now
            if live:
                with self.lock:
                    w.dirty = False
            return
        entry: Optional[HistoryEntry] = self.http.history_entry(pid)
        if entry is None:
            # It may have finished between the two calls on a server that is not atomic about it.
            q2 = self.http.queue_state()
            if q2.contains(pid) and not w.success_seen:
                w.trouble_since = now
                if live:
                    with self.lock:
                        w.dirty = False
                return
            entry = self.http.history_entry(pid)
        w.trouble_since = now
        if entry is not None:
            ev = entry.terminal_event()
            if isinstance(ev, Succeeded) and not w.gap and w.outputs and not ev.outputs:
                ev = Succeeded(pid, outputs=dict(w.outputs), source="history")
            if w.finish(ev):
                log.info("comfy: prompt %s settled from /history: %s", pid, type(ev).__name__)
            return
        if now < w.grace_until:
            return  # told it finished; history not written yet: retry shortly
        if w.success_seen:
            # ComfyUI said success but keeps no history (cleared meanwhile?): trust what was seen.
            log.warning("comfy: prompt %s succeeded but /history has no entry; using the streamed outputs", pid)
            w.finish(Succeeded(pid, outputs=dict(w.outputs), source="ws"))
            return
        if w.cancel_requested:
            w.finish(Interrupted(pid, source="cancel", deleted=True))
            return
        if w.finish(error=ComfyPromptLost(
                "ComfyUI no longer knows this prompt (not queued, not running, not in history): "
                "it probably restarted", prompt_id=pid)):
            log.warning("comfy: prompt %s is lost (not in /queue nor /history)", pid)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in self._unfinished():
            if w.dirty and now - w.trouble_since > self.unreachable_deadline:
                why = self.last_error or "no answer"
                if w.finish(error=ComfyUnreachable(
                        f"ComfyUI unreachable for more than {self.unreachable_deadline:g}s while waiting "
                        f"for the prompt", prompt_id=w.prompt_id, details={"last_error": why[:500]})):
                    log.warning("comfy: giving up on prompt %s: unreachable", w.prompt_id)


def _merge_output(acc: dict[str, dict[str, Any]], node: str, output: dict[str, Any]) -> None:
    cur = acc.setdefault(node, {})
    for key, value in output.items():
        if isinstance(value, list) and isinstance(cur.get(key), list):
            cur[key] = cur[key] + value
        else:
            cur[key] = value


def _quiet_close(ws: websocket.WebSocket) -> None:
    try:
        ws.shutdown()
    except Exception:  # noqa: BLE001
        pass


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _str(v: Any) -> Optional[str]:
    return None if v is None else str(v)
