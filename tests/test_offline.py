"""Offline delivery end to end: real broker, real paho clients, on the embedded store and on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from bridge.auth import Role, SigningKey, mint_token
from bridge.config import DEV_SECRET_PATH, BridgeConfig, LoggingConfig
from bridge.core.sequencer import MIN_BLOCK, NEW_TOPICS, ReservedSequencer
from bridge.core.store import OfflineStore, Priority, QueueLimits, SeqReservation, StoreUnavailable
from bridge.errors import MessageError
from bridge.keys import generate_dev_secret
from bridge.logs import log_handler
from bridge.offline import SeqReserver
from bridge.redis_store import RedisStore
from bridge.sqlite_store import SqliteStore
from broker_plugins.offline_store import open_store
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    Proc,
    bridge_config,
    connect_packet,
    go_offline,
    make_tick,
    persistent_client,
    subscribe_packet,
    token_for,
    unique,
    wait_until,
)
from tests.edge.test_handler import Packet, RawClient, puback_packet, split_packets
from tests.edge.test_outbound import _subscribe_raw
from tests.redis_server import RedisProcess
from tests.store_faults import Fault, set_fault

ClientFactory = Callable[..., Client]


class Clock:
    """Wall time plus an offset the test moves forward (tokens stay valid for an hour)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(params=["embedded", "redis"])
def store_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(store_overrides: dict[str, Any], clock: Clock) -> Iterator[BrokerThread]:
    store = {**bridge_config().store.model_dump(), **store_overrides, "queue_max_messages": 5}
    with BrokerThread(bridge_config(store=store), clock=clock) as running:
        yield running


def envelope(payload: str, priority: str = "NORMAL", ttl_s: float = 600) -> bytes:
    return json.dumps({"mb_envelope": 1, "payload": payload, "priority": priority, "ttl_s": ttl_s}).encode()


def _come_back(broker: BrokerThread, clients: ClientFactory, user: str, client_id: str) -> Client:
    phone = clients(
        broker.ws_port,
        transport="websockets",
        client_id=client_id,
        clean_session=False,
        username=user,
        password=token_for(user, "subscriber"),
    )
    phone.connect()
    return phone


def _queue(broker: BrokerThread, user: str) -> tuple[int, int]:
    store = broker.broker.store
    assert store is not None
    return broker.run(store.queue_size(user))


def test_queued_messages_arrive_by_priority_then_fifo(broker: BrokerThread, clients: ClientFactory) -> None:
    user, phone_id = unique("alice"), unique("phone")
    go_offline(broker, clients, user, phone_id)
    service = clients(broker.tcp_port, role="service")
    service.connect()
    sent = [("n1", "NORMAL"), ("l1", "LOW"), ("u1", "URGENT"), ("h1", "HIGH"), ("u2", "URGENT")]
    for text, priority in sent:
        service.publish(f"user/{user}/alerts", envelope(text, priority), qos=1)
    assert _queue(broker, user)[0] == 5

    phone = _come_back(broker, clients, user, phone_id)
    got = phone.expect(5)
    assert [m.payload.decode() for m in got] == ["u1", "u2", "h1", "n1", "l1"]
    assert all(m.qos == 1 and m.topic == f"user/{user}/alerts" for m in got)
    wait_until(lambda: _queue(broker, user) == (0, 0), what="acked messages removed")
    # Counted when the replay ends, just after its last acknowledged message left the store.
    wait_until(lambda: broker.call(lambda: broker.broker.stats.offline_replayed) == 5, what="the count")


def test_expired_messages_are_dropped_and_counted(
    broker: BrokerThread, clients: ClientFactory, clock: Clock
) -> None:
    user, phone_id = unique("alice"), unique("phone")
    go_offline(broker, clients, user, phone_id)
    service = clients(broker.tcp_port, role="service")
    service.connect()
    service.publish(f"user/{user}/a", envelope("stale", ttl_s=60), qos=1)
    service.publish(f"user/{user}/a", envelope("fresh", ttl_s=3000), qos=1)
    clock.offset = 120  # two minutes later: the first has expired
    phone = _come_back(broker, clients, user, phone_id)
    (only,) = phone.expect(1)
    assert only.payload == b"fresh"
    wait_until(lambda: broker.call(lambda: broker.broker.stats.offline_expired) == 1, what="expiry counted")


