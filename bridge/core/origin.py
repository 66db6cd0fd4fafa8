"""Which web pages may open a WebSocket to the broker: the ``Origin`` allowlist, pure.

A browser sends ``Origin: scheme://host[:port]`` with every WebSocket handshake, and a page
cannot forge it; so a listener with ``allowed_origins`` refuses (HTTP 403, before the upgrade)
handshakes from other pages, and a page on some other site cannot use a visitor's browser to
read the broker. Matching is exact on the normalised origin: scheme and host lower-cased, a
default port (80 for http, 443 for https) dropped, IPv6 hosts in brackets. No wildcards.

A handshake without ``Origin`` is allowed: browsers always send one, and non-browser clients
(paho, phones, feeds) do not, so its absence means "not a web page", which the allowlist is
not about. ``Origin: null`` (sandboxed frames, ``file:`` pages) and more than one ``Origin``
header are refused whenever the list is set.

The dashboard is served by the broker's own HTTP server (bridge/http.py, another port): its
origins (:func:`dashboard_origins`) are added to every list, so setting ``allowed_origins``
never locks out the page the broker itself serves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

__all__ = ["MAX_ORIGIN_CHARS", "OriginPolicy", "dashboard_origins", "normalize_origin"]

# Longer than any real origin (a host name is at most 253 characters).
MAX_ORIGIN_CHARS = 512
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


def normalize_origin(text: str) -> str | None:
    """``text`` as ``scheme://host[:port]`` (see the module docstring), or None when it is not
    a serialised http(s) origin (a path, query, user info, a bad port, ``null``). Never raises."""
    if not text or len(text) > MAX_ORIGIN_CHARS or not text.isascii() or any(c in text for c in " \t\r\n\\"):
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    host = (parts.hostname or "").lower()
    if not host or text.endswith(":"):
        return None
    if ":" in host:  # an IPv6 literal: urlsplit took off its brackets
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return None
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def dashboard_origins(host: str, port: int) -> tuple[str, ...]:
    """The origins a browser gives pages of the broker's HTTP server at ``host``:``port``:
    both loopback names for a loopback address; none for an any-address bind (which name
    people type is unknown: list it in ``allowed_origins``) or port 0 (not bound yet)."""
    if port == 0 or host in _ANY_ADDRESS:
        return ()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    names: Sequence[str] = _LOOPBACK_NAMES if host.lower() in _LOOPBACK_NAMES else (host,)
    found = (normalize_origin(f"{scheme}://{name}:{port}") for name in names for scheme in ("http", "https"))
    return tuple(origin for origin in found if origin is not None)


class OriginPolicy:
    """One listener's allowlist; ``allow`` adds origins later (the dashboard's, once the HTTP
    server's port is known)."""

    __slots__ = ("_allowed",)

    def __init__(self, origins: Iterable[str]) -> None:
        self._allowed: set[str] = set()
        self.allow(origins)

    def allow(self, origins: Iterable[str]) -> None:
        for origin in origins:
            normal = normalize_origin(origin)
            if normal is None:
                raise ValueError(f"{origin[:64]!r} is not an origin (scheme://host[:port])")
            self._allowed.add(normal)

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self._allowed)

    def refusal(self, values: Sequence[str]) -> str | None:
        """Why a handshake with these ``Origin`` header values is refused; None: allowed."""
        if not values:
            return None  # not a browser (see the module docstring)
        if len(values) > 1:
            return "more than one Origin header"
        normal = normalize_origin(values[0])
        if normal is None:
            return "Origin is not an http(s) origin"
        if normal not in self._allowed:
            return "Origin is not allowed"
        return None
