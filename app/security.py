"""Who may call /api/v1, how often, and which tasks they see (docs/security.md).

- Keys: with any key configured (API_KEYS, or `python -m app.keys` in Redis), every route
  under /api/ needs `Authorization: Bearer <key>`: 401 without a known key, 403 for a
  disabled one. Without keys the API is open (a loud warning at start; it binds to loopback
  by default) and every caller is `anonymous`.
- Isolation: a task belongs to the name of the key that submitted it; any other caller gets
  the same 404 as for a task that does not exist (`load_task`).
- Rate limits (Flask-Limiter on the service's Redis): RATE_LIMIT over all /api/v1 routes and
  RATE_LIMIT_GENERATE on POST /generate, per key name (per client address without keys).
- CORS only when CORS_ORIGINS is set.

/healthz, /readyz, /metrics and /openapi.json stay open: they hold no secret and no task data.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass

import redis

from common import keys
from flask import Flask, current_app, g, request
from flask_limiter import Limit, Limiter, RateLimitExceeded
from limits import parse_many

from app.errors import ServiceError, error_response
from common.apikeys import ANONYMOUS, TOKEN_PATTERN, KeyStore, Keyring, parse_env_keys
from common.settings import Settings

log = logging.getLogger("comfy.api")

PROTECTED_PREFIX = "/api/"
REALM = 'Bearer realm="comfy-service"'
OFF = ("", "0", "off", "none", "false")


@dataclass(frozen=True)
class Caller:
    name: str  # the owner of the tasks it submits
    authenticated: bool


ANONYMOUS_CALLER = Caller(ANONYMOUS, False)


def _protected() -> bool:
    return request.path.startswith(PROTECTED_PREFIX) and request.method != "OPTIONS"


def _unauthorized(code: str, message: str, bearer_error: str | None = None) -> ServiceError:
    challenge = REALM + (f', error="{bearer_error}"' if bearer_error else "")
    return ServiceError(401, code, message, {"header": "Authorization"}, headers={"WWW-Authenticate": challenge})


def authenticate(keyring: Keyring) -> Caller:
    """The caller of this request, or a 401/403 ServiceError. Never logs the key."""
    if not keyring.required():
        return ANONYMOUS_CALLER
    header = request.headers.get("Authorization", "")
    if not header:
        raise _unauthorized("missing_api_key", "this service needs an API key: Authorization: Bearer <key>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not TOKEN_PATTERN.match(token):
        raise _unauthorized("invalid_api_key", "the Authorization header is not a Bearer key of this service",
                            "invalid_token")
    found = keyring.identify(token)
    if found is None:
        raise _unauthorized("invalid_api_key", "unknown API key", "invalid_token")
    if found.disabled:
        raise ServiceError(403, "api_key_disabled", f"the API key {found.name!r} is disabled", {"key": found.name})
    return Caller(found.name, True)


def current_caller() -> Caller:
    """The caller the request hook identified (identified now if the hook did not run)."""
    caller = g.get("caller")
    if caller is None:
        caller = g.caller = authenticate(current_app.extensions["comfy.keyring"])
    return caller


def task_not_found(task_id: str) -> ServiceError:
    return ServiceError(404, "task_not_found", "no task with this id", {"task_id": task_id[:64]})


def valid_task_id(task_id: str) -> str:
    """The canonical form of a task id, or the 404 (any malformed id is simply not a task)."""
    if len(task_id) > 64:
        raise task_not_found(task_id)
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise task_not_found(task_id) from None


def owns(record: dict | None) -> bool:
    return record is not None and record.get("owner", ANONYMOUS) == current_caller().name


def load_task(task_id: str) -> tuple[str, dict]:
    """(canonical id, record) of a task the current caller owns, else the 404 of an unknown
    task: another key's task is indistinguishable from none. For every route taking a task id."""
    task_id = valid_task_id(task_id)
    record = current_app.extensions["comfy"].store.get(task_id)
    if not owns(record):
        raise task_not_found(task_id)
    return task_id, record


def _limits(value: str, name: str) -> str | None:
    if value.strip().lower() in OFF:
        return None
    try:
        parse_many(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not a rate limit such as '120/minute': {exc}") from None
    return value


def _rate_key() -> str:
    caller = g.get("caller")
    if caller is not None and caller.authenticated:
        return f"key:{caller.name}"
    return f"addr:{request.remote_addr or 'unknown'}"


def install(app: Flask, settings: Settings, client: redis.Redis) -> Limiter | None:
    """Authentication hook, rate limits, CORS and the start-up warning. Call before any other
    before_request hook that needs the caller, and before registering the blueprints."""
    keyring = Keyring(parse_env_keys(settings.api_keys.get_secret_value()), KeyStore(client))
    app.extensions["comfy.keyring"] = keyring
    _announce(settings, keyring)

    @app.before_request
    def _authenticate():  # before the limiter's hook: its key is the caller's name
        if _protected():
            g.caller = authenticate(keyring)

    limiter = None
    overall = _limits(settings.rate_limit, "RATE_LIMIT")
    generate = _limits(settings.rate_limit_generate, "RATE_LIMIT_GENERATE")
    if overall or generate:
        limiter = Limiter(
            # The counters use the API's own pool (app/services.py): bounded, and on the master
            # whether REDIS_URL names one server or Sentinels. The URI only picks limits' Redis
            # storage; with a pool given, limits reads no address from it.
            _rate_key, app=app, storage_uri="redis://",
            storage_options={"connection_pool": client.connection_pool},
            strategy="fixed-window", key_prefix=keys.RATE_LIMIT_PREFIX, headers_enabled=False,
            # One budget over every /api/v1 route, and a tighter one on submissions.
            application_limits=[overall] if overall else [],
            application_limits_exempt_when=lambda: not _protected(),
            default_limits=[Limit(limit_provider=generate, exempt_when=lambda: request.endpoint != "api.generate")]
            if generate else [],
        )

        @app.errorhandler(RateLimitExceeded)
        def _rate_limited(exc: RateLimitExceeded):
            current = limiter.current_limit
            wait = max(1, math.ceil(current.reset_at - time.time())) if current is not None else 1
            response = error_response(429, "rate_limited", f"too many requests: at most {exc.description}",
                                      {"limit": exc.description, "retry_after": wait})
            response.headers["Retry-After"] = str(wait)
            return response

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        from flask_cors import CORS

        CORS(app, resources={r"/api/*": {"origins": origins}}, methods=["GET", "POST", "DELETE"],
             allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
             expose_headers=["Location", "Retry-After", "Idempotent-Replayed"], max_age=600)
    return limiter


def _announce(settings: Settings, keyring: Keyring) -> None:
    try:
        required = keyring.required()
    except redis.RedisError as exc:
        log.warning("could not read the API keys in Redis at start (%s); they are checked on each request",
                    type(exc).__name__)
        return
    if required:
        log.info("API keys required on /api/v1 (%d from API_KEYS, Redis keys: %s)", len(keyring.env),
                 "yes" if keyring.store.configured() else "none")
        return
    log.warning("!" * 72)
    log.warning("NO API KEYS CONFIGURED: /api/v1 is open to anyone who can reach %s:%s (every task is "
                "owned by 'anonymous'). Keep API_HOST on loopback, or add a key: python -m app.keys add NAME",
                settings.api_host, settings.api_port)
    log.warning("!" * 72)
