"""`python -m deploy.flower`: Flower on the service's broker, configured for operators.

Persistent state (survives restarts), basic auth when FLOWER_BASIC_AUTH is set, a bounded task
list, and columns that show each job's one-line summary (the API sends task id, workflow,
seed and attempt as the message's argsrepr/kwargsrepr, never the graphs).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from common.settings import get_settings
from workers.celery_app import app

log = logging.getLogger("comfy.flower")


def argv(settings) -> list[str]:
    Path(settings.flower_db).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "flower", f"--address={settings.flower_address}", f"--port={settings.flower_port}",
        "--persistent=True", f"--db={settings.flower_db}", "--state_save_interval=60000",
        "--max_tasks=10000", "--purge_offline_workers=3600",
        "--tasks_columns=name,uuid,state,args,kwargs,received,started,runtime,worker,retries",
    ]
    if settings.flower_basic_auth:
        args += [f"--basic_auth={pair}" for pair in settings.flower_basic_auth.split(",") if pair]
    elif settings.flower_address not in ("127.0.0.1", "localhost", "::1"):
        log.warning("Flower listens on %s without FLOWER_BASIC_AUTH: anyone who reaches it can revoke tasks",
                    settings.flower_address)
    return args


def main() -> None:
    app.start(argv(get_settings()))


if __name__ == "__main__":
    sys.exit(main())
