"""`python -m tests.support.zygote_probe [code]`: prints, as one JSON line, what a process forked
by deploy/zygote.py inherited (tests/test_zygote.py), then exits with `code` (default 0)."""
from __future__ import annotations

import json
import os
import random
import sys
import threading


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return out


def main() -> None:
    from common.settings import get_settings

    print(json.dumps({
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "argv": sys.argv[1:],
        "env": dict(os.environ), "cwd": os.getcwd(), "fds": _fds(), "threads": threading.active_count(),
        "random": random.random(), "queue": get_settings().queue_name,
        "comm": open("/proc/self/comm").read().strip(),
    }), flush=True)
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)


if __name__ == "__main__":
    main()
