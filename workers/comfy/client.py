"""`ComfyClient`: the one place this project talks to ComfyUI. Design: see `workers.comfy_client`."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

from ._http import Http, normalize_base_url, ws_url_for
from ._stream import _Reader, _Watch
from .errors import (
    ComfyError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyPromptLost,
    ComfyProtocolError,
    ComfyTimeout,
    ComfyUnreachable,
    ComfyValidationError,
    ComfyWaitTimeout,
)
from .models import (
    TERMINAL_TYPES,
    Cached,
    CancelOutcome,
    Event,
    Failed,
    HistoryEntry,
    Interrupted,
    LogEntry,
    NodeInfo,
    OutputFile,
    QueueState,
    RunResult,
    Submission,
    Succeeded,
    SystemStats,
)

log = logging.getLogger("workers.comfy")
_PARALLEL_DOWNLOADS = 4  # /view downloads at once: the HTTP pool keeps 4 sessions


class ComfyClient:
    """Client for one ComfyUI server. Thread-safe for one worker using it from 1–2 threads.

    Parameters (all times in seconds):
      base_url: ``http(s)://host:port`` with an optional path prefix (``.../api``).
      client_id: the websocket ``clientId``; keep it stable per worker so a restarted worker
        can re-attach to its prompts with ``events()``/``wait()``. Default: a random id.
      connect_timeout / read_timeout: per HTTP call (and the websocket handshake);
        ``timeout`` sets both at once (read = timeout, connect = min(connect, timeout));
        download_timeout: read timeout of ``/view`` downloads.
      submit_wait: how long ``submit()`` waits for ComfyUI to become reachable (websocket
        connected, ``POST /prompt`` not refused) before raising `ComfyUnreachable`.
      stall_timeout: no websocket frame for this long while a watched prompt is unfinished →
        reconnect and settle over HTTP (``0`` disables).
      unreachable_deadline: a watched prompt whose state cannot be learnt for this long
        (socket down and HTTP failing) fails with `ComfyUnreachable`.
      backoff_initial / backoff_max: reconnect backoff (doubles per failure).
      ping_interval: ping a quiet websocket this often (keeps proxies from closing it; 0: never).
      previews: deliver binary preview frames as `Preview` events (negotiates the
        ``supports_preview_metadata`` feature so frames carry their prompt id).
      headers: extra HTTP/websocket headers (e.g. an auth token of a proxy).
      on_log: callback for log lines after ``subscribe_logs()`` (called on the reader
        thread); without it they are buffered (``log_buffer`` lines) for ``drain_logs()``.
    """

    def __init__(self, base_url: str, *, client_id: Optional[str] = None, connect_timeout: float = 5.0,
                 read_timeout: float = 30.0, download_timeout: float = 120.0, submit_wait: float = 30.0,
                 stall_timeout: float = 60.0, unreachable_deadline: float = 120.0, backoff_initial: float = 0.25,
                 backoff_max: float = 5.0, poll_interval: float = 0.2, previews: bool = False,
                 headers: Optional[dict[str, str]] = None, on_log: Optional[Callable[[LogEntry], None]] = None,
                 log_buffer: int = 5000, max_buffered_events: int = 10000, timeout: Optional[float] = None,
                 ping_interval: float = 20.0):
        if timeout is not None:  # one figure "per HTTP call": the read timeout, and caps the connect timeout
            read_timeout = timeout
            connect_timeout = min(connect_timeout, timeout)
        self.base_url = normalize_base_url(base_url)
        self.ws_url = ws_url_for(self.base_url)
        self.client_id = client_id or uuid.uuid4().hex
        self.download_timeout = download_timeout
        self.submit_wait = submit_wait
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._headers = dict(headers or {})
        self._http = Http(self.base_url, connect_timeout=connect_timeout, read_timeout=read_timeout,
                          headers=self._headers)
        self._reader = _Reader(
            http=Http(self.base_url, connect_timeout=connect_timeout, read_timeout=min(read_timeout, 10.0),
                      headers=self._headers),
            ws_url=self.ws_url, client_id=self.client_id, headers=self._headers, connect_timeout=connect_timeout,
            stall_timeout=stall_timeout, unreachable_deadline=unreachable_deadline, backoff_initial=backoff_initial,
            backoff_max=backoff_max, poll_interval=poll_interval, previews=previews,
            max_events=max_buffered_events, on_log=on_log, log_buffer=log_buffer, ping_interval=ping_interval)
        self._start_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ComfyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader thread, close the socket and the HTTP session. Idempotent."""
        self._closed = True
        self._reader.stop()
        self._reader.http.close()
        self._http.close()

    def _start(self) -> None:
        if self._closed:
            raise ComfyError("the ComfyClient is closed")
        if not self._reader.is_alive():
            with self._start_lock:
                if not self._reader.is_alive() and not self._reader.stop_event.is_set():
                    self._reader.start()

    def connect(self, timeout: Optional[float] = None) -> None:
        """Start the reader and wait until the websocket is connected (else `ComfyUnreachable`)."""
        self._start()
        self._reader.wake.set()  # skip what is left of a reconnect backoff
        timeout = self.submit_wait if timeout is None else timeout
        if not self._reader.connected.wait(timeout):
            raise ComfyUnreachable(f"ComfyUI websocket at {self.ws_url} not connected within {timeout:g}s"
                                   f" ({self._reader.last_error or 'no answer'})",
                                   details={"ws_url": self.ws_url, "last_error": self._reader.last_error})

    def wake(self) -> None:
        """ComfyUI answers again (its caller saw it over HTTP): a reader waiting out a reconnect
        backoff (up to ``backoff_max``) tries at once, so a submit waiting on it goes on now."""
        self._reader.wake.set()

    @property
    def connected(self) -> bool:
        return self._reader.connected.is_set()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for health/metrics: reconnects, detected stalls, watched prompts."""
        r = self._reader
        with r.lock:
            watched = sum(1 for w in r.watches.values() if not w.finished)
        return {"connected": self.connected, "reconnects": r.reconnects, "stalls": r.stalls,
                "watched": watched, "last_error": r.last_error}

    # ------------------------------------------------------------------ submit
    def submit(self, workflow: dict[str, Any], client_id: Optional[str] = None, prompt_id: Optional[str] = None,
               extra_data: Optional[dict[str, Any]] = None, front: bool = False) -> Submission:
        """Queue a workflow (API format). Returns once ComfyUI accepted it.

        Policy when ComfyUI is not reachable: wait up to ``submit_wait`` for the websocket
        and retry ``POST /prompt`` while it is refused (the request never arrived); then raise
        `ComfyUnreachable`. When the POST may have arrived (timeout/reset after sending), the
        prompt id is looked up in ``/queue`` and ``/history`` instead of posting twice.
        Raises `ComfyValidationError` on 400 (a 200 with node_errors is returned, not raised).
        """
        cid = client_id or self.client_id
        pid = prompt_id or str(uuid.uuid4())
        deadline = time.monotonic() + self.submit_wait
        self.connect(self.submit_wait)  # lifecycle events only reach the submitting clientId's socket

        w, created = self._reader.watch(pid, submitted=False)
        if not created:
            if w.finished or w.submitted:  # an id re-used for a new run: start a fresh watch
                self._reader.forget(pid, w)
                w, _ = self._reader.watch(pid, submitted=False)
        body: dict[str, Any] = {"prompt": workflow, "client_id": cid, "prompt_id": pid}
        if extra_data:
            body["extra_data"] = extra_data
        if front:
            body["front"] = True
        try:
            sub = self._post_prompt(body, pid, deadline)
        except BaseException:
            self._reader.forget(pid, w)
            raise
        if sub.prompt_id != pid:  # a server that ignores caller-chosen ids
            log.warning("ComfyUI replaced prompt id %s by %s; settling it over HTTP", pid, sub.prompt_id)
            self._reader.rekey(w, sub.prompt_id)
        self._reader.mark_submitted(w)
        log.info("comfy: submitted prompt %s (number %s%s)", sub.prompt_id, sub.number,
                 f", node_errors for {sorted(sub.node_errors)}" if sub.node_errors else "")
        return sub

    def _post_prompt(self, body: dict[str, Any], pid: str, deadline: float) -> Submission:
        delay = self.backoff_initial
        while True:
            try:
                resp = self._http.request("POST", "/prompt", json_body=body, prompt_id=pid)
                break
            except ComfyUnreachable as exc:
                if exc.details.get("phase") == "connect" and not isinstance(exc, ComfyTimeout) \
                        and time.monotonic() + delay < deadline:
                    log.debug("comfy: POST /prompt refused, retrying in %.2fs", delay)
                    time.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                if exc.details.get("phase") == "connect":
                    raise
                # The request may have reached ComfyUI: look before anyone posts it again.
                found = self._find_submitted(pid)
                if found is not None:
                    log.warning("comfy: POST /prompt failed (%s) but ComfyUI has prompt %s", exc, pid)
                    return found
                raise
        if resp.status_code == 200:
            data = self._http.json_of(resp, "POST /prompt", pid)
            if not isinstance(data, dict) or not data.get("prompt_id"):
                raise ComfyProtocolError("POST /prompt: 200 without a prompt_id", status_code=200,
                                         body=resp.text, prompt_id=pid)
            return Submission(prompt_id=str(data["prompt_id"]), number=data.get("number"),
                              node_errors=data.get("node_errors") or {})
        data = None
        try:
            data = resp.json()
        except ValueError:
            pass
        if resp.status_code == 400 and isinstance(data, dict) and "error" in data:
            error = data.get("error")
            if not isinstance(error, dict):
                error = {"type": "invalid_prompt", "message": str(error), "details": "", "extra_info": {}}
            node_errors = data.get("node_errors") if isinstance(data.get("node_errors"), dict) else {}
            raise ComfyValidationError(error, node_errors, prompt_id=pid, status_code=400)
        raise ComfyProtocolError(f"POST /prompt: ComfyUI answered HTTP {resp.status_code}",
                                 status_code=resp.status_code, body=resp.text, prompt_id=pid)

    def _find_submitted(self, pid: str) -> Optional[Submission]:
        try:
            q = self._http.queue_state()
            for item in q.running + q.pending:
                if item.prompt_id == pid:
                    return Submission(pid, item.number, {})
            entry = self._http.history_entry(pid)
            if entry is not None:
                return Submission(pid, entry.number, {})
        except ComfyError:
            pass
        return None

    # ------------------------------------------------------------------ events / wait
    def events(self, prompt_id: str, timeout: Optional[float] = None) -> Iterator[Event]:
        """Typed events of one prompt, ending with its terminal event (`Succeeded`, `Failed`,
        `Interrupted`). Works for prompts submitted by this client (nothing is missed: interest
        was registered before the POST) and re-attaches to any other prompt id (its state is
        first settled over ``/queue`` and ``/history``). Raises `ComfyPromptLost`,
        `ComfyUnreachable`, or `ComfyWaitTimeout` after ``timeout``."""
        self._start()
        w, _ = self._reader.watch(prompt_id, submitted=True)
        return self._iter_watch(w, timeout)

    def _iter_watch(self, w: _Watch, timeout: Optional[float]) -> Iterator[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = w.next(remaining)
            except ComfyError:
                self._reader.forget(w.prompt_id, w)
                raise
            if ev is None:
                if w.terminal is not None:  # terminal handed to another consumer
                    self._reader.forget(w.prompt_id, w)
                    return
                raise ComfyWaitTimeout(f"prompt not finished within {timeout:g}s", prompt_id=w.prompt_id,
                                       details={"timeout": timeout})
            yield ev
            if isinstance(ev, TERMINAL_TYPES):
                self._reader.forget(w.prompt_id, w)
                return

    def wait(self, prompt_id: str, on_event: Optional[Callable[[Event], None]] = None,
             timeout: Optional[float] = None, *, raise_on_error: bool = True) -> RunResult:
        """Wait for the outcome. Returns a `RunResult`; raises `ComfyExecutionError` /
        `ComfyInterrupted` for those outcomes (unless ``raise_on_error=False``)."""
        last: Optional[Event] = None
        cached: list[str] = []
        for ev in self.events(prompt_id, timeout):
            if isinstance(ev, Cached):
                cached = ev.nodes
            if on_event is not None:
                on_event(ev)
            last = ev
        if isinstance(last, Succeeded):
            return RunResult(prompt_id, "success", outputs=last.outputs, cached_nodes=cached, source=last.source)
        if isinstance(last, Failed):
            result = RunResult(prompt_id, "error", outputs={}, error=last.payload(), cached_nodes=cached,
                               source=last.source)
            if raise_on_error:
                exc = ComfyExecutionError(prompt_id=prompt_id, node_id=last.node_id, node_type=last.node_type,
                                          exception_type=last.exception_type,
                                          exception_message=last.exception_message, traceback=last.traceback,
                                          executed=last.executed, current_inputs=last.current_inputs)
                exc.result = result
                raise exc
            return result
        if isinstance(last, Interrupted):
            result = RunResult(prompt_id, "interrupted", error=last.payload(), cached_nodes=cached,
                               source=last.source)
            if raise_on_error:
                exc = ComfyInterrupted(prompt_id=prompt_id, node_id=last.node_id, node_type=last.node_type,
                                       executed=last.executed, reason="deleted" if last.deleted else "interrupted")
                exc.result = result
                raise exc
            return result
        # The terminal event went to another consumer: settle from history.
        entry = self._history_retry(prompt_id, 2.0)
        if entry is None:
            raise ComfyPromptLost("prompt finished elsewhere and is not in history", prompt_id=prompt_id)
        ev = entry.terminal_event()
        return RunResult(prompt_id, entry.outcome, outputs=entry.outputs if entry.outcome == "success" else {},
                         error=None if isinstance(ev, Succeeded) else ev.payload(),
                         cached_nodes=entry.cached_nodes, source="history")

    def ended(self, prompt_id: str) -> bool:
        """The watched prompt's outcome (or its error) has arrived, though `events()` may not
        have handed it out yet: what comes before it is already history."""
        with self._reader.lock:
            w = self._reader.watches.get(prompt_id)
        return w is not None and w.finished

    def forget(self, prompt_id: str) -> None:
        """Stop watching a prompt (its buffered events are dropped)."""
        self._reader.forget(prompt_id)

    # ------------------------------------------------------------------ outputs
    def outputs(self, prompt_id: str, *, include_temp: bool = True, retry_for: float = 2.0,
                listed: Optional[dict[str, Any]] = None) -> list[OutputFile]:
        """Download every output file of every output node (any output key whose value is a list
        of ``{filename, subfolder, type}``: images, gifs, videos, audio, ...), in the order the
        nodes are listed. ``listed``: the outputs the prompt's `Succeeded` event carries (the
        ``executed`` messages seen live, cached nodes included, or its history entry's); when it
        names files, ``/history`` is not read again. Otherwise ``/history`` is read, retried for
        ``retry_for`` seconds when still empty (``execution_success`` is sent just before history
        is written). Several files are downloaded at once."""
        refs = list(output_refs(listed or {}))
        if not refs:
            entry = self._history_retry(prompt_id, retry_for)
            if entry is None:
                if self._http.queue_state().contains(prompt_id):
                    raise ComfyError("prompt has not finished yet", prompt_id=prompt_id)
                raise ComfyPromptLost("ComfyUI has no history for this prompt", prompt_id=prompt_id)
            refs = list(output_refs(entry.outputs))
        refs = [(node_id, kind, ref, str(ref.get("type") or "output")) for node_id, kind, ref in refs]
        refs = [r for r in refs if include_temp or r[3] != "temp"]

        def fetch(item: tuple[str, str, dict[str, Any], str]) -> OutputFile:
            node_id, kind, ref, ftype = item
            subfolder = str(ref.get("subfolder") or "")
            data, ctype = self.view(str(ref["filename"]), subfolder, ftype, prompt_id=prompt_id)
            return OutputFile(node_id=node_id, kind=kind, filename=str(ref["filename"]), subfolder=subfolder,
                              type=ftype, content_type=ctype, data=data)

        if len(refs) <= 1:
            return [fetch(r) for r in refs]
        # One connection each from the HTTP pool: a story's images arrive in about the time of one.
        with ThreadPoolExecutor(max_workers=min(len(refs), _PARALLEL_DOWNLOADS),
                                thread_name_prefix="comfy-view") as pool:
            return list(pool.map(fetch, refs))

    def view(self, filename: str, subfolder: str = "", type: str = "output", *,
             prompt_id: Optional[str] = None) -> tuple[bytes, str]:
        """``GET /view``: one file's bytes and content type."""
        resp = self._http.request("GET", "/view", params={"filename": filename, "subfolder": subfolder, "type": type},
                                  read_timeout=self.download_timeout, prompt_id=prompt_id)
        if resp.status_code != 200:
            raise ComfyProtocolError(f"GET /view {subfolder + '/' if subfolder else ''}{filename} ({type}): "
                                     f"HTTP {resp.status_code}", status_code=resp.status_code, body=resp.text,
                                     prompt_id=prompt_id)
        ctype = (resp.headers.get("Content-Type") or "application/octet-stream").split(";")[0].strip()
        return resp.content, ctype

    def _history_retry(self, prompt_id: str, retry_for: float) -> Optional[HistoryEntry]:
        # ComfyUI writes the entry only after execution_success is sent; a real 0.8.0 on CPU was
        # seen a few ms late on about one prompt in four (1024² SaveImage: 5-16 ms). So the first
        # retries come quickly (2 ms, doubling) rather than a fixed 100 ms sleep the job would pay.
        deadline = time.monotonic() + retry_for
        pause = 0.002
        while True:
            entry = self._http.history_entry(prompt_id)
            if entry is not None or time.monotonic() >= deadline:
                return entry
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    # ------------------------------------------------------------------ cancel
    def cancel(self, prompt_id: str) -> CancelOutcome:
        """Cancel one prompt without touching any other:

        * running → ``POST /interrupt {"prompt_id": id}``: ComfyUI interrupts only while this
          prompt is the running one, so the call alone is safe → ``INTERRUPTED`` (the stream then
          ends with `Interrupted`). When this client's stream already saw its ``execution_start``
          that is all it sends; otherwise ``/queue`` tells running from pending first;
        * pending → ``POST /queue {"delete": [id]}``, confirmed via ``/queue`` and ``/history``
          → ``DELETED``; a prompt this client submitted and has not seen start is deleted at
          once, before looking (a delete of a running prompt does nothing);
        * in history → ``FINISHED``; unknown → ``NOT_FOUND``.
        If the prompt starts running between the check and the delete, it is interrupted.
        """
        with self._reader.lock:
            w = self._reader.watches.get(prompt_id)
            known = None if w is None or w.finished or not w.submitted else ("running" if w.started else "pending")
        if known == "running":
            self._interrupt_running(prompt_id)
            return CancelOutcome.INTERRUPTED
        q: Optional[QueueState] = None  # a pending prompt of ours is deleted before looking
        for _ in range(5):
            if q is None and known != "pending":
                q = self._http.queue_state()
            if q is not None and prompt_id in q.running_ids():
                self._interrupt_running(prompt_id)
                return CancelOutcome.INTERRUPTED
            if q is None or prompt_id in q.pending_ids():
                with self._reader.lock:
                    w = self._reader.watches.get(prompt_id)
                    if w is not None:
                        w.cancel_requested = True  # absent from /queue and /history = deleted, not lost
                self._http.post_ack("/queue", {"delete": [prompt_id]}, "POST /queue delete")
                q = self._http.queue_state()
                if prompt_id in q.pending_ids() or prompt_id in q.running_ids():
                    continue  # the delete did not take (yet), or it started first: interrupt it (next round)
                if self._http.history_entry(prompt_id) is not None:
                    return CancelOutcome.FINISHED  # started and finished in between
                log.info("comfy: deleted pending prompt %s", prompt_id)
                with self._reader.lock:
                    w = self._reader.watches.get(prompt_id)
                if w is not None:
                    w.finish(Interrupted(prompt_id, source="cancel", deleted=True))
                return CancelOutcome.DELETED
            if self._http.history_entry(prompt_id) is not None:
                return CancelOutcome.FINISHED
            # Not queued, not in history: unless it just moved from the queue into history...
            q = self._http.queue_state()
            if not q.contains(prompt_id) and self._http.history_entry(prompt_id) is None:
                return CancelOutcome.NOT_FOUND
        raise ComfyProtocolError(f"could not cancel prompt {prompt_id}: queue state kept changing",
                                 prompt_id=prompt_id)

    def _interrupt_running(self, prompt_id: str) -> None:
        # Never the body-less (global) form: a prompt that finished meanwhile leaves the next one alone.
        self._http.post_ack("/interrupt", {"prompt_id": prompt_id}, "POST /interrupt")
        log.info("comfy: interrupt requested for running prompt %s", prompt_id)

    # ------------------------------------------------------------------ logs
    def subscribe_logs(self, enabled: bool = True, on_log: Optional[Callable[[LogEntry], None]] = None) -> bool:
        """Ask ComfyUI to push its log lines to this client's socket (``/internal/logs/subscribe``,
        an optional, internal route). Re-subscribed after every reconnect. Returns False when
        the server does not offer the route."""
        if on_log is not None:
            self._reader.on_log = on_log
        self._start()
        # Set first: a (re)connect racing with this call re-subscribes on its own.
        self._reader.logs_enabled = bool(enabled)
        try:
            resp = self._http.request("PATCH", "/internal/logs/subscribe",
                                      json_body={"clientId": self.client_id, "enabled": bool(enabled)})
        except ComfyError:
            self._reader.logs_enabled = False
            raise
        if resp.status_code in (404, 405, 501):
            log.warning("comfy: this ComfyUI has no log streaming (PATCH /internal/logs/subscribe → %s)",
                        resp.status_code)
            self._reader.logs_enabled = False
            return False
        if resp.status_code != 200:
            self._reader.logs_enabled = False
            raise ComfyProtocolError(f"PATCH /internal/logs/subscribe: HTTP {resp.status_code}",
                                     status_code=resp.status_code, body=resp.text)
        return True

    def drain_logs(self) -> list[LogEntry]:
        """Log lines received so far (when no ``on_log`` callback is set); clears the buffer."""
        buf = self._reader.log_buffer
        out = []
        while True:
            try:
                out.append(buf.popleft())
            except IndexError:
                return out

    # ------------------------------------------------------------------ thin typed calls
    def system_stats(self) -> SystemStats:
        raw = self._http.get_json("/system_stats", "GET /system_stats")
        if not isinstance(raw, dict):
            raise ComfyProtocolError("GET /system_stats: unexpected body", body=str(raw)[:2000])
        return SystemStats.from_raw(raw)

    def object_info(self, node_class: Optional[str] = None) -> dict[str, NodeInfo]:
        """Node definitions by class name (``{}`` for an unknown class)."""
        path = "/object_info" if node_class is None else f"/object_info/{node_class}"
        raw = self._http.get_json(path, f"GET {path}")
        if not isinstance(raw, dict):
            raise ComfyProtocolError(f"GET {path}: unexpected body", body=str(raw)[:2000])
        return {name: NodeInfo.from_raw(name, info) for name, info in raw.items() if isinstance(info, dict)}

    def queue(self) -> QueueState:
        return self._http.queue_state()

    def history(self, prompt_id: str) -> Optional[HistoryEntry]:
        """The history entry, or None while pending/running or when unknown."""
        return self._http.history_entry(prompt_id)

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        self._http.post_ack("/free", {"unload_models": unload_models, "free_memory": free_memory}, "POST /free")

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """Low level ``POST /interrupt``. Without a prompt id it stops WHATEVER runs; prefer
        `cancel()`, which checks ``/queue`` first."""
        self._http.post_ack("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}, "POST /interrupt")

    def delete_from_queue(self, ids: Sequence[str]) -> None:
        self._http.post_ack("/queue", {"delete": list(ids)}, "POST /queue delete")

    def prompt_queue_remaining(self) -> int:
        raw = self._http.get_json("/prompt", "GET /prompt")
        try:
            return int(raw["exec_info"]["queue_remaining"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ComfyProtocolError("GET /prompt: no exec_info.queue_remaining", body=str(raw)[:2000]) from exc


def output_refs(outputs: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(node_id, kind, {filename, subfolder, type}) for every file listed in history outputs."""
    for node_id, node_out in (outputs or {}).items():
        if not isinstance(node_out, dict):
            continue
        for kind, items in node_out.items():
            if not isinstance(items, list):
                continue
            for ref in items:
                if isinstance(ref, dict) and isinstance(ref.get("filename"), str) and ref.get("filename"):
                    yield str(node_id), str(kind), ref
