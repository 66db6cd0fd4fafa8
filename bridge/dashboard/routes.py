"""The dashboard's HTTP routes: the page at ``/``, its static files, and where to connect.

- ``GET /``: ``static/index.html`` with a Content-Security-Policy that allows only this
  server's scripts and styles and a WebSocket to the MQTT listener; 503 with a one-line
  explanation when the MQTT.js bundle was never fetched (``make install``).
- ``GET /dashboard/<name>``: the page's own files and the vendored bundle with its licence,
  from a fixed list (no path from the URL reaches the file system).
- ``GET /dashboard/config.json``: ``{"ws": {"port", "path", "tls"} | null}``, the WebSocket
  listener as bound (``port: 0`` works); the page takes the host from its own address.
  While the listener is configured but not serving (a graceful stop has closed it, or it
  is not up yet) both answer 503: the page retries, instead of taking it for "off".

The token never reaches the server: the page reads it from the URL fragment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from bridge.dashboard.vendor import BUNDLE, MQTT_VERSION, VENDOR_DIR

__all__ = ["STATIC_DIR", "ListenerUnavailable", "WsEndpoint", "content_security_policy", "router"]

STATIC_DIR: Final = Path(__file__).resolve().with_name("static")


class ListenerUnavailable(Exception):
    """The WebSocket listener is configured but not serving now; the text says why."""


@dataclass(frozen=True, slots=True)
class WsEndpoint:
    """The MQTT-over-WebSocket listener as the browser must reach it."""

    port: int
    path: str
    tls: bool


# A Host header is the client's: only a plain name, IPv4 or bracketed IPv6 goes into the policy.
_HOST: Final = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])$")


def content_security_policy(host: str | None, ws: WsEndpoint | None) -> str:
    """Self only, plus exactly the MQTT WebSocket (another port is another origin to CSP).

    ``worker-src blob:``: MQTT.js runs its keep-alive timer in a worker it builds from a blob
    (background tabs throttle page timers below the keep-alive); only our scripts can make one.
    """
    connect = "'self'"
    if ws is not None and host is not None and _HOST.match(host):
        connect += f" {'wss' if ws.tls else 'ws'}://{host}:{ws.port}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {connect}",
            "worker-src blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


# name -> (directory, media type): the only files served under /dashboard/.
_FILES: Final = {
    "app.js": (STATIC_DIR, "text/javascript"),
    "logic.js": (STATIC_DIR, "text/javascript"),
    "style.css": (STATIC_DIR, "text/css"),
    BUNDLE: (VENDOR_DIR, "text/javascript"),
    "LICENSE.md": (VENDOR_DIR, "text/markdown"),
}
_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page and its scripts change with the package: revalidate, never serve stale code.
    "Cache-Control": "no-cache",
}


def router(ws_endpoint: Callable[[], WsEndpoint | None], vendor_dir: Path = VENDOR_DIR) -> APIRouter:
    """Routes for one HTTP server; ``ws_endpoint`` is asked per request (listeners may rebind):
    None when the listener is off, :class:`ListenerUnavailable` while it is not serving."""
    routes = APIRouter(include_in_schema=False)
    files = {
        name: (vendor_dir if where == VENDOR_DIR else where, media) for name, (where, media) in _FILES.items()
    }

    @routes.get("/")
    async def page(request: Request) -> Response:
        try:
            ws = ws_endpoint()
        except ListenerUnavailable as exc:
            return PlainTextResponse(
                f"market-bridge dashboard: {exc}; reload in a moment.\n", status_code=503
            )
        headers = {**_HEADERS, "Content-Security-Policy": content_security_policy(request.url.hostname, ws)}
        if not (vendor_dir / BUNDLE).is_file():
            return PlainTextResponse(
                f"market-bridge dashboard: the MQTT.js bundle (npm mqtt {MQTT_VERSION}) is missing from"
                f" {vendor_dir}; run `make install` (or `python -m bridge.dashboard.vendor`) once, with"
                " network access, then reload.\n",
                status_code=503,
                headers=headers,
            )
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    @routes.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)  # none: browsers ask on every page load

    @routes.get("/dashboard/config.json")
    async def config() -> JSONResponse:
        try:
            ws = ws_endpoint()
        except ListenerUnavailable as exc:
            return JSONResponse(
                {"error": "unavailable", "detail": str(exc)}, status_code=503, headers=_HEADERS
            )
        body = None if ws is None else {"port": ws.port, "path": ws.path, "tls": ws.tls}
        return JSONResponse({"ws": body}, headers=_HEADERS)

    @routes.get("/dashboard/{name}")
    async def static(name: str) -> Response:
        entry = files.get(name)
        if entry is None or not (entry[0] / name).is_file():
            return JSONResponse({"error": "not_found", "detail": "no such dashboard file"}, status_code=404)
        directory, media = entry
        return FileResponse(directory / name, media_type=media, headers=_HEADERS)

    return routes
