"""Shared fixtures: a real broker on 127.0.0.1 (ephemeral ports) and real paho clients.

The broker runs on its own event loop in a thread, so tests drive paho's blocking API
directly and wait on events with deadlines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import paho.mqtt.client as mqtt
import pytest
import redis
from hypothesis import settings
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.auth import Role, SigningKey, mint_token
from bridge.config import BridgeConfig
from bridge.core.tick import Tick
from bridge.edge.broker import MarketBroker
from bridge.http import HttpServer
from bridge.runtime import loop_factory
from tests.redis_server import RedisProcess

# Property tests: no per-example deadline (a loaded machine is slow, not wrong) and the same
# examples on every run, so a failure reproduces instead of coming and going.
settings.register_profile("market-bridge", deadline=None, derandomize=True)
settings.load_profile("market-bridge")

T = TypeVar("T")
DEADLINE_S = 10.0
# `make unit-uvloop` runs the whole suite on uvloop: test loops, broker threads, subprocesses.
EVENT_LOOP: Literal["asyncio", "uvloop"] = (
    "uvloop" if os.environ.get("BRIDGE_TEST_EVENT_LOOP") == "uvloop" else "asyncio"
)
Transport = Literal["tcp", "websockets"]
_ids = itertools.count(1)


def unique(prefix: str = "id") -> str:
    """Unique names per test so clients and topics never collide."""
    return f"{prefix}-{next(_ids)}"


TEST_SECRET = "market-bridge-test-secret-0123456789abcdef"
TEST_KEY = SigningKey(kid="test", key=TEST_SECRET.encode(), algorithm="HS256")


def token_for(
    sub: str, role: Role = "admin", *, ttl_s: float = 3600, now: float | None = None, **extra: Any
) -> str:
    """A token signed with the test key that :func:`bridge_config` trusts."""
    return mint_token(
        TEST_KEY,
        sub=sub,
        role=role,
        now=time.time() if now is None else now,
        ttl_s=ttl_s,
        extra=extra or None,
    )


def connect_packet(
    client_id: str | bytes,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
    will_qos: int = 0,
    will_retain: bool = False,
    username: bytes | None = None,
    password: bytes | None = None,
    level: int = 4,
) -> bytes:
    """A raw MQTT 3.1.1 CONNECT, for tests that need to misbehave below paho."""
    flags = 0x02 if clean else 0
    payload = _mqtt_str(client_id if isinstance(client_id, bytes) else client_id.encode())
    if will is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += _mqtt_str(will[0].encode()) + _mqtt_str(will[1])
    if username is not None:
        flags |= 0x80
        payload += _mqtt_str(username)
    if password is not None:
        flags |= 0x40
        payload += _mqtt_str(password)
    variable = _mqtt_str(b"MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big")
    return _packet(0x10, variable + payload)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 0) -> bytes:
    return _packet(0x82, packet_id.to_bytes(2, "big") + _mqtt_str(topic_filter.encode()) + bytes([qos]))


def mqtt_str(data: bytes) -> bytes:
    """An MQTT length-prefixed string (the length wraps: callers make bad ones on purpose)."""
    return (len(data) & 0xFFFF).to_bytes(2, "big") + data


def varint(value: int) -> bytes:
    """An MQTT remaining length, however large (tests make oversized ones on purpose)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


_mqtt_str = mqtt_str
_packet = packet


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE_S, what: str = "condition") -> None:
    """Poll ``predicate`` until true, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        threading.Event().wait(0.01)


def make_tick(exchange: str = "luno", pair: str = "BTC-ZAR", last: str = "1250000", **extra: Any) -> Tick:
    fields: dict[str, Any] = {
        "exchange": exchange,
        "pair": pair,
        "bid": "1249000",
        "ask": "1251000",
        "last": last,
        "volume_24h": "12.5",
        "ts": datetime(2026, 11, 30, 11, 0, tzinfo=UTC),
    }
    fields.update(extra)
    return Tick(**fields)


def authed_connect(client_id: str, *, role: Role = "admin", **kwargs: Any) -> bytes:
    """A raw CONNECT carrying a valid token for user ``client_id``."""
    return connect_packet(
        client_id, username=client_id.encode(), password=token_for(client_id, role).encode(), **kwargs
    )


# Each broker gets its own embedded store file, removed when the test session ends.
_STORE_DIR = tempfile.TemporaryDirectory(prefix="market-bridge-tests-")


def bridge_config(**overrides: Any) -> BridgeConfig:
    data: dict[str, Any] = {
        "store": {"path": str(Path(_STORE_DIR.name) / f"{unique('store')}.sqlite3")},
        "listeners": {"ws": {"port": 0}, "tcp": {"port": 0}},
        "feeds": [],
        "auth": {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]},
    }
    for key, value in overrides.items():
        data[key] = value
    return BridgeConfig(**data)


def describe_task(task: asyncio.Task[Any]) -> str:
    """The task's name and its await chain down to where it waits."""
    chain: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"{task.get_name()}: " + " -> ".join(chain)


