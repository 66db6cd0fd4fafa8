"""The dashboard's HTTP routes (bridge/dashboard/routes.py) on a FastAPI app: the page and its
policy, config.json, the fixed file list, and a clear answer when MQTT.js was never fetched."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from bridge.dashboard.routes import (
    STATIC_DIR,
    ListenerUnavailable,
    WsEndpoint,
    content_security_policy,
    router,
)
from bridge.dashboard.vendor import BUNDLE

pytestmark = pytest.mark.timeout(10)

WS = WsEndpoint(port=8083, path="/mqtt", tls=False)


def _vendor(tmp_path: Path, *, bundle: bool = True) -> Path:
    vendor = tmp_path / "vendor"
    vendor.mkdir(parents=True)
    if bundle:
        (vendor / BUNDLE).write_text("var mqtt = {};\n")
        (vendor / "LICENSE.md").write_text("The MIT License\n")
    return vendor


class _Http:
    """GETs against the app on a loop in another thread: the package's Playwright browser
    holds this thread's event loop."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def get(self, path: str) -> httpx.Response:
        async def fetch() -> httpx.Response:
            transport = httpx.ASGITransport(app=self._app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
                return await client.get(path)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, fetch()).result(timeout=5)


def _client(vendor: Path, ws: WsEndpoint | None = WS) -> _Http:
    app = FastAPI()
    app.include_router(router(lambda: ws, vendor_dir=vendor))
    return _Http(app)


@pytest.mark.parametrize(
    ("host", "ws", "connect"),
    [
        ("127.0.0.1", WS, "connect-src 'self' ws://127.0.0.1:8083;"),
        (
            "prices.example.com",
            WsEndpoint(443, "/mqtt", tls=True),
            "connect-src 'self' wss://prices.example.com:443;",
        ),
        ("[::1]", WS, "connect-src 'self' ws://[::1]:8083;"),
        ("127.0.0.1", None, "connect-src 'self';"),
        (None, WS, "connect-src 'self';"),
        # A Host header is the client's: nothing odd reaches the policy.
        ("evil.com; script-src *", WS, "connect-src 'self';"),
        ("a b", WS, "connect-src 'self';"),
    ],
)
def test_the_policy_allows_self_and_exactly_the_mqtt_websocket(
    host: str | None, ws: WsEndpoint | None, connect: str
) -> None:
    policy = content_security_policy(host, ws)
    assert connect in policy
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy
    assert "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy


def test_the_page_comes_with_its_policy(tmp_path: Path) -> None:
    http = _client(_vendor(tmp_path))
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.text == (STATIC_DIR / "index.html").read_text()
    assert "connect-src 'self' ws://127.0.0.1:8083;" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"


def test_without_the_bundle_the_page_says_how_to_fetch_it(tmp_path: Path) -> None:
    http = _client(_vendor(tmp_path, bundle=False))
    page = http.get("/")
    missing = http.get(f"/dashboard/{BUNDLE}")
    assert page.status_code == 503
    assert page.text.count("\n") == 1
    assert "the MQTT.js bundle (npm mqtt 5.16.0) is missing" in page.text
    assert "make install" in page.text
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("name", "media"),
    [
        ("app.js", "text/javascript"),
        ("logic.js", "text/javascript"),
        ("style.css", "text/css"),
        (BUNDLE, "text/javascript"),
        ("LICENSE.md", "text/markdown"),
    ],
)
def test_the_page_files_are_served(tmp_path: Path, name: str, media: str) -> None:
    http = _client(_vendor(tmp_path))
    response = http.get(f"/dashboard/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media)
    assert response.content


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/index.html",
        "/dashboard/routes.py",
        "/dashboard/..%2Froutes.py",
        "/dashboard/%2e%2e",
        "/dashboard/",
    ],
)
def test_nothing_outside_the_list_is_served(tmp_path: Path, path: str) -> None:
    http = _client(_vendor(tmp_path))
    response = http.get(path)
    assert response.status_code == 404


def test_config_names_the_websocket_listener(tmp_path: Path) -> None:
    http = _client(_vendor(tmp_path))
    on = http.get("/dashboard/config.json").json()
    http = _client(_vendor(tmp_path / "off"), ws=None)
    off = http.get("/dashboard/config.json").json()
    assert on == {"ws": {"port": 8083, "path": "/mqtt", "tls": False}}
    assert off == {"ws": None}


def test_a_listener_not_serving_is_503_not_off(tmp_path: Path) -> None:
    def stopping() -> WsEndpoint | None:
        raise ListenerUnavailable("the broker is shutting down")

    app = FastAPI()
    app.include_router(router(stopping, vendor_dir=_vendor(tmp_path)))
    http = _Http(app)
    config = http.get("/dashboard/config.json")
    assert (config.status_code, config.json()) == (
        503,
        {"error": "unavailable", "detail": "the broker is shutting down"},
    )
    page = http.get("/")
    assert page.status_code == 503
    assert "shutting down" in page.text


def test_no_favicon_is_a_quiet_204(tmp_path: Path) -> None:
    http = _client(_vendor(tmp_path))
    assert http.get("/favicon.ico").status_code == 204
