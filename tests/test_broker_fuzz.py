"""Fuzz: a live ``market-bridge run`` fed thousands of hostile inputs per transport (issue #11).

One broker subprocess (JWT auth, TCP and WebSocket listeners, HTTP) serves a feed-role paho
client over TCP publishing valid ticks at ``FEED_RATE_HZ`` to one topic, and a
subscriber-role paho client over WebSocket that checks every message it gets: the feed's
ticks in order, none lost, none from anyone else (hostile ticks are marked), ``seq`` the
previous one + 1, never ``MAX_SILENCE_S`` without one, and nothing on its own ``user/``
topics. A probe thread asks ``GET /healthz`` every ``HEALTH_INTERVAL_S`` with a
``HEALTH_TIMEOUT_S`` timeout and samples the broker's RSS and CPU.

Hypothesis (derandomized, no database, no shrinking) generates batches of at least
``PER_TRANSPORT`` hostile inputs per transport, every input class equally represented
(tests/hostile.py has the classes), as many batches as give each transport
``MIN_PER_TRANSPORT``. Each input is sent on a fresh short-lived connection, at most
``CONCURRENCY`` at a time. After each batch the service is checked: ``/healthz``
unanswered, the broker gone, RSS over ``RSS_MARGIN_BYTES`` above its baseline, or the
subscriber disconnected or starved stops the run at once. Wrong data (foreign or lost
ticks, seq gaps), client text in the log (a line started by it, raw ESC or NUL) and
connections still open after the run are collected and reported at the end. Then the broker
gets SIGTERM and must exit 0.

A failure names the broker log and, when the service broke, a file with the inputs of the
last batches. ``BRIDGE_FUZZ_ONLY`` / ``BRIDGE_FUZZ_EXCLUDE`` (comma-separated class names)
narrow the run when checking a fix; a narrowed run says so in its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from tests.conftest import DEADLINE_S, TEST_SECRET, Client, Proc, make_tick, token_for, wait_until
from tests.hostile import (
    FEED_USER,
    INJECTED,
    MQTT_CLASSES,
    WATCH_USER,
    WATCHED,
    WS_CLASSES,
    Hostile,
    Transport,
    inputs_for,
)

PER_TRANSPORT = 40  # hostile connections per transport per hypothesis example, at least
MIN_PER_TRANSPORT = 5_000  # examples: as many as this takes (114 for the full set)
CONCURRENCY = 64  # hostile connections open at once
DIAL_TIMEOUT_S = 2.0  # to open a hostile connection
IO_TIMEOUT_S = 2.0
FEED_RATE_HZ = 50
FEED_BASE = 1_000_000  # the feed's n-th tick has last = FEED_BASE + n (hostile ticks: 666)
MAX_SILENCE_S = 2.0
HEALTH_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 2.0
# Measured on 2 shared cores: a run adds 15-25 MB to a ~70 MB broker.
RSS_MARGIN_BYTES = 100 * 2**20
BROKER_CONNECT_TIMEOUT_S = 5  # the config's broker.connect_timeout_s


class Stop(Exception):
    """Raised inside the hypothesis run to end it at the first broken invariant."""


# ---------------------------------------------------------------------------- sending


@dataclass
class SendStats:
    connections: Counter[Transport] = field(default_factory=Counter)
    units: Counter[Transport] = field(default_factory=Counter)
    connect_failures: int = 0
    closed_early: int = 0  # the broker closed before everything was written


async def send_one(hostile: Hostile, port: int, limit: asyncio.Semaphore, stats: SendStats) -> None:
    """Connect, write the chunks, read the answer for ``wait_s`` (if any), leave by FIN or RST."""
    async with limit:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), DIAL_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            stats.connect_failures += 1
            return
        stats.connections[hostile.transport] += 1
        stats.units[hostile.transport] += hostile.units
        if hostile.reset:  # close() then sends RST (set now: the socket may be gone by then)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        try:
            for chunk in hostile.chunks:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT_S)
            if hostile.wait_s:
                async with asyncio.timeout(hostile.wait_s):
                    while await reader.read(65536):
                        pass
        except TimeoutError:
            pass
        except OSError:
            stats.closed_early += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT_S)


async def send_batch(batch: list[Hostile], ports: dict[Transport, int], stats: SendStats) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with asyncio.TaskGroup() as group:
        for hostile in batch:
            group.create_task(send_one(hostile, ports[hostile.transport], limit, stats))


# ---------------------------------------------------------------------------- watchers


class TickWatch:
    """The subscriber's view: the feed's ticks in order, seq +1 each time, never silent for long;
    nothing else, on the watched topic or on the subscriber's own ``user/`` topics."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self.received = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_n: int | None = None  # the last feed tick seen (its number)
        self.last_arrival = time.monotonic()
        self.max_silence = 0.0
        self.problems: list[str] = []
        client.paho.on_message = lambda _c, _u, msg: self._on_message(msg.topic, bytes(msg.payload))

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            problem = self._take(topic, payload)
            if problem is not None and len(self.problems) < 10:
                self.problems.append(problem)

    def _take(self, topic: str, payload: bytes) -> str | None:
        if topic != WATCHED:
            return f"the subscriber got a message on {topic}, where no one may send: {payload[:200]!r}"
        try:
            tick = json.loads(payload)
            n = int(tick["last"]) - FEED_BASE
        except (ValueError, KeyError, TypeError):
            return f"the subscriber got a payload that is no tick: {payload[:200]!r}"
        if n < 0:
            return f"the subscriber got a tick the feed never sent: {payload[:300]!r}"
        now = time.monotonic()
        self.max_silence = max(self.max_silence, now - self.last_arrival)
        self.last_arrival = now
        self.received += 1
        seq, previous_seq, previous_n = tick.get("seq"), self.last_seq, self.last_n
        self.last_n = n
        if not isinstance(seq, int):
            return f"a feed tick without a seq: {payload[:300]!r}"
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq
        if previous_seq is not None and seq != previous_seq + 1:
            return f"seq gap: {previous_seq} then {seq}"
        if previous_n is not None and n != previous_n + 1:
            return f"feed ticks lost or reordered: tick {previous_n} then {n}"
        return None

    def restart_clock(self) -> None:
        with self._lock:
            self.last_arrival = time.monotonic()
            self.max_silence = 0.0

    def broken(self) -> list[str]:
        """Service problems: disconnected, or no tick for too long."""
        with self._lock:
            silence = time.monotonic() - self.last_arrival
        out = [f"the subscriber got no tick for {silence:.1f}s"] if silence > MAX_SILENCE_S else []
        if self.client.disconnected.is_set():
            out.append("the subscriber was disconnected")
        return out