def test_full_queue_evicts_lowest_priority_oldest_and_tells_the_service(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user, phone_id = unique("alice"), unique("phone")
    go_offline(broker, clients, user, phone_id)
    service_user = unique("svc")
    service = clients(broker.tcp_port, username=service_user, password=token_for(service_user, "service"))
    service.connect()
    assert service.subscribe(f"service/{service_user}/#", qos=1) == [1]
    for index in range(5):  # the limit in this fixture
        service.publish(f"user/{user}/a", envelope(f"low{index}", "LOW"), qos=1)
    service.publish(f"user/{user}/a", envelope("urgent", "URGENT"), qos=1)
    (notice,) = service.expect(1)
    body = json.loads(notice.payload)
    assert notice.topic == f"service/{service_user}/evictions"
    assert (body["user"], body["reason"], len(body["evicted"])) == (user, "queue_full", 1)
    assert body["evicted"][0]["priority"] == "LOW"
    phone = _come_back(broker, clients, user, phone_id)
    assert [m.payload.decode() for m in phone.expect(5)] == ["urgent", "low1", "low2", "low3", "low4"]
    assert broker.call(lambda: broker.broker.stats.offline_evicted) == 1


def test_message_leaves_the_store_only_after_puback_and_is_redelivered_with_dup(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user, phone_id = unique("alice"), unique("phone")
    go_offline(broker, clients, user, phone_id)
    service = clients(broker.tcp_port, role="service")
    service.connect()
    for index in range(3):
        service.publish(f"user/{user}/fills", envelope(f"fill{index}"), qos=1)

    # A phone that receives but never acknowledges, then drops mid-replay.
    sock = socket.create_connection(("127.0.0.1", broker.tcp_port), timeout=DEADLINE_S)
    sock.sendall(
        connect_packet(
            phone_id, clean=False, username=user.encode(), password=token_for(user, "subscriber").encode()
        )
    )
    assert sock.recv(4) == b"\x20\x02\x01\x00"  # CONNACK, session present
    received = b""
    deadline = time.monotonic() + DEADLINE_S
    while received.count(b"/fills") < 3 and time.monotonic() < deadline:
        received += sock.recv(4096)
    assert received.count(b"/fills") == 3
    sock.close()
    assert _queue(broker, user)[0] == 3  # nothing was acknowledged, nothing left the store

    phone = _come_back(broker, clients, user, phone_id)
    got = phone.expect(3)
    assert [m.payload.decode() for m in got] == ["fill0", "fill1", "fill2"]
    assert all(m.dup for m in got)
    wait_until(lambda: _queue(broker, user)[0] == 0, what="acked")


def test_online_user_gets_messages_at_once_and_nothing_is_stored(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user = unique("alice")
    laptop = clients(broker.tcp_port, username=user, password=token_for(user, "subscriber"))
    laptop.connect()
    laptop.subscribe(f"user/{user}/#", qos=1)
    tablet = clients(
        broker.ws_port, transport="websockets", username=user, password=token_for(user, "subscriber")
    )
    tablet.connect()
    tablet.subscribe(f"user/{user}/#", qos=0)
    result = broker.run(broker.broker.send_to_user(user, "alerts", b"hello", priority=Priority.HIGH))
    assert (result.delivered, result.stored) == (2, None)
    assert laptop.expect(1)[0].payload == b"hello"
    (on_tablet,) = tablet.expect(1)
    assert (on_tablet.payload, on_tablet.qos) == (b"hello", 0)
    assert _queue(broker, user) == (0, 0)


def test_send_to_user_from_python_stores_for_an_offline_user(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user, phone_id = unique("alice"), unique("phone")
    go_offline(broker, clients, user, phone_id)
    result = broker.run(broker.broker.send_to_user(user, f"user/{user}/notices", b"kyc ok", ttl_s=60))
    assert result.delivered == 0
    assert result.stored is not None
    assert (result.stored.priority, result.stored.topic) == (Priority.NORMAL, f"user/{user}/notices")
    phone = _come_back(broker, clients, user, phone_id)
    assert phone.expect(1)[0].payload == b"kyc ok"


@pytest.mark.parametrize("topic", ["", "user/bob/x", "a/+/b", "x/"])
def test_send_to_user_refuses_bad_addresses(broker: BrokerThread, topic: str) -> None:
    with pytest.raises(MessageError):
        broker.run(broker.broker.send_to_user("alice", topic or "user/alice/", b"x"))


def test_malformed_envelope_is_refused_and_never_stored(broker: BrokerThread, clients: ClientFactory) -> None:
    user, phone_id = unique("alice"), unique("phone")
    go_offline(broker, clients, user, phone_id)
    service = clients(broker.tcp_port, role="service")
    service.connect()
    service.publish(f"user/{user}/a", b'{"mb_envelope": 1, "priority": "SOON", "payload": "x"}', qos=1)
    service.publish(f"user/{user}/a", envelope("ok"), qos=1)
    assert _queue(broker, user)[0] == 1
    assert broker.call(lambda: broker.broker.stats.publishes_dropped["bad_priority"]) == 1
    assert not service.disconnected.is_set()


def test_market_ticks_are_not_queued_offline(broker: BrokerThread, clients: ClientFactory) -> None:
    user, phone_id = unique("alice"), unique("phone")
    phone = persistent_client(clients, broker.tcp_port, user, phone_id)
    phone.connect()
    phone.subscribe("market/#", qos=1)
    phone.close()
    wait_until(lambda: phone_id not in broker.call(lambda: dict(broker.broker._connections)), what="offline")
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    for last in ("1", "2", "3"):
        feed.publish("market/luno/BTC-ZAR", make_tick(last=last).encode(), qos=1)
    back = _come_back(broker, clients, user, phone_id)
    (snapshot,) = back.expect(1)
    assert (snapshot.retain, json.loads(snapshot.payload)["last"]) == (True, "3")
    assert _queue(broker, user) == (0, 0)


def test_subscriptions_are_listed_per_user(broker: BrokerThread, clients: ClientFactory) -> None:
    user, phone_id = unique("alice"), unique("phone")
    phone = persistent_client(clients, broker.tcp_port, user, phone_id)
    phone.connect()
    phone.subscribe([(f"user/{user}/#", 1), ("market/luno/+", 0)])
    wait_until(
        lambda: (
            broker.run(broker.broker.user_subscriptions(user))
            == {phone_id: {f"user/{user}/#": 1, "market/luno/+": 0}}
        ),
        what="subscriptions persisted",
    )


def test_redis_outage_keeps_ticks_flowing_and_send_fails_clearly(
    tmp_path: Any, clients: ClientFactory
) -> None:
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        config = bridge_config(store={"redis_url": redis.url})
        with BrokerThread(config) as running:
            user, phone_id = unique("alice"), unique("phone")
            go_offline(running, clients, user, phone_id)
            before = running.run(running.broker.send_to_user(user, "a", b"before outage"))
            assert before.stored is not None

            watcher = clients(running.ws_port, transport="websockets")
            watcher.connect()
            watcher.subscribe("market/#")
            feed = clients(running.tcp_port, role="feed")
            feed.connect()
            redis.stop()
            for last in ("10", "11", "12"):
                feed.publish("market/luno/BTC-ZAR", make_tick(last=last).encode())
            assert [json.loads(m.payload)["last"] for m in watcher.expect(3)] == ["10", "11", "12"]
            with pytest.raises(StoreUnavailable):
                running.run(running.broker.send_to_user(user, "a", b"during outage"))

            redis.start()
            wait_until(
                lambda: _try_send(running, user, b"after outage"),
                timeout=DEADLINE_S * 2,
                what="store back without a restart",
            )
            feed.publish("market/luno/BTC-ZAR", make_tick(last="13").encode())
            assert json.loads(watcher.expect(1)[0].payload)["last"] == "13"
            phone = _come_back(running, clients, user, phone_id)
            assert [m.payload for m in phone.expect(2)] == [b"before outage", b"after outage"]
    finally:
        redis.stop()


def _try_send(broker: BrokerThread, user: str, payload: bytes) -> bool:
    try:
        broker.run(broker.broker.send_to_user(user, "a", payload))
    except StoreUnavailable:
        return False
    return True


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_sigkill_restart_loses_nothing_stored(
    procs: Callable[..., Proc],
    clients: ClientFactory,
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
) -> None:
    """Kill -9 the broker process, start it again: queue, subscriptions and snapshots are back."""
    env, token, start = _processes(procs, tmp_path, kind, request)

    first, port = start()
    user, phone_id = unique("alice"), unique("phone")
    phone = clients(
        port, client_id=phone_id, clean_session=False, username=user, password=token(user, "subscriber")
    )
    phone.connect()
    assert phone.subscribe([(f"user/{user}/#", 1), ("market/#", 0)]) == [1, 0]
    phone.close()
    feed = clients(port, username="feeder", password=token("feeder", "feed"))
    feed.connect()
    for last in ("1", "2"):
        feed.publish("market/valr/ETH-ZAR", make_tick("valr", "ETH-ZAR", last=last).encode(), qos=1)
    service = clients(port, username="svc", password=token("svc", "service"))
    service.connect()
    for index, priority in enumerate(["LOW", "URGENT", "NORMAL", "URGENT", "HIGH"]):
        # QoS 1: the PUBACK comes only once the message is stored.
        service.publish(f"user/{user}/orders", envelope(f"m{index}", priority), qos=1)
    # Let the snapshot writer run (1 s interval): ticks are written behind, not per tick.
    first.wait_for_line(rf"disconnected .*\(user {re.escape(user)}\)")  # the phone's session is left
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and not _snapshot_saved(tmp_path, kind, env):
        threading.Event().wait(0.1)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(DEADLINE_S)

    second, port = start()
    back = clients(
        port, client_id=phone_id, clean_session=False, username=user, password=token(user, "subscriber")
    )
    back.connect()
    got = back.expect(6)
    snapshot = next(m for m in got if m.topic.startswith("market/"))
    assert (snapshot.retain, json.loads(snapshot.payload)["last"], json.loads(snapshot.payload)["seq"]) == (
        True,
        "2",
        2,
    )
    orders = [m.payload.decode() for m in got if m.topic.startswith("user/")]
    assert orders == ["m1", "m3", "m4", "m2", "m0"]
    # Sequencing continues after the restart, past the whole block reserved before the kill:
    # a forward gap (resync from the snapshot), never a number sent before.
    feed = clients(port, username="feeder", password=token("feeder", "feed"))
    feed.connect()
    feed.publish("market/valr/ETH-ZAR", make_tick("valr", "ETH-ZAR", last="3").encode())
    live = back.expect(1)[0]
    assert json.loads(live.payload)["seq"] > 2 + MIN_BLOCK
    assert second.stop() == 0


def _snapshot_saved(tmp_path: Path, kind: str, env: dict[str, str]) -> bool:
    """Peek at the store from outside the broker, as an operator would."""

    async def look() -> bool:
        config = load_config_with(env, tmp_path)
        store = await open_store(config.store)
        try:
            return any(s.topic == "market/valr/ETH-ZAR" and s.seq == 2 for s in await store.load_snapshots())
        finally:
            await store.close()

    return asyncio.run(look())


def load_config_with(env: dict[str, str], cwd: Path) -> BridgeConfig:
    store: dict[str, Any] = {"path": str(cwd / "var" / "market-bridge.sqlite3")}
    if "MARKET_BRIDGE_STORE__REDIS_URL" in env:
        store["redis_url"] = env["MARKET_BRIDGE_STORE__REDIS_URL"]
    return bridge_config(store=store)


def test_messages_racing_a_disconnect_are_not_lost(broker: BrokerThread, clients: ClientFactory) -> None:
    """Sent while the phone is hanging up: acknowledged live, or stored and replayed, never dropped."""
    user, phone_id = unique("alice"), unique("phone")
    store = {**broker.config.store.model_dump(), "queue_max_messages": 100}
    with BrokerThread(bridge_config(store=store)) as running:
        phone = persistent_client(clients, running.tcp_port, user, phone_id)
        phone.connect()
        phone.subscribe(f"user/{user}/#", qos=1)
        service = clients(running.tcp_port, role="service")
        service.connect()
        phone.paho.disconnect()
        for index in range(50):
            service.publish(f"user/{user}/fills", f"m{index}".encode(), qos=1)
        phone.paho.loop_stop()
        early = set()
        while not phone.messages.empty():
            early.add(phone.messages.get_nowait().payload)
        back = _come_back(running, clients, user, phone_id)
        # A message that reached the phone as it hung up, unacknowledged, comes again (QoS 1
        # is at least once): read until every one has arrived, failing if one never does.
        wanted = {f"m{index}".encode() for index in range(50)}
        late: set[bytes] = set()
        while early | late != wanted:
            late.add(back.messages.get(timeout=DEADLINE_S).payload)
        assert early | late == wanted


# --- the mailbox: a persistent user's message is stored first and leaves only on PUBACK ------


def test_an_online_phone_that_does_not_ack_gets_its_messages_again_with_their_ids(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user = unique("alice")  # RawClient logs in as user = client id
    phone = RawClient(broker.tcp_port, role="subscriber", client_id=user, clean=False)
    _subscribe_raw(phone, f"user/{user}/#", 1)
    service = clients(broker.tcp_port, role="service")
    service.connect()
    for index in range(3):
        service.publish(f"user/{user}/fills", envelope(f"fill{index}"), qos=1)  # PUBACK: stored
    first = [phone.read() for _ in range(3)]
    assert [(p.payload, p.dup) for p in first] == [(f"fill{i}".encode(), False) for i in range(3)]
    assert _queue(broker, user)[0] == 3  # delivered, not acknowledged: still in the mailbox
    phone.close()

    back = RawClient(broker.tcp_port, role="subscriber", client_id=user, clean=False)
    again = [back.read() for _ in range(3)]
    assert [(p.payload, p.dup, p.packet_id) for p in again] == [(p.payload, True, p.packet_id) for p in first]
    back.send(b"".join(puback_packet(p.packet_id or 0) for p in again))
    wait_until(lambda: _queue(broker, user)[0] == 0, what="acknowledged messages removed")
    assert back.ping() == []  # not sent a third time by the replay
    back.close()


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_sigkill_with_an_online_unacknowledging_user_loses_nothing_acknowledged(
    procs: Callable[..., Proc],
    clients: ClientFactory,
    tmp_path: Path,
    kind: str,
    qos: int,
    request: pytest.FixtureRequest,
) -> None:
    """Was: the service got 10 PUBACKs, the phone held the 10 unacknowledged, kill -9: 0 of 10."""
    _, token, start = _processes(procs, tmp_path, kind, request)

    first, port = start()
    user, phone_id = unique("alice"), unique("phone")
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(
        connect_packet(
            phone_id, clean=False, username=user.encode(), password=token(user, "subscriber").encode()
        )
        + subscribe_packet(1, f"user/{user}/#", qos)
    )
    service = clients(port, username="svc", password=token("svc", "service"))
    service.connect()
    for index in range(10):
        service.publish(f"user/{user}/fills", f"fill{index}".encode(), qos=qos)  # each acknowledged
    before = _read_publishes(sock, 10)  # on the phone, none acknowledged
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(DEADLINE_S)
    sock.close()

    second, port = start()
    back = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    back.sendall(
        connect_packet(
            phone_id, clean=False, username=user.encode(), password=token(user, "subscriber").encode()
        )
    )
    after = _read_publishes(back, 10)
    assert [p.payload for p in after] == [f"fill{i}".encode() for i in range(10)]
    # The same packet ids as before the crash, with DUP ([MQTT-4.4.0-1], [MQTT-3.3.1-1]).
    assert [(p.packet_id, p.dup, p.qos) for p in after] == [(p.packet_id, True, qos) for p in before]
    if qos == 1:
        back.sendall(b"".join(puback_packet(p.packet_id or 0) for p in after))
    back.close()
    assert second.stop() == 0


def _read_publishes(sock: socket.socket, count: int) -> list[Packet]:
    """The next ``count`` PUBLISH packets on a raw socket (CONNACK and SUBACK skipped)."""
    buffer = bytearray()
    found: list[Packet] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(found) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} PUBLISH packets"
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "closed"
        buffer.extend(chunk)
        found.extend(p for p in split_packets(buffer) if p.kind == 3)
    return found


def test_a_qos2_mailbox_message_half_done_at_disconnect_does_not_delay_the_next_connect(
    clients: ClientFactory,
) -> None:
    """Was: PUBREC then a disconnect made the next CONNECT wait for amqtt's PUBCOMP timeout."""
    config = bridge_config(broker={"takeover_timeout_s": 60})
    with BrokerThread(config) as running:
        user = unique("alice")
        phone = RawClient(running.tcp_port, role="subscriber", client_id=user, clean=False)
        _subscribe_raw(phone, f"user/{user}/#", 2)
        phone.close()
        service = clients(running.tcp_port, role="service")
        service.connect()
        service.publish(f"user/{user}/fills", b"fill", qos=2)  # stored: the phone is away

        back = RawClient(running.tcp_port, role="subscriber", client_id=user, clean=False)
        (publish,) = _read_publishes(back.sock, 1)
        assert (publish.qos, publish.payload) == (2, b"fill")
        assert publish.packet_id is not None
        back.send(b"\x50\x02" + publish.packet_id.to_bytes(2, "big"))  # PUBREC
        assert back.read().first == 0x62  # PUBREL
        back.close()  # before PUBCOMP

        # Within the test's deadline, far below the 60 s takeover timeout.
        again = RawClient(running.tcp_port, role="subscriber", client_id=user, clean=False)
        assert again.session_present
        pubrel = again.read()
        assert (pubrel.first, pubrel.packet_id) == (0x62, publish.packet_id)
        again.send(b"\x70\x02" + publish.packet_id.to_bytes(2, "big"))  # PUBCOMP
        wait_until(lambda: _queue(running, user)[0] == 0, what="completed message removed")
        assert again.ping() == []
        again.close()


class _Start(Protocol):
    def __call__(self) -> tuple[Proc, int]: ...


def _processes(
    procs: Callable[..., Proc], tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> tuple[dict[str, str], Callable[[str, Role], str], _Start]:
    """``market-bridge run`` on free ports with the dev key and the ``kind`` store: its
    environment, a token minter for that key, and a start() giving (process, TCP port)."""
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    env = {
        "MARKET_BRIDGE_LISTENERS__TCP__PORT": "0",
        "MARKET_BRIDGE_LISTENERS__WS__PORT": "0",
        "MARKET_BRIDGE_HTTP__PORT": "0",
        "MARKET_BRIDGE_FEEDS": "[]",
    }
    if kind == "redis":
        env["MARKET_BRIDGE_STORE__REDIS_URL"] = request.getfixturevalue("redis_url")
    key = SigningKey("dev", (tmp_path / DEV_SECRET_PATH).read_text().strip().encode(), "HS256")

    def token(sub: str, role: Role) -> str:
        return mint_token(key, sub=sub, role=role, now=time.time(), ttl_s=600)

    def start() -> tuple[Proc, int]:
        proc = procs("run", env=env)
        return proc, int(proc.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1))

    return env, token, start


@dataclass
class _Stream:
    user: str
    phone_id: str
    service: Client
    acked: set[int]  # paho mids acknowledged so far
    index_of: dict[int, int]  # paho mid -> message index


def _stream_to_offline_user(
    clients: ClientFactory, port: int, token: Callable[[str, Role], str], *, total: int, acked_first: int
) -> _Stream:
    """A user's persistent session subscribed to ``user/<user>/#`` goes offline; a service then
    streams ``total`` QoS 1 messages to it with 100 in flight (so they are stored in groups).
    Returns once ``acked_first`` are acknowledged, the stream still going."""
    user, phone_id = unique("alice"), unique("phone")
    phone = clients(
        port, client_id=phone_id, clean_session=False, username=user, password=token(user, "subscriber")
    )
    phone.connect()
    assert phone.subscribe(f"user/{user}/#", 1) == [1]
    phone.close()
    service = clients(port, username="svc", password=token("svc", "service"))
    paho = service.paho
    paho.max_inflight_messages_set(100)
    service.connect()
    acked: set[int] = set()
    some = threading.Event()

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        acked.add(mid)
        if len(acked) >= acked_first:
            some.set()

    paho.on_publish = on_publish
    index_of = {paho.publish(f"user/{user}/fills", b"%d" % i, qos=1).mid: i for i in range(total)}
    assert some.wait(DEADLINE_S)
    return _Stream(user, phone_id, service, acked, index_of)


@pytest.mark.parametrize(
    ("kind", "fault"), [("embedded", "full"), ("embedded", "read_only"), ("redis", "full")]
)
def test_a_store_that_cannot_write_still_replays_what_it_holds(
    tmp_path: Path, clients: ClientFactory, caplog: pytest.LogCaptureFixture, kind: str, fault: Fault
) -> None:
    """A full disk (or Redis at maxmemory, or a file system gone read-only): what is stored is
    still delivered, readiness says why the store is failing, and the log stays short."""
    caplog.set_level(logging.INFO)
    out = io.StringIO()
    handler = log_handler(LoggingConfig(), stream=out, clock=lambda: 0.0)  # one rate-limit window
    logging.getLogger().addHandler(handler)
    redis = RedisProcess(tmp_path / "redis") if kind == "redis" else None
    try:
        if redis is not None:
            redis.start()
        config = bridge_config(store={"redis_url": redis.url}) if redis is not None else bridge_config()
        with (
            BrokerThread(config, http=True) as running,
            httpx.Client(base_url=running.http_url, timeout=30) as http,
        ):
            user, phone_id = unique("alice"), unique("phone")
            go_offline(running, clients, user, phone_id)
            for index in range(39):
                running.run(running.broker.send_to_user(user, "alerts", b"alert %d" % index))
            store = running.broker.store
            assert store is not None
            running.run(set_fault(store, fault))

            # A service keeps trying to send more (big enough to need new pages): each try is
            # refused, without PUBACK, and the service's connection closed so it sends again.
            attempts = 25
            for _ in range(attempts):
                service = clients(running.tcp_port, role="service")
                service.connect()
                service.paho.publish(f"user/{user}/alerts", b"x" * 8192, qos=1)
                assert service.disconnected.wait(DEADLINE_S)
            admin = {"Authorization": f"Bearer {token_for(unique('ops'), 'admin')}"}
            refused = http.post(
                f"/admin/users/{user}/messages",
                headers=admin,
                json={"topic": "alerts", "payload": "x" * 8192},
            )
            assert (refused.status_code, refused.json()["error"]) == (503, "unavailable")
            unready = http.get("/readyz")
            reason = unready.json()["reason"]
            print(f"{kind} {fault}: /readyz {unready.status_code} {reason}")
            assert unready.status_code == 503
            assert reason.startswith("store failing: enqueue failed: ")
            assert re.search(r"disk is full|maxmemory" if fault == "full" else "readonly", reason), reason

            phone = _come_back(running, clients, user, phone_id)
            assert [m.payload for m in phone.expect(39)] == [b"alert %d" % index for index in range(39)]
            # Acknowledged ones leave the store if it can still delete; a read-only one keeps
            # them, and they come again next time (at-least-once).
            left = 39 if fault == "read_only" else 0
            wait_until(
                lambda: running.call(lambda: running.broker.stats.offline_replayed) == 39, what="replay done"
            )
            assert _queue(running, user)[0] == left
    finally:
        logging.getLogger().removeHandler(handler)
        if redis is not None:
            redis.stop()

    lines = out.getvalue().splitlines()
    refusals = [line for line in lines if "could not take" in line and "suppressed" not in line]
    summaries = re.findall(r"suppressed (\d+) similar messages in \d+s: .*could not take", out.getvalue())
    faulty = [line for line in lines if re.search(r"disk is full|readonly|maxmemory", line)]
    print(f"{kind} {fault}: {len(faulty)} log lines name the fault, {summaries} more summarised")
    print("\n".join(faulty))
    assert len(refusals) == 10  # the rate limit's burst; one line per try before
    assert summaries == [str(attempts - 10)]
    # The 10 refusals, and one line per other thing that failed: marking the session
    # connected and (at shutdown) disconnected, the replay's bookkeeping, saving the last seq.
    assert len(faulty) <= 14, "\n".join(faulty)
    bookkeeping = [line for line in lines if "without the store's bookkeeping" in line]
    assert len(bookkeeping) == (0 if fault == "full" and kind == "embedded" else 1), bookkeeping


# --- SeqReserver: keeps the store's seq reservations ahead of the sequencer -----------------


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _held(store: OfflineStore, topic: str) -> SeqReservation | None:
    return next((r for r in await store.load_seq_reservations() if r.topic == topic), None)


async def test_seq_reserver_writes_a_new_topic_at_once_and_renews_them_all(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "store.sqlite3", QueueLimits())
    sequencer = ReservedSequencer(clock=time.time)
    reserver = SeqReserver(store, sequencer, clock=time.time, renew_s=3600)
    sequencer.on_due = reserver.wake
    startup = sequencer.start([], {}, time.time())
    await store.reserve_seq(startup)
    sequencer.confirmed(startup)
    task = asyncio.create_task(reserver.run())
    try:
        btc = unique("market/luno/BTC-ZAR")
        assert [sequencer.next(btc) for _ in range(3)] == [1, 2, 3]
        # Written on the wake from the hot path, not an hour later at the renewal.
        await _until(lambda: _has(store, btc), "the new topic's reservation")
        held = await _held(store, btc)
        assert held == SeqReservation(btc, 3 + MIN_BLOCK, held.at if held else 0.0)
        assert reserver.writes == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    before = await _held(store, btc)
    assert before is not None
    renewing = SeqReserver(store, sequencer, clock=lambda: time.time() + 60, renew_s=0.01)
    task = asyncio.create_task(renewing.run())
    try:
        await _until(lambda: _renewed(store, btc, before.at), "the renewal")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    assert {r.topic for r in sequencer.plan(time.time(), renew=True)} == {NEW_TOPICS, btc}


async def _has(store: OfflineStore, topic: str) -> bool:
    return await _held(store, topic) is not None


async def _renewed(store: OfflineStore, topic: str, after: float) -> bool:
    held = await _held(store, topic)
    return held is not None and held.at > after


async def test_seq_reserver_retries_while_redis_is_down_and_ticks_keep_their_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Numbers go on while the store is down; the outage costs two log lines, however many
    retries it took."""
    caplog.set_level(logging.WARNING, logger="bridge.offline")
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    store = await RedisStore.open(redis.url)
    try:
        sequencer = ReservedSequencer(clock=time.time)
        reserver = SeqReserver(store, sequencer, clock=time.time, renew_s=0.05)
        sequencer.on_due = reserver.wake
        startup = sequencer.start([], {}, time.time())
        await store.reserve_seq(startup)
        sequencer.confirmed(startup)
        task = asyncio.create_task(reserver.run())
        try:
            redis.stop()
            eth = unique("market/valr/ETH-ZAR")
            # Within the new topics' reservation: numbered at once, the store down or not.
            assert [sequencer.next(eth) for _ in range(5)] == [1, 2, 3, 4, 5]
            await _until(lambda: _failed(reserver, 3), "three failed writes")
            redis.start()
            await _until(lambda: _has(store, eth), "the reservation once Redis is back", DEADLINE_S * 2)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        held = await _held(store, eth)
        assert held is not None
        assert held.reserved >= 5 + MIN_BLOCK
        assert (sequencer.refused, sequencer.overrun) == (0, 0)
        said = [r.getMessage() for r in caplog.records if r.name == "bridge.offline"]
        assert len(said) == 2, said
        assert said[0].startswith("could not reserve seq numbers")
        assert re.fullmatch(r"reserving seq numbers: working again after (\d+) failed tries", said[1])
        assert int(said[1].split()[-3]) == reserver.failures
    finally:
        await store.close()
        redis.stop()


async def _failed(reserver: SeqReserver, times: int = 1) -> bool:
    return reserver.failures >= times


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_sigkill_between_group_commits_loses_nothing_acknowledged(
    procs: Callable[..., Proc],
    clients: ClientFactory,
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
) -> None:
    """A service streams with 100 PUBLISHes in flight, so they are stored in groups; the broker is
    killed -9 mid-stream. Every message it acknowledged comes to the user after the restart."""
    _env, token, start = _processes(procs, tmp_path, kind, request)
    first, port = start()
    total = 900  # the queue's default bound is 1000: nothing is evicted
    stream = _stream_to_offline_user(clients, port, token, total=total, acked_first=300)
    user, phone_id, acked, index_of = stream.user, stream.phone_id, stream.acked, stream.index_of
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(DEADLINE_S)
    told_stored = {index_of[mid] for mid in set(acked)}
    assert len(told_stored) < total  # killed mid-stream, between two group commits

    second, port = start()
    back = clients(
        port, client_id=phone_id, clean_session=False, username=user, password=token(user, "subscriber")
    )
    back.connect()
    received: set[int] = set()
    deadline = time.monotonic() + DEADLINE_S
    while not told_stored <= received and time.monotonic() < deadline:
        received.add(int(back.expect(1)[0].payload))
    assert told_stored - received == set()
    assert second.stop() == 0


@pytest.mark.timeout(180)
def test_a_redis_outage_mid_stream_acknowledges_only_what_was_committed(
    procs: Callable[..., Proc],
    clients: ClientFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    redis_process: RedisProcess,
) -> None:
    """Redis hangs while a service streams (100 in flight, stored in groups): no PUBACK for
    a message whose group did not commit, the connection ends, and what the service sends
    again once Redis is back is stored: the user gets every message."""
    env, token, start = _processes(procs, tmp_path, "redis", request)
    env["MARKET_BRIDGE_STORE__QUEUE_MAX_MESSAGES"] = "10000"
    broker, port = start()
    total = 5000
    stream = _stream_to_offline_user(clients, port, token, total=total, acked_first=200)
    user, phone_id, acked, index_of = stream.user, stream.phone_id, stream.acked, stream.index_of
    service = stream.service
    with redis_process.paused():
        # Past the store's call deadline (2 s) the broker gives up on the group and closes the
        # service's connection without acknowledging it.
        assert service.disconnected.wait(DEADLINE_S)
    told_stored = {index_of[mid] for mid in set(acked)}
    assert len(told_stored) < total
    assert broker.wait_for_line(r"could not take .*'s message on user/.*did not answer enqueue")

    # The service sends again what was not acknowledged, as its library would: on a new
    # connection, and again on another if the broker ends that one too (a store call that
    # passes its deadline while Redis catches up on a loaded machine closes it, unacknowledged).
    unacked = sorted(set(range(total)) - told_stored)
    deadline = time.monotonic() + 3 * DEADLINE_S
    while unacked and time.monotonic() < deadline:
        retry = clients(port, username="svc", password=token("svc", "service"))
        retry.paho.max_inflight_messages_set(100)
        retry.connect()
        sent = [(index, retry.paho.publish(f"user/{user}/fills", b"%d" % index, qos=1)) for index in unacked]
        for _, info in sent:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(DEADLINE_S)
            if retry.disconnected.is_set():
                break
        unacked = [index for index, info in sent if not info.is_published()]
        retry.close()
    assert unacked == []

    back = clients(
        port, client_id=phone_id, clean_session=False, username=user, password=token(user, "subscriber")
    )
    back.connect()
    received: set[int] = set()
    deadline = time.monotonic() + DEADLINE_S
    while len(received) < total and time.monotonic() < deadline:
        received.add(int(back.expect(1)[0].payload))
    assert told_stored - received == set()
    assert received == set(range(total))
    assert broker.stop() == 0


@pytest.mark.timeout(120)
def test_users_draining_together_are_served_fairly(clients: ClientFactory, tmp_path: Path) -> None:
    """Eight users' mailboxes fill at once while they are connected (window 5, so each needs
    twelve rounds): every user gets its first message before any user has all of its own."""
    config = bridge_config(store={"path": str(tmp_path / "store.sqlite3"), "replay_window": 5})
    with BrokerThread(config) as running:
        users = [unique("fair") for _ in range(8)]
        arrivals: dict[str, list[float]] = {user: [] for user in users}
        for user in users:
            phone = persistent_client(clients, running.tcp_port, user, f"{user}-phone")
            phone.paho.on_message = lambda _c, _u, _m, times=arrivals[user]: times.append(time.monotonic())
            phone.connect()
            assert phone.subscribe(f"user/{user}/#", qos=1) == [1]

        async def burst() -> None:
            # One event-loop step: one group commit, then every user's replay at once.
            sends = [running.broker.send_to_user(u, "fills", b"%d" % i) for i in range(60) for u in users]
            results = await asyncio.gather(*sends)
            assert all(r.stored is not None for r in results)

        running.run(burst())
        wait_until(lambda: all(len(times) == 60 for times in arrivals.values()), what="every queue drained")
        first_done = min(times[-1] for times in arrivals.values())
        last_started = max(times[0] for times in arrivals.values())
        assert last_started < first_done
