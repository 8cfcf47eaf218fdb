"""Every Redis client of the service, built from the settings: one place that knows where Redis is.

`REDIS_URL` names either one server (`redis://`, `rediss://`, `unix://`, as redis-py reads
them) or a set of Sentinels that name the master (`sentinel://[[user]:password@]host:port,
host:port,.../db`, the master's name in `REDIS_SENTINEL_MASTER`). Through Sentinels a client
asks for the master's address whenever it opens a connection and drops connections to a
demoted master, so once the Sentinels have promoted a replica the next command goes there.
During the switch a command fails with ConnectionError, as in any Redis outage (the API
answers 503). Celery's broker gets kombu's form of the same address from here too; the rate
limiter counts through the API's pool (app/security.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from common.settings import Settings

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT = 2.0  # per Sentinel asked: a dead or hung one must not hold up the others


@dataclass(frozen=True)
class SentinelURL:
    """A `sentinel://` REDIS_URL taken apart. The credentials are the data nodes' (the master's
    and its replicas'); the Sentinels' own password is a setting (REDIS_SENTINEL_PASSWORD)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """The Sentinels a `sentinel://` URL names; None for any other URL (a single server)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != SENTINEL_SCHEME:
        return None
    # urlsplit reads one host only: split the credentials and the host list by hand.
    netloc, slash, path = rest.partition("/")
    if "?" in path or "#" in path or "?" in netloc:
        raise ValueError("REDIS_URL: a sentinel:// URL takes no query or fragment")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"REDIS_URL: empty Sentinel address in {_masked(url)}")
        part = urlsplit(f"//{item}")  # handles [ipv6]:port
        try:
            port = part.port or SENTINEL_PORT
        except ValueError:
            raise ValueError(f"REDIS_URL: bad Sentinel port in {item!r}") from None
        if not part.hostname:
            raise ValueError(f"REDIS_URL: no host in Sentinel address {item!r}")
        sentinels.append((part.hostname, port))
    db_text = path.strip("/") if slash else ""
    if db_text and not db_text.isdigit():
        raise ValueError(f"REDIS_URL: the database of a sentinel:// URL is a number, not {db_text!r}")
    return SentinelURL(tuple(sentinels), int(db_text or 0), username, password)


def _masked(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{hosts}"


class SentinelBlockingConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool with BlockingConnectionPool's bounded size and wait (redis-py 8.1
    ships only the unbounded Sentinel pool, which raises "Too many connections" under gevent).
    The Sentinel pool finds the master on connect and drops connections to a former master; the
    blocking pool hands out at most `max_connections` and makes a caller wait `timeout` for one."""


def connect(settings: Settings, *, max_connections: int | None = None, wait: float = 5.0,
            **options) -> redis.Redis:
    """A client of the service's Redis, its master when REDIS_URL names Sentinels. With
    `max_connections`, a blocking pool of that size (a caller waits up to `wait` seconds for a
    free connection); otherwise redis-py's default pool. `options` are redis-py connection
    options (client_name, socket_timeout, health_check_interval, ...)."""
    target = parse_sentinel_url(settings.redis_url)
    if target is None:
        if max_connections is None:
            return redis.Redis.from_url(settings.redis_url, **options)
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=max_connections, timeout=wait, **options))
    pool_options = {}
    if max_connections is not None:
        pool_options = {"connection_pool_class": SentinelBlockingConnectionPool,
                        "max_connections": max_connections, "timeout": wait}
    return sentinels(settings, target).master_for(
        settings.redis_sentinel_master, db=target.db, username=target.username, password=target.password,
        **pool_options, **options)


def sentinels(settings: Settings, target: SentinelURL) -> Sentinel:
    """The Sentinels of a sentinel:// URL, asked with their own password (REDIS_SENTINEL_PASSWORD)."""
    sentinel_kwargs = {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT}
    password = settings.redis_sentinel_password.get_secret_value()
    if password:
        sentinel_kwargs["password"] = password
    return Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)


def celery_broker(settings: Settings) -> tuple[str, dict]:
    """Celery's broker URL and the transport options it needs besides ours. kombu's Sentinel
    transport takes one `sentinel://` URL per Sentinel, joined by `;`, each with the data
    nodes' credentials and the db, and the master's name as a transport option."""
    target = parse_sentinel_url(settings.redis_url)
    if target is None:
        return settings.redis_url, {}
    auth = ""
    if target.username or target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    url = ";".join(f"sentinel://{auth}{_netloc(host, port)}/{target.db}" for host, port in target.sentinels)
    options: dict = {"master_name": settings.redis_sentinel_master}
    password = settings.redis_sentinel_password.get_secret_value()
    if password:
        options["sentinel_kwargs"] = {"password": password}
    return url, options


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

