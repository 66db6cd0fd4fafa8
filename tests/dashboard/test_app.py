"""The dashboard page (bridge/dashboard/static/app.js) in headless Chromium against a real
``market-bridge run`` with the simulator: every pair appears in the token's zone, a dropped
tick is counted and the row re-syncs from the retained snapshot, the page reconnects after a
restart on the same ports, and it connects with no credentials when there is no token."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, WebSocketRoute
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from bridge.auth import SigningKey, mint_token
from bridge.config import DEV_SECRET_PATH
from bridge.keys import generate_dev_secret
from feeds.simulator import DEFAULT_MARKETS
from tests.conftest import Proc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
TOPICS = sorted(f"market/{exchange}/{pair}" for exchange, pair in DEFAULT_MARKETS)
WAIT_MS = 20_000


class Node:
    """``market-bridge run`` with the simulator; ``restart`` comes back on the same ports."""

    def __init__(self, procs: Callable[..., Proc], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        if not (tmp_path / DEV_SECRET_PATH).exists():
            generate_dev_secret(tmp_path / DEV_SECRET_PATH)
        self._key = SigningKey("dev", (tmp_path / DEV_SECRET_PATH).read_text().strip().encode(), "HS256")
        self._procs = procs
        self._env = {
            "MARKET_BRIDGE_FEEDS": json.dumps([{"kind": "simulator", "interval_s": 0.2, "seed": 7}]),
            "MARKET_BRIDGE_BROKER__DRAIN_TIMEOUT_S": "2",
            **(env or {}),
        }
        self.ports = {"tcp": 0, "ws": 0, "http": 0}
        self.proc = self._start()

    def _start(self) -> Proc:
        env = {
            **self._env,
            "MARKET_BRIDGE_LISTENERS__TCP__PORT": str(self.ports["tcp"]),
            "MARKET_BRIDGE_LISTENERS__WS__PORT": str(self.ports["ws"]),
            "MARKET_BRIDGE_HTTP__PORT": str(self.ports["http"]),
        }
        proc = self._procs("run", env=env)
        for name, pattern in [
            ("ws", r"listener ws bound to 127\.0\.0\.1:(\d+)"),
            ("tcp", r"listener tcp bound to 127\.0\.0\.1:(\d+)"),
            ("http", r"http listening on 127\.0\.0\.1:(\d+)"),
        ]:
            self.ports[name] = int(proc.wait_for_line(pattern).group(1))
        return proc

    def restart(self, *, crash: bool = False) -> None:
        if crash:
            self.proc.popen.kill()
        self.proc.stop()
        self.proc = self._start()

    def url(self, token: str | None) -> str:
        return f"http://127.0.0.1:{self.ports['http']}/" + (f"#token={token}" if token else "")

    def token(self, sub: str, tz: str | None = None) -> str:
        return mint_token(self._key, sub=sub, role="subscriber", now=time.time(), ttl_s=600, tz=tz)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the tests that neither restart it nor change its config: each start costs
    seconds on a loaded machine. Tests on it use their own topics' state, never counts
    that another test could have moved."""
    cwd = tmp_path_factory.mktemp("shared-node")
    started: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        started.append(Proc(*args, cwd=cwd, env=env))
        return started[-1]

    try:
        yield Node(start, cwd)
    finally:
        for proc in started:
            proc.stop()


def wait_connected(page: Page) -> None:
    page.wait_for_selector('#state[data-state="connected"]', timeout=WAIT_MS)


def wait_all_rows(page: Page) -> None:
    page.wait_for_function(
        "(n) => document.querySelectorAll('tr[data-topic]').length >= n", arg=len(TOPICS), timeout=WAIT_MS
    )


def row_seqs(page: Page) -> dict[str, int]:
    seqs: dict[str, int] = page.eval_on_selector_all(
        "tr[data-topic]",
        "rows => Object.fromEntries(rows.map(r => [r.dataset.topic, Number(r.dataset.seq)]))",
    )
    return seqs


