"""`python -m bench.tap LISTEN_PORT TARGET_PORT OUT`: a TCP pass-through in front of a simulator
that notes when each websocket `progress` message left it.

ComfyUI sends a prompt's progress only to the socket of the client that submitted it, so
no outside listener can see the worker's progress events; sitting on the wire can. Bytes go
through unchanged and at once; server→client bytes of a websocket connection are also
parsed into frames, and each `progress` text frame becomes one line of OUT:
{"t": time.time() on arrival, "prompt_id", "node", "value", "max"}. Runs as its own process so the
benchmark's own polling cannot delay the time stamps.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time


class FrameLog:
    """Server→client bytes of one connection: HTTP until a 101 answer, then websocket frames."""

    def __init__(self, out):
        self.out, self.buf, self.ws, self.plain = out, b"", False, False

    def feed(self, data: bytes, t: float) -> None:
        if self.plain:
            return
        self.buf += data
        if not self.ws:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.plain, self.buf = True, b""  # an ordinary HTTP connection: nothing to parse
                return
            self.ws, self.buf = True, rest
        while len(self.buf) >= 2:
            opcode, length, start = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(self.buf[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(self.buf[2:10], "big"), 10
            if self.buf[1] & 0x80:  # servers never mask, but stay correct
                start += 4
            if len(self.buf) < start + length:
                return
            payload, self.buf = self.buf[start:start + length], self.buf[start + length:]
            if opcode == 1 and b'"progress"' in payload[:24]:
                data = json.loads(payload)["data"]
                self.out.write(json.dumps({"t": t, "prompt_id": data.get("prompt_id"), "node": data.get("node"),
                                           "value": data["value"], "max": data["max"]}) + "\n")
                self.out.flush()


async def _pipe(reader, writer, log: FrameLog | None) -> None:
    try:
        while data := await reader.read(65536):
            t = time.time()
            writer.write(data)
            await writer.drain()
            if log is not None:
                log.feed(data, t)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(listen: int, target: int, out_path: str) -> None:
    out = open(out_path, "a", buffering=1)

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w, None), _pipe(server_r, client_w, FrameLog(out)))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
