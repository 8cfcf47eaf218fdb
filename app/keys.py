"""`python -m app.keys`: manage the API keys kept (as SHA-256 digests) in Redis.

    python -m app.keys add NAME       # prints a new random key ONCE; only its digest is stored
    python -m app.keys disable NAME   # its requests get 403 at once; its tasks stay
    python -m app.keys enable NAME
    python -m app.keys list           # names, creation time, disabled; never a key

REDIS_URL says which Redis (the service's). Keys from API_KEYS (environment) are listed
as such but cannot be changed here: edit the variable and restart.
"""
from __future__ import annotations

import argparse
import sys

import redis

from common import redis_conn
from common.apikeys import KeyStore, parse_env_keys
from common.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description="Manage comfy-service API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("add", help="create a key and print it once").add_argument("name")
    commands.add_parser("disable", help="refuse a key (403) until enabled again").add_argument("name")
    commands.add_parser("enable", help="accept a disabled key again").add_argument("name")
    commands.add_parser("list", help="names, created, disabled (never the keys)")
    args = parser.parse_args(argv)

    settings = get_settings()
    store = KeyStore(redis_conn.connect(settings, socket_connect_timeout=5, socket_timeout=5))
    try:
        if args.command == "add":
            key = store.add(args.name)
            print(f"API key for {args.name} (shown once; only its SHA-256 digest is stored):", file=sys.stderr)
            print(key)
            print("Send it as:  Authorization: Bearer <key>", file=sys.stderr)
        elif args.command in ("disable", "enable"):
            store.set_disabled(args.name, args.command == "disable")
            print(f"{args.name}: {args.command}d")
        else:
            rows = [(r.name, r.created or "-", "yes" if r.disabled else "no", "redis") for r in store.list()]
            env_names = sorted(set(parse_env_keys(settings.api_keys.get_secret_value()).values()))
            rows += [(name, "-", "no", "env (API_KEYS)") for name in env_names]
            width = max([len(r[0]) for r in rows] + [4])
            print(f"{'name':<{width}}  {'created':<25}  {'disabled':<8}  source")
            for name, created, disabled, source in rows:
                print(f"{name:<{width}}  {created:<25}  {disabled:<8}  {source}")
    except KeyError as exc:
        print(f"no key named {exc.args[0]!r} in Redis", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"Redis is unavailable: {type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
