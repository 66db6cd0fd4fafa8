"""The bridge process end to end (graceful SIGTERM during a stream and during an offline replay,
``seq`` across kill -9 and clean restarts), and the open files limit it raises at startup."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import random
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import httpx
import pytest

from bench.mqttws import handshake_request
from bridge import runtime
from bridge.auth import Role, SigningKey, mint_token
from bridge.config import DEV_SECRET_PATH
from bridge.core.sequencer import MIN_BLOCK, OVERRUN_PER_S, RENEW_S
from bridge.errors import ConfigError
from bridge.keys import generate_dev_secret
from bridge.runtime import FD_HEADROOM, raise_open_files_limit
from tests.conftest import DEADLINE_S, Client, Proc, connect_packet, make_tick, subscribe_packet, unique
from tests.edge.test_handler import publish_packet, split_packets

ClientFactory = Callable[..., Client]
EPHEMERAL = {
    "MARKET_BRIDGE_LISTENERS__TCP__PORT": "0",
    "MARKET_BRIDGE_LISTENERS__WS__PORT": "0",
    "MARKET_BRIDGE_HTTP__PORT": "0",
}


class Bridge:
    """``market-bridge run`` in a scratch directory, with its ports and a token minter."""

    def __init__(
        self, procs: Callable[..., Proc], tmp_path: Path, feeds: str = "[]", env: dict[str, str] | None = None
    ) -> None:
        if not (tmp_path / DEV_SECRET_PATH).exists():
            generate_dev_secret(tmp_path / DEV_SECRET_PATH)
        secret = (tmp_path / DEV_SECRET_PATH).read_text().strip().encode()
        self._key = SigningKey("dev", secret, "HS256")
        self.proc = procs(
            "run",
            env={
                **EPHEMERAL,
                "MARKET_BRIDGE_FEEDS": feeds,
                "MARKET_BRIDGE_BROKER__DRAIN_TIMEOUT_S": "3",
                **(env or {}),
            },
        )
        self.tcp = int(self.proc.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1))
        self.http = int(self.proc.wait_for_line(r"http listening on 127\.0\.0\.1:(\d+)").group(1))

    def token(self, sub: str, role: Role) -> str:
        return mint_token(self._key, sub=sub, role=role, now=time.time(), ttl_s=600)

    def terminate(self) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.popen.send_signal(signal.SIGTERM)
        code = self.proc.popen.wait(DEADLINE_S * 2)
        return code, time.monotonic() - started


def test_sigterm_during_a_stream_closes_cleanly_and_keeps_the_snapshot(
    procs: Callable[..., Proc], clients: ClientFactory, tmp_path: Path
) -> None:
    feeds = json.dumps([{"kind": "simulator", "interval_s": 0.05, "seed": 1, "markets": ["luno/BTC-ZAR"]}])
    bridge = Bridge(procs, tmp_path, feeds)
    sub = clients(bridge.tcp, username="viewer", password=bridge.token("viewer", "subscriber"))
    sub.connect()
    sub.subscribe("market/#")
    seqs = [json.loads(m.payload)["seq"] for m in sub.expect(20)]
    assert httpx.get(f"http://127.0.0.1:{bridge.http}/readyz").status_code == 200

    code, took = bridge.terminate()
    assert code == 0
    assert took < 3 + 5  # drain deadline plus shutdown
    assert sub.disconnected.wait(DEADLINE_S)
    bridge.proc.wait_for_line(r"draining: closing listeners")

    again = Bridge(procs, tmp_path, "[]")
    late = clients(again.tcp, username="viewer", password=again.token("viewer", "subscriber"))
    late.connect()
    late.subscribe("market/#")
    snapshot = json.loads(late.expect(1)[0].payload)
    # The snapshot saved on the way down is at least as new as what the subscriber saw.
    assert snapshot["seq"] >= max(seqs)
    assert again.terminate()[0] == 0


def test_sigterm_during_offline_replay_loses_nothing(
    procs: Callable[..., Proc], clients: ClientFactory, tmp_path: Path
) -> None:
    bridge = Bridge(procs, tmp_path)
    user, phone_id = unique("alice"), unique("phone")

    def phone(port: int, token: str) -> Client:
        client = clients(port, client_id=phone_id, clean_session=False, username=user, password=token)
        client.connect()
        return client

    first = phone(bridge.tcp, bridge.token(user, "subscriber"))
    first.subscribe(f"user/{user}/#", qos=1)
    first.close()
    service = clients(bridge.tcp, username="svc", password=bridge.token("svc", "service"))
    service.connect()
    total = 300
    for index in range(total):
        service.publish(f"user/{user}/fills", f"m{index}".encode(), qos=1)

    during = phone(bridge.tcp, bridge.token(user, "subscriber"))
    got_during = {during.expect(1)[0].payload}  # the replay has started
    code, _took = bridge.terminate()
    assert code == 0
    while not during.messages.empty():
        got_during.add(during.messages.get_nowait().payload)

    again = Bridge(procs, tmp_path)
    after = phone(again.tcp, again.token(user, "subscriber"))
    expected = {f"m{index}".encode() for index in range(total)}
    got_after: set[bytes] = set()
    deadline = time.monotonic() + DEADLINE_S * 3
    while (got_during | got_after) != expected and time.monotonic() < deadline:
        got_after.add(after.expect(1)[0].payload)
    assert got_during | got_after == expected
    assert again.terminate()[0] == 0


# --- seq across restarts: never a number twice per topic, even after kill -9 ------------------

SEQ_TOPICS = [("luno", "BTC-ZAR"), ("luno", "ETH-ZAR"), ("valr", "USDC-ZAR"), ("quidax", "USDT-NGN")]
# No per-connection publish limit: one feed sends ~2,000 ticks/s.
UNLIMITED = {"MARKET_BRIDGE_LIMITS__RATE__PUBLISH_PER_S": "0"}


def _raw_login(port: int, user: str, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(connect_packet(user, username=user.encode(), password=token.encode()))
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        assert chunk, f"{user}: closed before CONNACK"
        connack += chunk
    assert connack == b"\x20\x02\x00\x00", f"{user}: refused {connack!r}"
    return sock


class TickFeed:
    """A feed on a bare TCP socket: QoS 0 ticks round-robin over SEQ_TOPICS at ``rate`` per
    second, from a thread, until closed or the broker goes away."""

    def __init__(self, bridge: Bridge, rate: int = 2000) -> None:
        self.sock = _raw_login(bridge.tcp, "feeder", bridge.token("feeder", "feed"))
        ticks = [make_tick(*SEQ_TOPICS[i % len(SEQ_TOPICS)], last=str(i + 1)) for i in range(200)]
        self._packets = [publish_packet(tick.topic, tick.encode()) for tick in ticks]
        self._per_batch = rate // 100  # every 10 ms
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tick-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due, index = time.monotonic(), 0
        while not self._stop.is_set():
            batch = [self._packets[(index + k) % len(self._packets)] for k in range(self._per_batch)]
            index += self._per_batch
            try:
                self.sock.sendall(b"".join(batch))
            except OSError:
                return  # the broker is gone
            self.sent += len(batch)
            due += 0.01
            self._stop.wait(max(0.0, due - time.monotonic()))  # pacing, and the stop signal

    def close(self) -> None:
        self._stop.set()
        self._thread.join(DEADLINE_S)
        self.sock.close()


class SeqRecorder:
    """A subscriber to ``market/#`` on a bare TCP socket: every live tick's seq, per topic."""

    def __init__(self, bridge: Bridge) -> None:
        user = unique("viewer")
        self.sock = _raw_login(bridge.tcp, user, bridge.token(user, "subscriber"))
        self.live: dict[str, list[int]] = {}
        self.snapshots: dict[str, int] = {}
        self.count = 0
        self.closed = False
        self._subscribed = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="seq-recorder", daemon=True)
        self._thread.start()
        self.sock.sendall(subscribe_packet(1, "market/#"))
        assert self._subscribed.wait(DEADLINE_S), "no SUBACK"  # every later tick arrives live

    def _run(self) -> None:
        buffer = bytearray()
        self.sock.settimeout(None)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer.extend(chunk)
            for packet in split_packets(buffer):
                if packet.kind == 9:
                    self._subscribed.set()
                if packet.kind != 3:
                    continue
                seq = int(packet.tick()["seq"])
                with self._changed:
                    if packet.retain:
                        self.snapshots[packet.topic] = seq
                    else:
                        self.live.setdefault(packet.topic, []).append(seq)
                        self.count += 1
                    self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, count: int) -> None:
        """Until ``count`` live ticks arrived (failing after a deadline)."""
        deadline = time.monotonic() + DEADLINE_S
        with self._changed:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    pytest.fail(f"got {self.count} of {count} ticks (closed: {self.closed})")
                self._changed.wait(left)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(DEADLINE_S)


