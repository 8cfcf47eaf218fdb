"""TRUSTED_PROXIES: behind a trusted proxy, rate limits and logs see the caller's address; from
anyone else, X-Forwarded-For is ignored (it could be forged)."""
from __future__ import annotations

import requests

from app.proxies import TrustedProxies
from tests.support.procs import wait_until


def test_client_is_the_rightmost_untrusted_hop():
    proxies = TrustedProxies("10.0.0.0/8, 127.0.0.1, ::1, localhost")
    assert proxies.client("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    # The caller prepended a lie; the proxies appended the truth.
    assert proxies.client("127.0.0.1", "1.2.3.4, 203.0.113.9, 10.1.2.3") == "203.0.113.9"
    assert proxies.client("198.51.100.7", "203.0.113.9") == "198.51.100.7"  # not a proxy: header ignored
    assert proxies.client("127.0.0.1", "not-an-address") == "127.0.0.1"
    assert proxies.client("127.0.0.1", "") == "127.0.0.1"
    assert proxies.client("::1", "2001:db8::5") == "2001:db8::5"
    assert TrustedProxies("localhost").client("127.0.0.1", "203.0.113.9") == "203.0.113.9"  # a host name
    assert not TrustedProxies("")


def _hit(base: str, forwarded_for: str) -> int:
    return requests.get(base + "/api/v1/workflows", headers={"X-Forwarded-For": forwarded_for}, timeout=5).status_code


def test_rate_limits_and_logs_see_the_caller_behind_a_trusted_proxy(fleet_factory):
    fleet = fleet_factory(TRUSTED_PROXIES="127.0.0.1", RATE_LIMIT="3/minute")
    fleet.start_api()
    assert [_hit(fleet.url, "203.0.113.5") for _ in range(3)] == [200, 200, 200]
    assert _hit(fleet.url, "203.0.113.5") == 429
    assert _hit(fleet.url, "203.0.113.6") == 200  # another caller behind the same proxy: its own budget
    wait_until(lambda: "from 203.0.113.5" in fleet.api.output(), 5, what="the 429 logged with the caller")


def test_without_trusted_proxies_forwarded_for_is_ignored(fleet_factory):
    fleet = fleet_factory(RATE_LIMIT="3/minute")
    fleet.start_api()
    assert [_hit(fleet.url, f"203.0.113.{i}") for i in range(3)] == [200, 200, 200]
    assert _hit(fleet.url, "203.0.113.99") == 429  # a forged header buys no new budget
    wait_until(lambda: "from 127.0.0.1" in fleet.api.output(), 5, what="the 429 logged with the peer")