class Feed(threading.Thread):
    """Publishes valid ticks at FEED_RATE_HZ on a monotonic schedule."""

    def __init__(self, client: Client) -> None:
        super().__init__(name="fuzz-feed", daemon=True)
        self.client = client
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopping.is_set():
            self.client.paho.publish(WATCHED, make_tick(last=str(FEED_BASE + self.sent)).encode())
            self.sent += 1
            self.stopping.wait(max(0.0, start + self.sent / FEED_RATE_HZ - time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()
        if self.ident is not None:
            self.join(DEADLINE_S)


class Probe(threading.Thread):
    """``GET /healthz`` every HEALTH_INTERVAL_S (HEALTH_TIMEOUT_S), and the broker's RSS and CPU."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(name="fuzz-probe", daemon=True)
        self.url = url
        self.process = psutil.Process(pid)
        self.process.cpu_percent()  # the first call only starts the measurement
        self.stopping = threading.Event()
        self.answered = 0
        self.last_ok = time.monotonic()
        self.slowest = 0.0
        self.failures: list[tuple[float, str]] = []
        self.rss: list[int] = []
        self.cpu: list[float] = []  # % of one core since the previous sample

    def run(self) -> None:
        with httpx.Client(timeout=HEALTH_TIMEOUT_S) as http:
            while not self.stopping.wait(HEALTH_INTERVAL_S):
                began = time.monotonic()
                try:
                    status = http.get(self.url).status_code
                    error = None if status == 200 else f"HTTP {status}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__} {exc}".strip()
                took = time.monotonic() - began
                try:
                    self.rss.append(self.process.memory_info().rss)
                    self.cpu.append(self.process.cpu_percent())
                except psutil.Error:
                    self.failures.append((began, "the broker process is gone"))
                    return
                if error is None:
                    self.answered += 1
                    self.last_ok = time.monotonic()
                    self.slowest = max(self.slowest, took)
                else:
                    text = f"/healthz failed after {took:.1f}s ({error}); broker CPU {self.cpu[-1]:.0f}%"
                    self.failures.append((began, text))

    def stop(self) -> None:
        self.stopping.set()
        if self.ident is not None:
            self.join(HEALTH_TIMEOUT_S + DEADLINE_S)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_EXCEPTION = re.compile(r"^[A-Za-z_.]+(Error|Exception)\b")


class LogScan:
    """The broker's log: no client text may start a line or put ESC/NUL in one."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.seen = 0
        self.problems: list[str] = []
        self.exceptions: Counter[str] = Counter()

    def scan(self) -> list[str]:
        lines = self.proc.lines[self.seen :]
        self.seen += len(lines)
        for line in lines:
            if line.startswith(INJECTED):
                self._problem(f"client text started a log line: {line[:160]!r}")
            elif "\x1b" in line or "\x00" in line:
                self._problem(f"raw ESC/NUL from a client in the log: {line[:160]!r}")
            elif not _TIMESTAMP.match(line) and _EXCEPTION.match(line):
                self.exceptions[line[:120]] += 1
        return self.problems

    def _problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)


# ---------------------------------------------------------------------------- the test


def _selected_classes() -> tuple[list[str], str]:
    """Class names for this run, and a note when BRIDGE_FUZZ_ONLY / _EXCLUDE narrow it."""
    names = [*MQTT_CLASSES, *WS_CLASSES]
    only = {n for n in os.environ.get("BRIDGE_FUZZ_ONLY", "").split(",") if n}
    exclude = {n for n in os.environ.get("BRIDGE_FUZZ_EXCLUDE", "").split(",") if n}
    unknown = (only | exclude) - set(names)
    assert not unknown, f"unknown fuzz classes {sorted(unknown)}; known: {names}"
    chosen = [n for n in names if (not only or n in only) and n not in exclude]
    note = f" NARROWED (only {sorted(only)}, exclude {sorted(exclude)})" if only or exclude else ""
    return chosen, note


def _batches(
    strategies: dict[Transport, list[tuple[str, st.SearchStrategy[Hostile]]]],
) -> tuple[st.SearchStrategy[tuple[Hostile, ...]], int]:
    """One example: the same number of inputs of every class, per transport; and how many
    examples give each transport MIN_PER_TRANSPORT inputs. (``st.one_of`` would not do: it
    favours its first branches.)"""
    parts: list[st.SearchStrategy[Hostile]] = []
    sizes: list[int] = []
    for pairs in strategies.values():
        each = -(-PER_TRANSPORT // len(pairs))
        parts += [strategy for _, strategy in pairs for _ in range(each)]
        sizes.append(each * len(pairs))
    return st.tuples(*parts), -(-MIN_PER_TRANSPORT // min(sizes)) + 2


def _config(path: Path) -> Path:
    config = {
        "listeners": {"ws": {"port": 0}, "tcp": {"port": 0}},
        "http": {"port": 0},
        "feeds": [],
        "store": {"path": str(path.parent / "fuzz.sqlite3")},
        "auth": {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]},
        "broker": {"drain_timeout_s": 2, "connect_timeout_s": BROKER_CONNECT_TIMEOUT_S},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _open_connections(http_port: int) -> dict[str, int]:
    """Sockets each listener still serves, from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=HEALTH_TIMEOUT_S).text
    found = re.findall(r'^mb_listener_connections\{listener="(\w+)"\} ([0-9.]+)$', text, re.MULTILINE)
    return {name: int(float(value)) for name, value in found}


def _leftover_connections(http_port: int) -> list[str]:
    """Once the hostile clients are gone, only the test's subscriber (ws) and feed (tcp) are
    left: a socket without CONNECT is closed after connect_timeout_s, a gone client at once."""
    began = time.monotonic()
    while (open_now := _open_connections(http_port)) != {"ws": 1, "tcp": 1}:
        waited = time.monotonic() - began
        if waited > 2 * BROKER_CONNECT_TIMEOUT_S:
            return [
                f"{waited:.0f}s after the run, connections still open: {open_now} (the test's own: 1 each)"
            ]
        threading.Event().wait(0.2)
    return []


@dataclass
class Batch:
    began: float
    ended: float
    inputs: list[Hostile]


def _write_suspects(path: Path, batches: Iterable[Batch], since: float) -> int:
    """The inputs of the batches that ended after ``since``, one per line, to replay by hand."""
    count = 0
    with path.open("w") as out:
        for batch in batches:
            if batch.ended < since:
                continue
            for hostile in batch.inputs:
                chunks = ", ".join(repr(c) if len(c) <= 4096 else f"<{len(c)} bytes>" for c in hostile.chunks)
                out.write(f"{hostile!r} chunks=[{chunks}]\n")
                count += 1
    return count


@pytest.mark.timeout(300)
def test_broker_survives_hostile_inputs(
    procs: Callable[..., Proc], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes, narrowed = _selected_classes()
    strategies = inputs_for(classes)
    batches, examples = _batches(strategies)
    broker = procs("run", "--config", str(_config(tmp_path / "fuzz.yaml")))
    ports: dict[Transport, int] = {
        "ws": int(broker.wait_for_line(r"listener ws bound to 127\.0\.0\.1:(\d+)").group(1)),
        "tcp": int(broker.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1)),
    }
    http_port = int(broker.wait_for_line(r"http listening on 127\.0\.0\.1:(\d+)").group(1))
    subscriber = Client(
        ports["ws"],
        transport="websockets",
        client_id=WATCH_USER,
        username=WATCH_USER,
        password=token_for(WATCH_USER, "subscriber"),
    )
    feed_client = Client(
        ports["tcp"], client_id=FEED_USER, username=FEED_USER, password=token_for(FEED_USER, "feed")
    )
    watch = TickWatch(subscriber)
    feed = Feed(feed_client)
    probe = Probe(f"http://127.0.0.1:{http_port}/healthz", broker.popen.pid)
    logs = LogScan(broker)
    stats = SendStats()
    history: deque[Batch] = deque(maxlen=4)  # the last batches, for the failure report
    batch_count = 0
    broken: list[str] = []  # service broke: the run stops
    leaks: list[str] = []
    baseline_rss = 0
    began = time.monotonic()

    def check_service() -> list[str]:
        found = [text for _, text in probe.failures] + watch.broken()
        peak = max(probe.rss, default=0)
        if peak > baseline_rss + RSS_MARGIN_BYTES:
            found.append(f"broker RSS reached {peak / 2**20:.0f} MB from {baseline_rss / 2**20:.0f} MB")
        if broker.popen.poll() is not None:
            found.append(f"the broker exited with {broker.popen.returncode}")
        return found

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(batches)
    def fuzz(runner: asyncio.Runner, drawn: tuple[Hostile, ...]) -> None:
        nonlocal batch_count
        if not broken:  # hypothesis replays the failing example once: send nothing then
            batch = list(drawn)
            random.Random(batch_count).shuffle(batch)
            start = time.monotonic()
            runner.run(send_batch(batch, ports, stats))
            history.append(Batch(start, time.monotonic(), batch))
            batch_count += 1
            broken.extend(check_service())
        if broken:
            raise Stop

    try:
        subscriber.connect(keepalive=10)
        assert subscriber.subscribe([(WATCHED, 0), (f"user/{WATCH_USER}/#", 0)]) == [0, 0]
        feed_client.connect(keepalive=10)
        feed.start()
        wait_until(lambda: watch.received >= FEED_RATE_HZ, what="a second of ticks")
        baseline_rss = psutil.Process(broker.popen.pid).memory_info().rss
        probe.start()
        watch.restart_clock()
        began = time.monotonic()
        with asyncio.Runner() as runner, contextlib.suppress(Stop):
            fuzz(runner)
        if not broken:
            feed.stop()
            wait_until(lambda: watch.last_n == feed.sent - 1, what="the feed's last tick at the subscriber")
            leaks.extend(_leftover_connections(http_port))
    finally:
        wall = time.monotonic() - began
        feed.stop()
        probe.stop()
        subscriber.close()
        feed_client.close()
        stopping = time.monotonic()
        try:
            code: int | None = broker.stop()  # SIGTERM; SIGKILL after 20 s
        except subprocess.TimeoutExpired:
            code = None
        stop_s = time.monotonic() - stopping
        # Client input never makes the broker log a traceback (only our own bugs do).
        log_problems = logs.scan()
        tracebacks = [
            f"{count} traceback(s) ending {line!r}" for line, count in logs.exceptions.most_common(3)
        ]
        problems = list(dict.fromkeys([*broken, *leaks, *watch.problems, *log_problems, *tracebacks]))
        report = (
            f"broker fuzz{narrowed}: {stats.connections['tcp']} TCP connections ({stats.units['tcp']} packets), "
            f"{stats.connections['ws']} WebSocket ({stats.units['ws']} frames and handshakes), "
            f"{batch_count} batches in {wall:.1f}s; connect failures {stats.connect_failures}, "
            f"closed early {stats.closed_early}; ticks {watch.received} of {feed.sent} sent, "
            f"seq {watch.first_seq}..{watch.last_seq}, longest silence {watch.max_silence:.2f}s; "
            f"/healthz {probe.answered} answered (slowest {probe.slowest:.2f}s), {len(probe.failures)} failed; "
            f"RSS {baseline_rss / 2**20:.0f} MB at start, peak {max(probe.rss, default=0) / 2**20:.0f} MB; "
            f"broker CPU peak {max(probe.cpu, default=0):.0f}%; exit code {code} after {stop_s:.1f}s; "
            f"exception lines in the log {sum(logs.exceptions.values())}"
        )
        if not problems:
            with capsys.disabled():
                print(f"\n{report}")
    if problems:
        log = tmp_path / "broker.log"
        log.write_text("\n".join(broker.lines) + "\n")
        where = f"broker log: {log} ({len(broker.lines)} lines)"
        if broken:  # the inputs sent from 1 s before the last good /healthz answer on
            suspects = tmp_path / "suspects.txt"
            since = min([probe.last_ok, *(t for t, _ in probe.failures)]) - 1.0
            where += f"; the {_write_suspects(suspects, history, since)} inputs in flight: {suspects}"
        exceptions = "".join(f"\n  {count} x {line}" for line, count in logs.exceptions.most_common(8))
        pytest.fail(
            "the broker misbehaved under hostile input:\n  "
            + "\n  ".join(problems)
            + f"\n{where}\nexceptions in the log:{exceptions}\n{report}"
        )
    assert code == 0, f"the broker did not stop cleanly\n{report}"
    for transport in strategies if narrowed else ("tcp", "ws"):
        assert stats.connections[transport] >= MIN_PER_TRANSPORT, report
