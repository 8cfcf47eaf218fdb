"""The server log as ComfyUI exposes it: stdout, a recent-lines buffer for
GET /internal/logs/raw, and batched `logs` messages to subscribed sockets."""
from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import sys

from .hub import Hub

FLUSH_SECONDS = 0.25      # ComfyUI's lines reach subscribers in batches, often after the run ended
TERMINAL_SIZE = {"cols": 80, "rows": 24}   # a non-tty server reports the default size
BUFFER_LINES = 300

_FORMATTER = logging.Formatter()


class LogStream(logging.Handler):
    def __init__(self, hub: Hub) -> None:
        super().__init__(logging.INFO)
        self.hub = hub
        self.buffer: collections.deque = collections.deque(maxlen=BUFFER_LINES)
        self.subscribers: set[str] = set()
        self._pending: list[dict] = []
        self._flush_scheduled = False
        self._size_sent = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + _FORMATTER.formatException(record.exc_info)
        entry = {"t": datetime.datetime.now().isoformat(), "m": text + "\n"}
        sys.stdout.write(entry["m"])
        sys.stdout.flush()
        self.buffer.append(entry)
        if self.subscribers and self._loop is not None:
            self._pending.append(entry)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_later(FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        entries, self._pending = self._pending, []
        if not entries:
            return
        # The terminal size is sent once, then null while it does not change.
        size = None if self._size_sent else dict(TERMINAL_SIZE)
        self._size_sent = True
        for client_id in list(self.subscribers):
            if client_id not in self.hub.sockets:
                self.subscribers.discard(client_id)   # gone: unsubscribed by the server
                continue
            self.hub.send("logs", {"entries": entries, "size": size}, client_id)

    def subscribe(self, client_id: str, enabled: bool) -> None:
        if enabled:
            self.subscribers.add(client_id)
        else:
            self.subscribers.discard(client_id)

    def raw(self) -> dict:
        return {"entries": list(self.buffer), "size": dict(TERMINAL_SIZE)}


def install(hub: Hub) -> LogStream:
    """Take over the root logger, as ComfyUI's log interceptor takes over the whole
    output (aiohttp's "Error handling request" tracebacks included)."""
    stream = LogStream(hub)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(stream)
    return stream
