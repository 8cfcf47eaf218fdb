"""HTTP plumbing: one `requests.Session`, a timeout on every call, exceptions mapped to
the client's error hierarchy."""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from .errors import ComfyProtocolError, ComfyTimeout, ComfyUnreachable
from .models import HistoryEntry, QueueItem, QueueState

log = logging.getLogger("workers.comfy")


def normalize_base_url(base_url: str) -> str:
    """``http://host:8188``, ``http://host:8000/api/`` → no trailing slash, no query."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"ComfyUI base URL must be http(s)://host[:port][/prefix], got {base_url!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def ws_url_for(base_url: str) -> str:
    """The websocket URL for a base URL: http→ws, https→wss, same host and path prefix, + /ws."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


class Http:
    """Thin wrapper over `requests.Session`. A Session is not documented as thread-safe, so
    each request borrows one from a small pool (bodies are read before it is returned):
    concurrent callers never share one, and idle keep-alive connections stay bounded."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float,
                 headers: Optional[dict[str, str]] = None, pool_size: int = 4):
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.headers = dict(headers or {})
        self._idle: list[requests.Session] = []
        self._lock = threading.Lock()
        self._pool_size = pool_size
        self._closed = False

    def _borrow(self) -> requests.Session:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        s = requests.Session()
        s.headers.update(self.headers)
        return s

    def _give_back(self, s: requests.Session) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(s)
                return
        s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, *, json_body: Any = None, params: Optional[dict] = None,
                read_timeout: Optional[float] = None, prompt_id: Optional[str] = None) -> requests.Response:
        timeout = (self.connect_timeout, read_timeout if read_timeout is not None else self.read_timeout)
        url = self.url(path)
        session = self._borrow()
        try:
            return session.request(method, url, json=json_body, params=params, timeout=timeout)
        except requests.exceptions.ConnectTimeout as exc:
            raise ComfyTimeout(f"connecting to ComfyUI at {self.base_url} timed out", prompt_id=prompt_id,
                               details={"url": url, "error": str(exc), "phase": "connect"}) from exc
        except requests.exceptions.Timeout as exc:
            raise ComfyTimeout(f"ComfyUI did not answer {method} {path} within {timeout[1]}s", prompt_id=prompt_id,
                               details={"url": url, "error": str(exc), "phase": "read"}) from exc
        except requests.exceptions.ConnectionError as exc:
            phase = "connect" if _is_connect_failure(exc) else "request"
            raise ComfyUnreachable(f"ComfyUI at {self.base_url} is unreachable: {_short(exc)}", prompt_id=prompt_id,
                                   details={"url": url, "error": str(exc), "phase": phase}) from exc
        except requests.exceptions.RequestException as exc:  # invalid URL, too many redirects, ...
            raise ComfyProtocolError(f"{method} {path} failed: {exc}", prompt_id=prompt_id,
                                     details={"url": url}) from exc
        finally:
            self._give_back(session)

    # ---------------------------------------------------------------- helpers
    def json_of(self, resp: requests.Response, what: str, prompt_id: Optional[str] = None) -> Any:
        if resp.status_code != 200:
            raise ComfyProtocolError(f"{what}: ComfyUI answered HTTP {resp.status_code}",
                                     status_code=resp.status_code, body=_text(resp), prompt_id=prompt_id)
        try:
            return resp.json()
        except ValueError as exc:
            raise ComfyProtocolError(f"{what}: ComfyUI answered a non-JSON body", status_code=resp.status_code,
                                     body=_text(resp), prompt_id=prompt_id) from exc

    def get_json(self, path: str, what: str, *, params: Optional[dict] = None, prompt_id: Optional[str] = None) -> Any:
        return self.json_of(self.request("GET", path, params=params, prompt_id=prompt_id), what, prompt_id)

    def post_ack(self, path: str, body: Any, what: str) -> None:
        """POST to a route that acknowledges with 200 and an empty body (/interrupt, /queue, /free)."""
        resp = self.request("POST", path, json_body=body)
        if resp.status_code != 200:
            raise ComfyProtocolError(f"{what}: ComfyUI answered HTTP {resp.status_code}",
                                     status_code=resp.status_code, body=_text(resp))

    def queue_state(self) -> QueueState:
        raw = self.get_json("/queue", "GET /queue")
        if not isinstance(raw, dict):
            raise ComfyProtocolError("GET /queue: unexpected body", body=json.dumps(raw)[:2000])

        def items(key: str) -> list[QueueItem]:
            out = []
            for it in raw.get(key) or []:
                if isinstance(it, (list, tuple)) and len(it) >= 2:
                    out.append(QueueItem.from_raw(it))
            return out

        pending = items("queue_pending")
        pending.sort(key=lambda i: (i.number if isinstance(i.number, (int, float)) else 0))
        return QueueState(running=items("queue_running"), pending=pending)

    def history_entry(self, prompt_id: str) -> Optional[HistoryEntry]:
        raw = self.get_json(f"/history/{prompt_id}", "GET /history/{id}", prompt_id=prompt_id)
        if not isinstance(raw, dict):
            raise ComfyProtocolError("GET /history/{id}: unexpected body", body=json.dumps(raw)[:2000],
                                     prompt_id=prompt_id)
        entry = raw.get(prompt_id)
        if not isinstance(entry, dict):
            return None
        return HistoryEntry.from_raw(prompt_id, entry)


def _is_connect_failure(exc: BaseException) -> bool:
    """True when the request surely never reached the server (refused, DNS, connect timeout)."""
    inner = exc.args[0] if exc.args else None
    reason = getattr(inner, "reason", inner)
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _text(resp: requests.Response) -> str:
    try:
        return resp.text
    except Exception:  # noqa: BLE001 - undecodable body
        return repr(resp.content[:2000])


def _short(exc: BaseException) -> str:
    s = str(exc)
    return s if len(s) < 300 else s[:300] + "…"
