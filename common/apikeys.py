"""API keys: only SHA-256 digests are stored or compared; a key itself is shown once, at `add`.

Two sources, both optional:
- Redis (preferred): hash `cs:apikeys` digest → JSON {name, created, disabled}, and hash
  `cs:apikeys:names` name → digest (names are unique). Managed with `python -m app.keys`;
  keys can be disabled and enabled again without a restart.
- The environment: API_KEYS="name:key,name2:key2" (read at start; to revoke one, restart
  without it). Meant for small or scripted setups.

A key's name is its owner identity: tasks are stored with it and only that name sees them.
With no key configured anywhere the service is open and every task belongs to `anonymous`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

import redis

from common import keys

KEYS_HASH = keys.API_KEYS
NAMES_HASH = keys.API_KEY_NAMES
ANONYMOUS = "anonymous"
# A name becomes part of Redis keys (cs:active:<name>) and of the rate-limit key: keep it plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# RFC 6750 b64token, bounded: anything else in a Bearer header is not one of our keys.
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9\-._~+/]{16,512}=*$")
MIN_KEY_LENGTH = 16
KEY_PREFIX = "cs_"

# Registers a key atomically: the name must be new. KEYS: names hash, keys hash.
# ARGV: name, digest, record JSON. Returns 1, or 0 when the name exists.
_ADD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and name != ANONYMOUS


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits


def parse_env_keys(value: str) -> dict[str, str]:
    """API_KEYS="name:key,name2:key2" → {digest: name}. Errors name the entry, never the key."""
    keys: dict[str, str] = {}
    for index, entry in enumerate(e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, key = entry.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not valid_name(name):
            raise ValueError(f"API_KEYS entry {index + 1}: expected name:key with a name matching "
                             f"{NAME_PATTERN.pattern} (not {ANONYMOUS!r})")
        if len(key) < MIN_KEY_LENGTH or not TOKEN_PATTERN.match(key):
            raise ValueError(f"API_KEYS entry {index + 1} ({name}): the key must be at least {MIN_KEY_LENGTH} "
                             "characters of A-Z a-z 0-9 - . _ ~ + /")
        keys[digest(key)] = name
    return keys


@dataclass(frozen=True)
class KeyRecord:
    name: str
    created: str | None
    disabled: bool
    source: str  # "redis" or "env"


class KeyStore:
    """The Redis side of the keys (the CLI writes it, the API reads it)."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._add = client.register_script(_ADD)

    def configured(self) -> bool:
        return bool(self.redis.exists(KEYS_HASH))

    def lookup(self, key_digest: str) -> KeyRecord | None:
        raw = self.redis.hget(KEYS_HASH, key_digest)
        if raw is None:
            return None
        data = json.loads(raw)
        return KeyRecord(data["name"], data.get("created"), bool(data.get("disabled")), "redis")

    def add(self, name: str) -> str:
        """Create a key for `name`; returns the key (the only time it exists outside the caller)."""
        if not valid_name(name):
            raise ValueError(f"a key name must match {NAME_PATTERN.pattern} and not be {ANONYMOUS!r}")
        key = new_key()
        record = {"name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "disabled": False}
        if not self._add(keys=[NAMES_HASH, KEYS_HASH], args=[name, digest(key), json.dumps(record)]):
            raise ValueError(f"a key named {name!r} already exists")
        return key

    def set_disabled(self, name: str, disabled: bool) -> None:
        key_digest = self.redis.hget(NAMES_HASH, name)
        if key_digest is None:
            raise KeyError(name)
        raw = self.redis.hget(KEYS_HASH, key_digest)
        data = json.loads(raw) if raw else {"name": name, "created": None}
        data["disabled"] = disabled
        self.redis.hset(KEYS_HASH, key_digest, json.dumps(data))

    def list(self) -> list[KeyRecord]:
        records = [json.loads(v) for v in self.redis.hvals(KEYS_HASH)]
        return sorted((KeyRecord(r["name"], r.get("created"), bool(r.get("disabled")), "redis") for r in records),
                      key=lambda r: r.name)


class Keyring:
    """Who is calling: the environment's keys and the Redis keys, compared by digest only."""

    def __init__(self, env_keys: dict[str, str], store: KeyStore):
        self.env = env_keys  # digest → name
        self.store = store
        self._redis_configured = False

    def required(self) -> bool:
        """True once any key exists. A key added at run time takes effect on the next request;
        once seen, keys stay required for the life of the process (the safe direction)."""
        if self.env or self._redis_configured:
            return True
        self._redis_configured = self.store.configured()
        return self._redis_configured

    def identify(self, key: str) -> KeyRecord | None:
        key_digest = digest(key)
        found = None
        for known, name in self.env.items():  # every entry, constant time each: no early exit
            if hmac.compare_digest(known, key_digest):
                found = KeyRecord(name, None, False, "env")
        if found is not None:
            return found
        return self.store.lookup(key_digest)  # looked up by digest: timing says nothing of the key