async def settle_tasks(deadline_s: float = 5.0) -> list[str]:
    """Wait (with a deadline) for the loop's other tasks to end. Those that do not are
    described, then cancelled and given the deadline again: a task left pending when its
    loop closes is destroyed later and reported in whichever test the collector runs, so
    the test that left it must fail instead (with the list this returns)."""
    here = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not here]
    if left:
        await asyncio.wait(left, timeout=deadline_s)
    stuck = [task for task in left if not task.done()]
    described = [describe_task(task) for task in stuck]
    for task in stuck:
        task.cancel()
    if stuck:
        await asyncio.wait(stuck, timeout=deadline_s)
    return described


class BrokerThread:
    """A MarketBroker on its own loop in a daemon thread; ``stop()`` shuts it down."""

    def __init__(self, config: BridgeConfig, *, http: bool = False, **broker_kwargs: Any) -> None:
        self.config = config
        self._with_http = http
        self.http: HttpServer | None = None
        self._kwargs = broker_kwargs
        self.loop = loop_factory(EVENT_LOOP)()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True)
        self._broker: MarketBroker | None = None

    def __enter__(self) -> BrokerThread:
        self._thread.start()
        self._broker = self.run(self._start())
        return self

    @property
    def broker(self) -> MarketBroker:
        assert self._broker is not None, "broker not running"
        return self._broker

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> MarketBroker:
        broker = MarketBroker(self.config, **self._kwargs)
        await broker.start()
        if self._with_http:
            self.http = await HttpServer(broker, "127.0.0.1", 0).__aenter__()
        return broker

    @property
    def http_url(self) -> str:
        assert self.http is not None, "started without http=True"
        return f"http://127.0.0.1:{self.http.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE_S) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    @property
    def tcp_port(self) -> int:
        return self.broker.bound_port("tcp")

    @property
    def ws_port(self) -> int:
        return self.broker.bound_port("ws")

    def port(self, transport: Transport) -> int:
        return self.tcp_port if transport == "tcp" else self.ws_port

    def _task_dump(self) -> str:
        return self.call(lambda: "\n".join(describe_task(task) for task in asyncio.all_tasks(self.loop)))

    def stop(self) -> None:
        if self.http is not None:
            http, self.http = self.http, None
            self.run(http.__aexit__(None, None, None))
        if self._broker is not None:
            broker, self._broker = self._broker, None
            try:
                self.run(broker.shutdown(), timeout=30)
            except TimeoutError:
                pytest.fail("broker shutdown hung; tasks:\n" + self._task_dump())
            stuck = self.run(settle_tasks(), timeout=30)
            if stuck:
                self._close_loop()
                pytest.fail("tasks left running after shutdown:\n" + "\n".join(stuck))
        self._close_loop()

    def _close_loop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(DEADLINE_S)
            self.loop.close()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False


