"""`python -m deploy.alertlog`: the compose fleet's Alertmanager receiver (service `alert-webhook`).

Alertmanager POSTs its webhook payload (version 4) to `http://alert-webhook:9000/alerts`; each
alert in it becomes one log line: on stderr (`docker compose logs alert-webhook`) and, like every
other process of the fleet, in logdy (LOGDY_ADDRESS), as

    ALERT firing ComfyServiceWorkerDown severity=warning queue=gpu.host-a.1 host=host-a: <summary>

with the alert's labels and annotations as structured fields. It is the receiver that always
exists; to page someone, add an email/Slack/pager receiver in deploy/alertmanager/alertmanager.yml
beside it (docs/operations.md). GET /healthz answers 200; GET /alerts lists the last 100 alerts
received (JSON, newest last), for checks and tests.

Settings: ALERTLOG_HOST (0.0.0.0 in the image's compose service; default 127.0.0.1),
ALERTLOG_PORT (9000), and the logging settings of README.md.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loguru import logger

from common.logs import setup_logging

MAX_BODY = 1024 * 1024
_recent: deque = deque(maxlen=100)
_lock = threading.Lock()


def describe(alert: dict) -> str:
    labels = dict(alert.get("labels") or {})
    name = labels.pop("alertname", "?")
    shown = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    summary = (alert.get("annotations") or {}).get("summary", "")
    return f"ALERT {alert.get('status', '?')} {name} {shown}: {summary}".rstrip(": ")


def record(payload: dict) -> int:
    """Log each alert of an Alertmanager webhook payload; return how many there were."""
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise ValueError("payload has no list 'alerts'")
    for alert in alerts:
        if not isinstance(alert, dict):
            raise ValueError("an alert is not an object")
        line = describe(alert)
        fields = {"alert": {k: alert.get(k) for k in ("status", "labels", "annotations", "startsAt", "endsAt",
                                                      "fingerprint")},
                  "receiver": payload.get("receiver")}
        bound = logger.bind(**fields)
        (bound.warning if alert.get("status") == "firing" else bound.info)(line)
        with _lock:
            _recent.append({**fields["alert"], "receiver": payload.get("receiver")})
    return len(alerts)


class Handler(BaseHTTPRequestHandler):
    server_version = "comfy-alertlog"

    def _json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            return self._json(200, {"status": "ok"})
        if self.path == "/alerts":
            with _lock:
                return self._json(200, {"alerts": list(_recent)})
        return self._json(404, {"error": {"code": "not_found", "message": "POST /alerts, GET /alerts, GET /healthz"}})

    def do_POST(self):  # noqa: N802
        if self.path != "/alerts":
            return self._json(404, {"error": {"code": "not_found", "message": "POST alerts to /alerts"}})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._json(413 if length > MAX_BODY else 400,
                              {"error": {"code": "bad_length", "message": f"a body of 1..{MAX_BODY} bytes is required"}})
        try:
            count = record(json.loads(self.rfile.read(length)))
        except ValueError as exc:
            logger.error("alert payload refused: {}", exc)
            return self._json(400, {"error": {"code": "invalid_payload", "message": str(exc)}})
        return self._json(200, {"received": count})

    def log_message(self, format, *args):  # noqa: A002 - access lines are noise; alerts are logged above
        pass


def main() -> int:
    setup_logging("alertlog")
    host, port = os.environ.get("ALERTLOG_HOST", "127.0.0.1"), int(os.environ.get("ALERTLOG_PORT", "9000"))
    server = ThreadingHTTPServer((host, port), Handler)
    logger.info("alert receiver listening on http://{}:{}/alerts", host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
