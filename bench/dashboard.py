"""The dashboard in headless Chromium: how fast it fills, tick-to-DOM latency, reconnects.

Starts ``market-bridge run`` with the simulator (14 markets) in a scratch directory, opens the
page with a token (Africa/Lagos) in Debian's Chromium via Playwright, and prints one JSON line
per scenario:

- ``load``: navigation -> connected -> every row on screen (ms).
- ``rate_<ticks/s>``: for ``--seconds`` at each simulator rate, ticks the page took in per
  second (the rows' ``seq`` advance), the latency from a tick's ``ts`` (stamped by the
  simulator in the broker process) to its row's update in the DOM (p50/p99/max ms, from a
  MutationObserver on the rows), row updates per second (at most one per row per frame),
  and the page's gap count (a page that falls behind loses nothing on a WebSocket, so the
  gaps stay 0; the latency is what grows).
- ``reconnect``: ``--restarts`` clean restarts on the same ports: from the new node's
  listener being bound to the page connected again (ms). The page's full-jitter backoff
  dominates it: the attempt in flight when the node comes back decides.

    python -m bench.dashboard [--seconds 10] [--restarts 5] [--rates 70 700 2800]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, sync_playwright

from bridge.auth import SigningKey, mint_token
from bridge.config import DEV_SECRET_PATH
from bridge.keys import generate_dev_secret
from feeds.simulator import DEFAULT_MARKETS

CHROMIUM = os.environ.get("BRIDGE_TEST_CHROMIUM", "/usr/bin/chromium")
MARKETS = len(DEFAULT_MARKETS)

# Rows updated: the latency from the tick's own timestamp to the DOM, kept in the page.
OBSERVER = """
window.__lat = [];
window.__updates = 0;
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((records) => {
    const now = Date.now();
    for (const r of records) {
      const cell = r.target.querySelector && r.target.querySelector("td.time");
      if (!cell || !cell.title) continue;
      window.__updates += 1;
      if (window.__lat.length < 200000) window.__lat.push(now - Date.parse(cell.title));
    }
  }).observe(document.getElementById("markets"), { subtree: true, attributes: true, attributeFilter: ["data-seq"] });
});
"""


class Node:
    """``market-bridge run`` on fixed ports after the first start (port 0 the first time)."""

    def __init__(self, cwd: Path, interval_s: float) -> None:
        self.cwd = cwd
        self.ports = {"ws": 0, "tcp": 0, "http": 0}
        self.interval_s = interval_s
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self) -> float:
        """Start; returns the monotonic time the WebSocket listener was bound."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_BRIDGE_")}
        env.update(
            {
                "MARKET_BRIDGE_LISTENERS__WS__PORT": str(self.ports["ws"]),
                "MARKET_BRIDGE_LISTENERS__TCP__PORT": str(self.ports["tcp"]),
                "MARKET_BRIDGE_HTTP__PORT": str(self.ports["http"]),
                "MARKET_BRIDGE_FEEDS": json.dumps([{"kind": "simulator", "interval_s": self.interval_s}]),
                "MARKET_BRIDGE_LOGGING__LEVEL": "INFO",
                "MARKET_BRIDGE_BROKER__DRAIN_TIMEOUT_S": "2",
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "run"],
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        bound_at = 0.0
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            if match := re.search(r"listener (ws|tcp) bound to [\d.]+:(\d+)", line):
                self.ports[match.group(1)] = int(match.group(2))
                if match.group(1) == "ws":
                    bound_at = time.monotonic()
            if match := re.search(r"http listening on [\d.]+:(\d+)", line):
                self.ports["http"] = int(match.group(1))
                break
            if time.monotonic() > deadline:
                raise SystemExit("the node did not start in 30 s")
        # Keep reading, or a full pipe would stall the node.
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        return bound_at

    @staticmethod
    def _drain(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "max_ms": round(ordered[-1], 1),
    }


def _seqs(page: Page) -> dict[str, int]:
    seqs: dict[str, int] = page.eval_on_selector_all(
        "tr[data-topic]",
        "rows => Object.fromEntries(rows.map(r => [r.dataset.topic, Number(r.dataset.seq)]))",
    )
    return seqs


def _gaps(page: Page) -> int:
    counts: list[str] = page.eval_on_selector_all("tr[data-topic]", "rows => rows.map(r => r.dataset.gaps)")
    return sum(int(c) for c in counts)


def run(seconds: float, restarts: int, rates: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as scratch, sync_playwright() as playwright:
        cwd = Path(scratch)
        generate_dev_secret(cwd / DEV_SECRET_PATH)
        key = SigningKey("dev", (cwd / DEV_SECRET_PATH).read_text().strip().encode(), "HS256")
        token = mint_token(
            key, sub="bench", role="subscriber", now=time.time(), ttl_s=3600, tz="Africa/Lagos"
        )
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for index, rate in enumerate(rates):
                node = Node(cwd, interval_s=MARKETS / rate)
                node.start()
                try:
                    context = browser.new_context()
                    page = context.new_page()
                    page.add_init_script(OBSERVER)
                    started = time.monotonic()
                    page.goto(f"http://127.0.0.1:{node.ports['http']}/#token={token}")
                    page.wait_for_selector('#state[data-state="connected"]', timeout=30_000)
                    connected = time.monotonic()
                    page.wait_for_function(
                        "(n) => document.querySelectorAll('tr[data-topic]').length >= n",
                        arg=MARKETS,
                        timeout=30_000,
                    )
                    if index == 0:
                        filled = time.monotonic()
                        _emit(
                            "load",
                            connected_ms=round((connected - started) * 1000, 1),
                            all_rows_ms=round((filled - started) * 1000, 1),
                        )
                    time.sleep(1.0)  # past the first snapshots
                    page.evaluate("() => { window.__lat = []; window.__updates = 0; }")
                    seqs_before = _seqs(page)
                    time.sleep(seconds)
                    seqs_after = _seqs(page)
                    lat: list[float] = page.evaluate("() => window.__lat")
                    updates: int = page.evaluate("() => window.__updates")
                    _emit(
                        f"rate_{rate}",
                        ticks_per_s=rate,
                        # seq advance over every row (gap-free): what the page took in.
                        received_per_s=round(
                            sum(seqs_after[t] - seqs_before[t] for t in seqs_after) / seconds, 1
                        ),
                        rows_updated_per_s=round(updates / seconds, 1),
                        gaps=_gaps(page),
                        **_percentiles(lat),
                    )
                    if index == len(rates) - 1 and restarts:
                        _reconnects(node, page, restarts)
                    context.close()
                finally:
                    node.stop()
        finally:
            browser.close()


def _reconnects(node: Node, page: Page, restarts: int) -> None:
    took: list[float] = []
    for _ in range(restarts):
        node.stop()
        page.wait_for_selector('#state:not([data-state="connected"])', timeout=30_000)
        bound_at = node.start()
        page.wait_for_selector('#state[data-state="connected"]', timeout=60_000)
        took.append((time.monotonic() - bound_at) * 1000)
    _emit(
        "reconnect",
        restarts=restarts,
        mean_ms=round(statistics.mean(took), 1),
        min_ms=round(min(took), 1),
        max_ms=round(max(took), 1),
        gaps=_gaps(page),
    )


def _emit(scenario: str, **figures: Any) -> None:
    load1, _, _ = os.getloadavg()
    print(json.dumps({"scenario": scenario, **figures, "load1": round(load1, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate")
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument(
        "--rates", type=int, nargs="+", default=[70, 700, 2800], help="ticks/s over 14 markets"
    )
    args = parser.parse_args()
    run(args.seconds, args.restarts, args.rates)


if __name__ == "__main__":
    main()