# MQTT 5 reason code (as paho reports it) -> MQTT 3.1.1 CONNACK return code.
_V311_CONNACK = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class Client:
    """A paho-mqtt 3.1.1 client over TCP or WebSocket with blocking, deadline-bound helpers."""

    def __init__(
        self,
        port: int,
        *,
        transport: Transport = "tcp",
        client_id: str | None = None,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        ws_path: str = "/mqtt",
    ) -> None:
        self.client_id = client_id or unique("client")
        self.port = port
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.session_present: bool | None = None  # from the last CONNACK
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnected = threading.Event()
        self.messages_arrived = threading.Event()
        self._mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            transport=transport,
            reconnect_on_failure=False,
        )
        if transport == "websockets":
            self._mqtt.ws_set_options(path=ws_path)
        if username is not None:
            self._mqtt.username_pw_set(username, password)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_disconnect = self._on_disconnect

    @property
    def paho(self) -> mqtt.Client:
        return self._mqtt

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: ReasonCode, _p: Properties | None) -> None:
        self.session_present = bool(flags.session_present)
        # paho 2.x reports MQTT 5 reason codes even for 3.1.1; map back to the CONNACK byte.
        self.connack.put(_V311_CONNACK.get(rc.value, rc.value))

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup)))
        self.messages_arrived.set()

    def _on_subscribe(
        self, _c: Any, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Properties | None
    ) -> None:
        self.subacks.put([rc.value for rc in rcs])

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: ReasonCode, _p: Properties | None) -> None:
        self.disconnected.set()

    def connect(self, *, keepalive: int = 30, expect: int = 0) -> int:
        self._mqtt.connect("127.0.0.1", self.port, keepalive=keepalive)
        self._mqtt.loop_start()
        code = self.connack.get(timeout=DEADLINE_S)
        assert code == expect, f"CONNACK {code}, expected {expect}"
        return code

    def subscribe(self, topic_filter: str | list[tuple[str, int]], qos: int = 0) -> list[int]:
        if isinstance(topic_filter, str):
            self._mqtt.subscribe(topic_filter, qos)
        else:
            self._mqtt.subscribe(topic_filter)
        return self.subacks.get(timeout=DEADLINE_S)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        info = self._mqtt.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(DEADLINE_S)

    def expect(self, count: int, timeout: float = DEADLINE_S) -> list[Received]:
        """Exactly the next ``count`` messages, failing after ``timeout``."""
        return [self.messages.get(timeout=timeout) for _ in range(count)]

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()


if EVENT_LOOP == "uvloop":

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """pytest-asyncio's test loops on uvloop too (the hook exists only for that run)."""
        return {"uvloop": loop_factory("uvloop")}


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One real redis-server for the whole test session."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    """The session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_process.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_process.url


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(bridge_config()) as running:
        yield running


def persistent_client(
    clients: Callable[..., Client], port: int, user: str, client_id: str, **kwargs: Any
) -> Client:
    """A not-yet-connected subscriber with a persistent session (clean_session=False) for ``user``."""
    return clients(
        port,
        client_id=client_id,
        clean_session=False,
        username=user,
        password=token_for(user, "subscriber"),
        **kwargs,
    )


def go_offline(broker: BrokerThread, clients: Callable[..., Client], user: str, client_id: str) -> None:
    """A persistent session for ``user`` subscribed to its own topics, then disconnected."""
    phone = persistent_client(clients, broker.tcp_port, user, client_id)
    phone.connect()
    assert phone.subscribe(f"user/{user}/#", qos=1) == [1]
    phone.close()
    wait_until(lambda: client_id not in broker.call(lambda: dict(broker.broker._connections)), what="offline")


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Clients that log in with a fresh token (role ``admin`` unless told) unless given credentials."""
    made: list[Client] = []

    def factory(port: int, *, role: Role = "admin", anonymous: bool = False, **kwargs: Any) -> Client:
        if not anonymous and kwargs.get("password") is None:
            kwargs["username"] = kwargs.get("username") or unique("user")
            kwargs["password"] = token_for(kwargs["username"], role)
        client = Client(port, **kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


class Proc:
    """A running ``market-bridge`` with its stdout lines collected by a reader thread."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_BRIDGE_")}
        full_env["MARKET_BRIDGE_BROKER__EVENT_LOOP"] = EVENT_LOOP
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_line(self, pattern: str, *, silence_s: float = 3 * DEADLINE_S) -> re.Match[str]:
        """The first line matching ``pattern``; fails when the process exits first or prints
        nothing for ``silence_s`` (a cold start imports a lot: generous on a loaded machine)."""
        regex = re.compile(pattern)
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"process exited before {pattern!r}:\n" + "\n".join(self.lines))
                if not self._changed.wait(silence_s):
                    pytest.fail(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(DEADLINE_S * 2)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
            self._reader.join(DEADLINE_S)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """``market-bridge`` subprocesses run in a scratch directory (the demo writes var/ there)."""
    started: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(*args, cwd=tmp_path, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
