"""Trusted proxies: the caller's address behind nginx (TRUSTED_PROXIES).

Without it every caller behind a proxy has the proxy's address, so per-address rate limits and
log lines lump them together. With it, a request whose peer is a trusted proxy gets, as its
REMOTE_ADDR, the right-most address of `X-Forwarded-For` that is not itself a trusted proxy
(a caller can prepend anything to that header, but cannot forge what the proxies appended).
A request from anyone else keeps its peer address: its X-Forwarded-For is ignored.

TRUSTED_PROXIES is a comma list of addresses (`10.0.0.5`), networks (`10.0.0.0/8`) or host
names (`nginx`: the compose service, resolved again every 10 s since containers change address).
The original peer stays in the environ as `comfy.proxy_peer`.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

log = logging.getLogger("comfy.api")
RESOLVE_EVERY = 10.0


def _address(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


class TrustedProxies:
    def __init__(self, spec: str):
        self.networks, self.names = [], []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.names.append(item)
        self._resolved: set = set()
        self._resolved_at = float("-inf")
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.networks or self.names)

    def _named(self) -> set:
        if not self.names:
            return set()
        with self._lock:
            if time.monotonic() - self._resolved_at >= RESOLVE_EVERY:
                found = set()
                for name in self.names:
                    try:
                        found |= {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(name, None)}
                    except (OSError, ValueError) as exc:
                        log.warning("TRUSTED_PROXIES: cannot resolve %s (%s)", name, exc)
                self._resolved, self._resolved_at = found, time.monotonic()
            return self._resolved

    def trusts(self, address) -> bool:
        if address is None:
            return False
        if any(address in net for net in self.networks if net.version == address.version):
            return True
        return address in self._named()

    def client(self, peer: str, forwarded_for: str) -> str:
        """The caller's address: the peer, or, from a trusted proxy, the right-most untrusted hop."""
        if not self.trusts(_address(peer)) or not forwarded_for:
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return peer  # garbage in the header: believe nothing of it
            if not self.trusts(address):
                return str(address)
        return str(_address(hops[0])) if hops else peer  # every hop a proxy: the first one


class ProxyMiddleware:
    """WSGI middleware: REMOTE_ADDR becomes the caller's address (see the module docs)."""

    def __init__(self, app, proxies: TrustedProxies):
        self.app, self.proxies = app, proxies

    def __call__(self, environ, start_response):
        peer = environ.get("REMOTE_ADDR", "")
        client = self.proxies.client(peer, environ.get("HTTP_X_FORWARDED_FOR", ""))
        if client != peer:
            environ["comfy.proxy_peer"] = peer
            environ["REMOTE_ADDR"] = client
        return self.app(environ, start_response)