def test_every_simulated_pair_appears_with_times_in_the_token_zone(
    page: Page, shared: Node, tmp_path: Path
) -> None:
    node = shared
    token = node.token("lagos-viewer", tz="Africa/Lagos")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(node.url(token))
    wait_connected(page)
    wait_all_rows(page)
    # A few ticks per row: prices flash on change, sparklines have a line.
    first = row_seqs(page)
    page.wait_for_function(
        "(low) => [...document.querySelectorAll('tr[data-topic]')].every(r => Number(r.dataset.seq) >= low + 3)",
        arg=min(first.values()),
        timeout=WAIT_MS,
    )

    assert (
        page.eval_on_selector_all("tr[data-topic]", "rows => rows.map(r => r.dataset.topic).sort()") == TOPICS
    )
    exchanges = page.eval_on_selector_all("section.exchange h2", "hs => hs.map(h => h.textContent)")
    assert exchanges == sorted({exchange for exchange, _ in DEFAULT_MARKETS})
    times = page.eval_on_selector_all("td.time", "cells => cells.map(c => c.textContent)")
    assert len(times) == len(TOPICS)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d \+01:00", t) for t in times), times
    assert page.text_content("#zone") == "Africa/Lagos (UTC+01:00)"
    assert page.text_content("#who") == "lagos-viewer (token)"
    for cell in ["bid", "ask", "last", "volume_24h"]:
        values = page.eval_on_selector_all(f"td.{cell}", "cells => cells.map(c => c.textContent)")
        assert all(re.fullmatch(r"\d+(\.\d+)?", v) for v in values), (cell, values)
    points = page.eval_on_selector_all("svg.spark polyline", "ls => ls.map(l => l.getAttribute('points'))")
    assert all(len(p.split(" ")) >= 3 for p in points), points
    assert page.locator("td[data-flash]").count() > 0  # a flash on change
    assert page.eval_on_selector_all("tr[data-topic]", "rows => rows.map(r => r.dataset.gaps)") == [
        "0"
    ] * len(TOPICS)
    # The token stays in the fragment: no request carried it.
    assert requested
    assert not [url for url in requested if token in url]

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "dashboard.png")


