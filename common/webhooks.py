"""Webhooks: which callback URLs are allowed, what is sent, how it is signed, when to retry.

A job submitted with `callback_url` gets its final task document POSTed there (and, when it
asked with `callback_events`, its start, progress and outputs), signed per the Standard
Webhooks spec: headers webhook-id (the same on every retry: receivers deduplicate by it),
webhook-timestamp and webhook-signature (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`).

The API and the GPU workers only queue a delivery (a Celery message on WEBHOOK_QUEUE); the
webhook worker (`python -m workers webhooks`) makes the request, so a slow or dead receiver
never holds a GPU or an API request. Everything here but `Notifier` is pure.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

from standardwebhooks import Webhook

from common import keys
from common.documents import CALLBACK_EVENTS, FINAL_STATUSES

log = logging.getLogger("comfy.webhooks")

DELIVER = "comfy.deliver_webhook"
# Finished jobs whose final webhook is not settled yet (score: ms since which it is owed).
PENDING = keys.WEBHOOKS_PENDING
FINAL = FINAL_STATUSES
# What a caller may ask for besides the final document, which is always sent.
OPTIONAL_EVENTS = CALLBACK_EVENTS
MAX_URL_LENGTH = 2048
# Receiver answers that a later attempt may fix; any other 4xx is the receiver's final word.
RETRY_4XX = frozenset({408, 409, 425, 429})
_HOST = re.compile(r"[a-z0-9.\-]{1,253}|[0-9a-f:.]{2,45}")  # a name, an IPv4 or an IPv6 (unbracketed)


class CallbackRejected(ValueError):
    """A callback URL the service will not call; `code` names why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_allowlist(value: str) -> tuple[str, ...]:
    return tuple(entry.strip().lower() for entry in value.split(",") if entry.strip())


def _host_port(entry: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + entry)
    return (parts.hostname or "").lower(), parts.port


def host_allowed(host: str, port: int, allowlist: tuple[str, ...]) -> bool:
    """`host` exactly (any port), `host:port`, or `*.domain` (any name under domain, not domain)."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        if entry.startswith("*."):
            allowed_host, allowed_port = _host_port(entry[2:])
            if host.endswith("." + allowed_host) and allowed_port in (None, port):
                return True
            continue
        allowed_host, allowed_port = _host_port(entry)
        if host == allowed_host and allowed_port in (None, port):
            return True
    return False


def check_callback(url: object, allowlist: tuple[str, ...], secret_set: bool) -> str:
    """The URL if the service may call it, else CallbackRejected. No DNS lookup: the allowlist
    names hosts, and redirects are never followed, so a request goes to an allowed host only."""
    if not secret_set or not allowlist:
        raise CallbackRejected("webhooks_disabled", "webhooks are not enabled on this service "
                               "(an operator sets WEBHOOK_SECRET and WEBHOOK_ALLOWED_HOSTS)")
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise CallbackRejected("invalid_callback_url", f"callback_url must be a URL of at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise CallbackRejected("invalid_callback_url", f"callback_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRejected("invalid_callback_url", "callback_url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRejected("invalid_callback_url", "callback_url must not carry credentials")
    if any(ord(c) < 0x21 or ord(c) >= 0x7F or c == "\\" for c in url):
        # Also no backslash and nothing beyond ASCII (IDNs in punycode): URL parsers disagree on
        # those, and the host we check must be the host requests connects to.
        raise CallbackRejected("invalid_callback_url",
                               "callback_url must be plain ASCII without spaces, control characters or backslashes")
    if not _HOST.fullmatch(parts.hostname):
        raise CallbackRejected("invalid_callback_url", "callback_url's host must be a DNS name or an IP address")
    if not host_allowed(parts.hostname, port, allowlist):
        raise CallbackRejected("callback_not_allowed",
                               f"callback host {parts.hostname[:253]}:{port} is not in this service's allowed hosts")
    return url


def check_events(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CallbackRejected("invalid_callback_events", "callback_events must be a list of event names")
    if len(set(value)) != len(value):
        raise CallbackRejected("invalid_callback_events", "callback_events must not repeat an event")
    unknown = sorted(set(value) - set(OPTIONAL_EVENTS))
    if unknown:
        raise CallbackRejected("invalid_callback_events",
                               f"unknown callback event {unknown[0][:32]!r}; choose from {', '.join(OPTIONAL_EVENTS)}")
    return [e for e in OPTIONAL_EVENTS if e in value]


def event_type(kind: str) -> str:
    return f"task.{kind}"


def envelope(kind: str, data: dict, now: datetime | None = None) -> bytes:
    """The body: {type, timestamp, data} as Standard Webhooks suggests; data is the task
    document for status events, the event itself for progress and output."""
    now = now or datetime.now(timezone.utc)
    body = {"type": event_type(kind), "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_secrets(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def sign_headers(secrets: list[str], msg_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks headers; with several secrets (rotation) one signature each."""
    now = now or datetime.now(timezone.utc)
    text = body.decode()
    signatures = " ".join(Webhook(secret).sign(msg_id, now, text) for secret in secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signatures,
            "content-type": "application/json", "user-agent": "comfy-service-webhooks/1"}


def retryable(status: int | None) -> bool:
    """None: no answer (refused, timeout, reset). 3xx count as failures: redirects are not followed."""
    if status is None or status >= 500 or 300 <= status < 400:
        return True
    return status in RETRY_4XX


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base, 2·base, 4·base, …"""
    return min(base * (2 ** (attempt - 1)), cap)


def message_id(task_id: str, kind: str, event_id: str | None = None) -> str:
    if kind in FINAL:
        return f"msg_{task_id}_{kind}"  # one final message per job: a retry or a redelivery reuses it
    return f"msg_{task_id}_{kind}_{event_id or uuid.uuid4().hex[:12]}"


@dataclass
class Notifier:
    """Queues deliveries for one process (API or GPU worker); `celery` only sends messages."""
    celery: object
    queue: str

    def send(self, task_id: str, kind: str, data: dict | None = None, event_id: str | None = None) -> None:
        msg_id = message_id(task_id, kind, event_id)
        self.celery.send_task(DELIVER, args=[task_id, kind, msg_id, data], queue=self.queue,
                              kwargsrepr=repr({"kind": kind}))

    def on_status(self, task_id: str, status: str, callback: dict) -> None:
        """TaskStore's hook: the final document always, the start when asked."""
        if status in FINAL:
            self.send(task_id, status)
        elif status == "running" and "started" in (callback.get("events") or ()):
            self.send(task_id, "started")

    def on_event(self, task_id: str, callback: dict | None, kind: str, data: dict, event_id: str) -> None:
        """A worker's progress or output event, when the caller asked for that kind."""
        if callback and kind in (callback.get("events") or ()):
            self.send(task_id, kind, data, event_id)
