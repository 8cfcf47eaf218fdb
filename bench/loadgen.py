"""`python -m bench.loadgen URL CONNECTIONS SECONDS [--post BODYFILE] [--paths FILE]`: a small
closed-loop HTTP/1.1 load generator, used only where wrk is not installed.

Each connection is kept alive and sends its next request when the previous answer is in
(like wrk). Prints one JSON line as bench/throughput.py's wrk script does. Being Python, it
needs more CPU than wrk for the same rate, and it shares the 2 cores with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from urllib.parse import urlsplit


async def _connection(host, port, requests, stop_at, latencies, errors):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        errors["connect"] += 1
        return
    try:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            writer.write(next(requests))
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.monotonic() - t0)
            if status >= 400:
                errors["status"] += 1
    except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
        errors["read"] += 1
    finally:
        writer.close()


async def main(args) -> dict:
    url = urlsplit(args.url)
    host, port = url.hostname, url.port or 80
    if args.post:
        body = open(args.post, "rb").read()
        one = (f"POST {url.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        requests = itertools.repeat(one)
    elif args.paths:
        paths = open(args.paths).read().split()
        requests = itertools.cycle([f"GET {p} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for p in paths])
    else:
        requests = itertools.repeat(f"GET {url.path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    latencies, errors = [], {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    start = time.monotonic()
    await asyncio.gather(*(_connection(host, port, requests, start + args.seconds, latencies, errors)
                           for _ in range(args.connections)))
    duration = time.monotonic() - start
    latencies.sort()

    def q(p):
        return int(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6) if latencies else 0
    return {"requests": len(latencies), "duration_us": int(duration * 1e6), "p50_us": q(50), "p99_us": q(99),
            "max_us": q(100), "mean_us": sum(latencies) / max(len(latencies), 1) * 1e6, "errors": errors}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--post")
    parser.add_argument("--paths")
    print("BENCHJSON " + json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