def _drop_one_publish(data: bytes, topic: bytes) -> bytes | None:
    """``data`` (whole MQTT packets, as the broker writes them) without the first live
    PUBLISH to ``topic``; None when there is none."""
    at = 0
    while at < len(data):
        start = at
        kind = data[at]
        at += 1
        length, shift = 0, 0
        while True:
            byte = data[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        end = at + length
        # PUBLISH, RETAIN 0 (a live tick, not a snapshot), topic as the first field.
        if kind >> 4 == 3 and not kind & 1:
            size = int.from_bytes(data[at : at + 2], "big")
            if data[at + 2 : at + 2 + size] == topic:
                return data[:start] + data[end:]
        at = end
    return None


def test_a_dropped_tick_is_counted_and_the_row_resyncs_from_the_snapshot(page: Page, shared: Node) -> None:
    node = shared
    target = "market/valr/BTC-ZAR"
    drop = threading.Event()
    dropped: list[bytes] = []

    # The test sits between the page and the broker and loses one tick on the way.
    def relay(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        ws.on_message(server.send)

        def to_page(message: str | bytes) -> None:
            if isinstance(message, bytes) and drop.is_set() and not dropped:
                rest = _drop_one_publish(message, target.encode())
                if rest is not None:
                    dropped.append(message)
                    if not rest:
                        return
                    message = rest
            ws.send(message)

        server.on_message(to_page)

    page.route_web_socket(re.compile(r".*/mqtt$"), relay)
    page.goto(node.url(node.token("gap-viewer", tz="Africa/Lagos")))
    wait_connected(page)
    row = f'tr[data-topic="{target}"]'
    page.wait_for_selector(f'{row}[data-seq]:not([data-seq="null"])', timeout=WAIT_MS)
    assert page.get_attribute(row, "data-gaps") == "0"
    before = row_seqs(page)[target]

    drop.set()
    page.wait_for_selector(f'{row}[data-gaps="1"]', timeout=WAIT_MS)
    assert dropped
    # Re-synced: the exact-topic subscription brought the retained snapshot, then went away.
    page.wait_for_selector(f'{row}[data-resyncs="1"]:not(.resyncing)', timeout=WAIT_MS)
    assert page.get_attribute(f"{row} td.gaps", "title") == "1 tick(s) missed, 1 re-sync(s)"
    resynced = row_seqs(page)[target]
    assert resynced > before
    # The stream goes on gap-free, and no other row counted anything.
    page.wait_for_function(
        "([row, seq]) => Number(document.querySelector(row).dataset.seq) >= seq + 3",
        arg=[row, resynced],
        timeout=WAIT_MS,
    )
    assert page.get_attribute(row, "data-gaps") == "1"
    gaps = page.eval_on_selector_all(
        "tr[data-topic]", "rows => Object.fromEntries(rows.map(r => [r.dataset.topic, r.dataset.gaps]))"
    )
    assert {topic for topic, count in gaps.items() if count != "0"} == {target}


@pytest.mark.timeout(90)
def test_the_page_reconnects_after_the_broker_restarts_on_the_same_ports(
    page: Page, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    node = Node(procs, tmp_path)
    page.goto(node.url(node.token("restart-viewer", tz="Africa/Lagos")))
    wait_connected(page)
    wait_all_rows(page)
    ports = dict(node.ports)
    before = row_seqs(page)

    node.proc.stop()  # SIGTERM: a graceful stop closes the WebSocket
    page.wait_for_selector('#state:not([data-state="connected"])', timeout=WAIT_MS)
    # The retry line is empty while an attempt runs (it says the next one's delay): wait for
    # it, polling on a timer (animation frames may be throttled on a loaded machine).
    try:
        page.wait_for_function(
            "() => /\\(retry \\d+ in \\d+\\.\\d s\\)/.test(document.querySelector('#retry').textContent)",
            polling=100,
            timeout=WAIT_MS,
        )
    except PlaywrightTimeoutError:
        state, retry = page.text_content("#state"), page.text_content("#retry")
        raise AssertionError(f"no retry line: state {state!r}, retry {retry!r}") from None
    node.restart()
    assert node.ports == ports

    # Backoff with full jitter: the attempt due when the node is back may wait up to 16 s
    # after a few seconds down (longer on a loaded machine).
    page.wait_for_selector('#state[data-state="connected"]', timeout=45_000)
    assert page.get_attribute("#reconnects", "data-count") == "1"
    # Ticks resume on every row, from where the clean stop left the numbers: no gap.
    page.wait_for_function(
        "(before) => [...document.querySelectorAll('tr[data-topic]')]"
        ".every(r => Number(r.dataset.seq) > before[r.dataset.topic] + 2)",
        arg=before,
        timeout=WAIT_MS,
    )
    assert page.eval_on_selector_all("tr[data-topic]", "rows => rows.map(r => r.dataset.gaps)") == [
        "0"
    ] * len(TOPICS)
    assert page.text_content("#state") == "connected"


def test_without_a_token_the_page_connects_with_no_credentials(
    page: Page, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    # Auth off stands in for public access: the page sends no username and no password.
    node = Node(procs, tmp_path, env={"MARKET_BRIDGE_AUTH__ENABLED": "false"})
    page.goto(node.url(None))
    wait_connected(page)
    wait_all_rows(page)
    assert page.text_content("#who") == "anonymous (public access)"
    # No token, no token zone: the configured default (UTC) with its offset.
    assert page.text_content("#zone") == "UTC (UTC+00:00)"
    times = page.eval_on_selector_all("td.time", "cells => cells.map(c => c.textContent)")
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d \+00:00", t) for t in times), times


def test_a_refused_token_shows_the_refusal_and_backs_off(page: Page, shared: Node) -> None:
    node = shared
    forged = node.token("mallory")[:-4] + "AAAA"
    page.goto(node.url(forged))
    # One look inside the page: a retry with full jitter may start (and change the state
    # line) a moment after the refusal is shown, so the three are read together.
    page.wait_for_function(
        """() => {
            const state = document.getElementById("state");
            return state.dataset.state === "refused"
                && state.textContent.includes("Not authorized")
                && /\\(retry \\d+ in \\d+\\.\\d s\\)/.test(document.getElementById("retry").textContent);
        }""",
        timeout=WAIT_MS,
    )
    assert page.locator("tr[data-topic]").count() == 0


def test_a_node_that_is_not_serving_yet_is_retried_not_taken_for_off(page: Page, shared: Node) -> None:
    """config.json answers 503 while a graceful stop has closed the WebSocket listener (or
    before it is up): the page retries with its backoff and connects once it is served. It
    took the 503 for "listener off" and stopped trying (a race of the restart test)."""
    asked: list[int] = []

    def unavailable(route: Route) -> None:
        asked.append(1)
        if len(asked) <= 2:
            route.fulfill(status=503, content_type="application/json", body='{"error": "unavailable"}')
        else:
            route.continue_()

    page.route("**/dashboard/config.json", unavailable)
    page.goto(shared.url(shared.token("patient-viewer")))
    wait_connected(page)
    assert len(asked) == 3
    wait_all_rows(page)