def _seq_env(kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if kind == "redis":
        return {**UNLIMITED, "MARKET_BRIDGE_STORE__REDIS_URL": request.getfixturevalue("redis_url")}
    return dict(UNLIMITED)  # the embedded store: var/market-bridge.sqlite3 in the scratch directory


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_seq_never_repeats_across_kill_9_restarts(
    procs: Callable[..., Proc], tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """~2,000 ticks/s on four topics, kill -9 at a random point, restart on the same store,
    five times: every topic's live seqs only ever go up, and a restart only jumps forward."""
    rng = random.Random(12)
    seen: dict[str, list[int]] = {}
    killed_at: float | None = None
    for _ in range(5):
        bridge = Bridge(procs, tmp_path, env=_seq_env(kind, request))
        ready = time.monotonic()
        recorder = SeqRecorder(bridge)
        feed = TickFeed(bridge)
        try:
            recorder.wait_for(rng.randint(1, 2500))  # a random point in the stream
            bridge.proc.popen.kill()
            bridge.proc.popen.wait(DEADLINE_S)
        finally:
            feed.close()
            recorder.close()
        for topic, seqs in recorder.live.items():
            before = seen.setdefault(topic, [])
            if before and killed_at is not None:
                # A forward gap of about a block plus the allowance for the time the broker
                # was down (and since its last renewal), never more.
                allowance = OVERRUN_PER_S * (ready - killed_at + RENEW_S + 5)
                assert seqs[0] - before[-1] <= 2 * MIN_BLOCK + allowance, (topic, before[-1], seqs[0])
            before.extend(seqs)
        killed_at = time.monotonic()
    assert set(seen) == {f"market/{exchange}/{pair}" for exchange, pair in SEQ_TOPICS}
    for topic, seqs in seen.items():
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"{topic}: a seq repeated"


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_seq_continues_without_a_gap_after_a_clean_restart(
    procs: Callable[..., Proc], tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    bridge = Bridge(procs, tmp_path, env=_seq_env(kind, request))
    recorder = SeqRecorder(bridge)
    feed = TickFeed(bridge, rate=400)
    try:
        recorder.wait_for(200)
    finally:
        feed.close()
    recorder.wait_for(feed.sent)  # every tick sent was sequenced and seen before the stop
    assert bridge.terminate()[0] == 0
    recorder.close()
    last = {topic: seqs[-1] for topic, seqs in recorder.live.items()}
    assert len(last) == len(SEQ_TOPICS)

    again = Bridge(procs, tmp_path, env=_seq_env(kind, request))
    after = SeqRecorder(again)
    feed = TickFeed(again, rate=400)
    try:
        after.wait_for(len(SEQ_TOPICS) * 3)
    finally:
        feed.close()
    assert again.terminate()[0] == 0
    after.close()
    assert {topic: seqs[0] for topic, seqs in after.live.items()} == {t: n + 1 for t, n in last.items()}
    # The snapshot a new subscriber got is the last tick of the previous run.
    assert after.snapshots == last


class _Limits:
    """A stand-in for the resource module's RLIMIT_NOFILE calls."""

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int, *, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, _: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, _: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


@pytest.mark.parametrize(
    ("soft", "hard", "expected"),
    [
        (1024, 65536, 65536),  # the usual case: raised to the hard limit
        (65536, 65536, 65536),  # already there
        (1024, resource.RLIM_INFINITY, 10_000 + FD_HEADROOM),  # Linux refuses an infinite soft limit
        (resource.RLIM_INFINITY, resource.RLIM_INFINITY, resource.RLIM_INFINITY),
    ],
)
def test_open_files_limit_is_raised_to_what_the_hard_limit_allows(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, expected: int
) -> None:
    limits = _Limits(soft, hard)
    monkeypatch.setattr(runtime, "resource", limits)
    assert raise_open_files_limit(10_000) == expected
    assert limits.limits == (expected, hard)


def test_open_files_limit_below_max_connections_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "resource", _Limits(1024, 4096))
    caplog.set_level(logging.INFO, logger="bridge.runtime")
    assert raise_open_files_limit(10_000) == 4096
    assert "open files limit raised from 1024 to 4096" in caplog.text
    assert "clients past ~3840 will be refused" in caplog.text


def test_open_files_limit_that_cannot_be_raised_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "resource", _Limits(1024, 65536, refuse=True))
    assert raise_open_files_limit(100) == 1024
    assert "could not raise the open files limit from 1024 to 65536" in caplog.text


def test_bridge_started_with_a_low_open_files_limit_raises_it(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Always below the hard limit, so there is something to raise whatever the host allows.
    low = min(soft, 512) if hard == resource.RLIM_INFINITY else min(soft, 512, hard - 1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the child
    try:
        generate_dev_secret(tmp_path / DEV_SECRET_PATH)
        proc = procs(
            "run", env={**EPHEMERAL, "MARKET_BRIDGE_FEEDS": "[]", "MARKET_BRIDGE_HTTP__ENABLED": "false"}
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    proc.wait_for_line(rf"open files limit raised from {low} to \d+")
    proc.wait_for_line(r"listener tcp bound to")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_uses_the_configured_event_loop(loop: Literal["asyncio", "uvloop"]) -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert runtime.run(loop_module(), loop) == loop


def test_uvloop_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError

    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ConfigError, match="uvloop is not installed") as info:
        runtime.run(never(), "uvloop")
    assert info.value.field == "broker.event_loop"


def test_bridge_runs_on_uvloop_when_configured(procs: Callable[..., Proc], tmp_path: Path) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    proc = procs(
        "run",
        env={**EPHEMERAL, "MARKET_BRIDGE_FEEDS": "[]", "MARKET_BRIDGE_BROKER__EVENT_LOOP": "uvloop"},
    )
    proc.wait_for_line(r"event loop: uvloop")
    proc.wait_for_line(r"listener tcp bound to")


def test_tune_gc_freezes_startup_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        runtime.tune_gc()
        assert gc.get_threshold() == (runtime.GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_started_bridge_tunes_its_collector(procs: Callable[..., Proc], tmp_path: Path) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    proc = procs(
        "run", env={**EPHEMERAL, "MARKET_BRIDGE_FEEDS": "[]", "MARKET_BRIDGE_HTTP__ENABLED": "false"}
    )
    match = proc.wait_for_line(r"gc: (\d+) startup objects frozen, thresholds \((\d+),")
    assert int(match.group(1)) > 0
    assert int(match.group(2)) == runtime.GC_GEN0_THRESHOLD


def _upgrade_status(port: int, origin: str) -> int:
    request, _ = handshake_request("127.0.0.1", port, "/mqtt")
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(request[:-2] + f"Origin: {origin}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
    return int(head.split(b" ", 2)[1])


def test_the_dashboards_own_origin_is_allowed_next_to_the_list(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """With ``allowed_origins`` set, the page of the broker's own HTTP server (port 0 here:
    known only once bound) may still open the WebSocket; other pages may not."""
    bridge = Bridge(
        procs,
        tmp_path,
        env={"MARKET_BRIDGE_LISTENERS__WS__ALLOWED_ORIGINS": '["https://dash.example.com"]'},
    )
    ws = int(bridge.proc.wait_for_line(r"listener ws bound to 127\.0\.0\.1:(\d+)").group(1))
    assert _upgrade_status(ws, f"http://127.0.0.1:{bridge.http}") == 101
    assert _upgrade_status(ws, f"http://localhost:{bridge.http}") == 101
    assert _upgrade_status(ws, "https://dash.example.com") == 101
    assert _upgrade_status(ws, f"http://127.0.0.1:{bridge.http + 1}") == 403
    assert bridge.terminate()[0] == 0
