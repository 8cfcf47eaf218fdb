"""The websocket side: who is connected, and one ordered outbox for all of them.

Like ComfyUI, every message goes through a single queue drained by one task, so
messages leave in the order the executor produced them; `sid=None` broadcasts.
"""
from __future__ import annotations

import asyncio
import logging
import weakref

from aiohttp import web

log = logging.getLogger("comfyui_sim.hub")


class Hub:
    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.client_flags: dict[str, dict] = {}
        self._outbox: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._dropped: weakref.WeakSet = weakref.WeakSet()

    def start(self) -> None:
        self._outbox = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._publish())

    # -- sending ---------------------------------------------------------------
    def send(self, event: str, data, sid: str | None = None) -> None:
        """Queue a text message (`data` dict) or a binary frame (`data` bytes)."""
        self._outbox.put_nowait((event, data, sid))

    async def send_now(self, event: str, data, sid: str) -> None:
        """Bypass the queue (the greeting and replies to the client's own frames)."""
        ws = self.sockets.get(sid)
        if ws is not None:
            await _deliver(ws, event, data)

    async def _publish(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            if event is _DROP:
                self._drop_now()
                continue
            if sid is None:
                targets = list(self.sockets.values())
            else:
                targets = [self.sockets[sid]] if sid in self.sockets else []
            for ws in targets:
                if ws not in self._dropped:
                    await _deliver(ws, event, data)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        return bool(sid is not None and self.client_flags.get(sid, {}).get("supports_preview_metadata"))

    def drop_all(self) -> None:
        """Fault: the server closes every socket, after what was queued before this call
        and before anything queued after it."""
        self._outbox.put_nowait((_DROP, None, None))

    def _drop_now(self) -> None:
        loop = asyncio.get_running_loop()
        for ws in list(self.sockets.values()):
            self._dropped.add(ws)
            loop.create_task(_close(ws))


_DROP = object()


async def _close(ws: web.WebSocketResponse) -> None:
    try:
        await ws.close()
    except Exception:  # noqa: BLE001 - already gone
        pass


async def _deliver(ws: web.WebSocketResponse, event: str, data) -> None:
    if ws.closed:
        return
    try:
        if isinstance(data, (bytes, bytearray)):
            await ws.send_bytes(bytes(data))
        else:
            await ws.send_json({"type": event, "data": data})
    except (ConnectionError, RuntimeError) as err:   # the client went away meanwhile
        log.warning("send error: %s", err)
