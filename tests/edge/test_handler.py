"""MarketProtocolHandler end to end: the broker's own read path, fed byte by byte from real sockets.

Feeds here are raw sockets, so a test decides exactly how packets are cut into writes; the
subscribers that only need to receive are paho clients. Outbound packets are parsed by a
small reader written here, not by bridge.core.framing (that has its own pure tests).
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from amqtt.mqtt.publish import PublishPacket
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from bridge.auth import Role
from bridge.core.tick import Tick
from bridge.core.wire import remaining_length
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    authed_connect,
    bridge_config,
    make_tick,
    subscribe_packet,
    unique,
    wait_until,
)

ClientFactory = Callable[..., Client]
TOPICS = [
    ("luno", "BTC-ZAR"),
    ("luno", "ETH-ZAR"),
    ("valr", "BTC-ZAR"),
    ("valr", "USDC-ZAR"),
    ("quidax", "USDT-NGN"),
]
PINGREQ = b"\xc0\x00"
PINGRESP = (0xD0, b"")


def publish_packet(
    topic: str, payload: bytes, *, qos: int = 0, packet_id: int | None = None, retain: bool = False
) -> bytes:
    """A PUBLISH as amqtt encodes it (an independent encoder, not bridge.core.wire)."""
    return bytes(PublishPacket.build(topic, payload, packet_id, False, qos, retain).to_bytes())


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def tick_stream(count: int, *, qos: int = 0, first_id: int = 1) -> tuple[bytes, list[Tick]]:
    """``count`` ticks round-robin over TOPICS (``last`` = 1, 2, ...), as one byte string."""
    ticks = [make_tick(*TOPICS[index % len(TOPICS)], last=str(index + 1)) for index in range(count)]
    data = b"".join(
        publish_packet(tick.topic, tick.encode(), qos=qos, packet_id=first_id + index if qos else None)
        for index, tick in enumerate(ticks)
    )
    return data, ticks


class Packet:
    """One packet the broker sent: type, flags, body, and for a PUBLISH its fields."""

    def __init__(self, first: int, body: bytes) -> None:
        self.first = first
        self.body = body

    @property
    def kind(self) -> int:
        return self.first >> 4

    @property
    def qos(self) -> int:
        return (self.first >> 1) & 0x03

    @property
    def dup(self) -> bool:
        return bool(self.first & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.first & 0x01)

    @property
    def topic(self) -> str:
        assert self.kind == 3, f"not a PUBLISH: {self.first:#x}"
        return self.body[2 : 2 + int.from_bytes(self.body[:2], "big")].decode()

    @property
    def packet_id(self) -> int | None:
        if self.kind == 3:
            if not self.qos:
                return None
            start = 2 + int.from_bytes(self.body[:2], "big")
            return int.from_bytes(self.body[start : start + 2], "big")
        return int.from_bytes(self.body[:2], "big")

    @property
    def payload(self) -> bytes:
        assert self.kind == 3
        start = 2 + int.from_bytes(self.body[:2], "big") + (2 if self.qos else 0)
        return self.body[start:]

    def tick(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.payload)
        return loaded


def split_packets(buffer: bytearray) -> Iterator[Packet]:
    """Complete packets from the front of ``buffer`` (consumed), MQTT 3.1.1 framing."""
    while len(buffer) >= 2:
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(buffer):
                return
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if byte < 0x80:
                break
            assert index < 5, "broker sent a malformed remaining length"
        if len(buffer) < index + length:
            return
        packet = Packet(buffer[0], bytes(buffer[index : index + length]))
        del buffer[: index + length]
        yield packet


class RawClient:
    """An MQTT 3.1.1 client on a bare TCP socket: the test controls every byte and every write."""

    def __init__(
        self,
        port: int,
        *,
        role: Role = "admin",
        client_id: str | None = None,
        rcvbuf: int | None = None,
        **connect: Any,
    ) -> None:
        self.client_id = client_id or unique("raw")
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(DEADLINE_S)
        self.sock.connect(("127.0.0.1", port))
        self._buffer = bytearray()
        self._ready: list[Packet] = []
        self.send(authed_connect(self.client_id, role=role, **connect))
        connack = self.read()
        assert connack.first == 0x20
        assert connack.body[1:] == b"\x00", f"refused: {connack.body!r}"
        self.session_present = connack.body[0] == 1

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_pieces(self, data: bytes, size: int) -> None:
        for start in range(0, len(data), size):
            self.sock.sendall(data[start : start + size])

    def read(self, timeout: float = DEADLINE_S) -> Packet:
        deadline = time.monotonic() + timeout
        while not self._ready:
            self._ready.extend(split_packets(self._buffer))
            if self._ready:
                break
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                pytest.fail(f"{self.client_id}: no packet within {timeout}s")
            if not chunk:
                pytest.fail(f"{self.client_id}: connection closed while waiting for a packet")
            self._buffer.extend(chunk)
        return self._ready.pop(0)

    def read_many(self, count: int) -> list[Packet]:
        return [self.read() for _ in range(count)]

    def subscribe(self, topic_filter: str, qos: int = 0, packet_id: int = 1) -> None:
        self.send(subscribe_packet(packet_id, topic_filter, qos))
        suback = self.read()
        assert (suback.first, suback.body) == (0x90, packet_id.to_bytes(2, "big") + bytes([qos]))

    def ping(self) -> list[Packet]:
        """A PINGREQ answered (the connection is open and read); returns what came before it."""
        self.send(PINGREQ)
        before: list[Packet] = []
        while (packet := self.read()).first != PINGRESP[0]:
            before.append(packet)
        assert packet.body == PINGRESP[1]
        return before

    def wait_closed(self, timeout: float = DEADLINE_S) -> bool:
        """True once the broker has closed the connection (bytes before the close are dropped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def stat(broker: BrokerThread, read: Callable[[Any], Any]) -> Any:
    """A value from the broker's stats, read on its loop."""
    return broker.call(lambda: read(broker.broker.stats))


def assert_in_order_per_topic(ticks: list[dict[str, Any]], per_topic: int) -> None:
    by_topic: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for tick in ticks:
        by_topic.setdefault((tick["exchange"], tick["pair"]), []).append((tick["seq"], tick["last"]))
    assert set(by_topic) == set(TOPICS)
    for index, topic in enumerate(TOPICS):
        lasts = [str(index + 1 + len(TOPICS) * n) for n in range(per_topic)]
        assert by_topic[topic] == list(zip(range(1, per_topic + 1), lasts, strict=True)), topic


# --- chunked reads ----------------------------------------------------------------------------


def test_one_write_of_500_ticks_reaches_a_websocket_subscriber_in_order(
    broker: BrokerThread, clients: ClientFactory, raw_clients: Callable[..., RawClient]
) -> None:
    sub = clients(broker.ws_port, transport="websockets", role="subscriber")
    sub.connect()
    sub.subscribe("market/#")
    feed = raw_clients(broker.tcp_port, role="feed")
    data, _ = tick_stream(500)
    feed.send(data)  # one sendall: the broker reads it in a few large chunks
    got = sub.expect(500)
    assert_in_order_per_topic([json.loads(m.payload) for m in got], 100)
    assert all(m.qos == 0 and not m.retain for m in got)
    assert stat(broker, lambda s: s.ticks_accepted) == 500
    assert feed.ping() == []  # and the feed's connection is still served


@pytest.mark.parametrize(("piece", "count"), [(1, 40), (2, 100), (7, 500), (255, 500)])
def test_ticks_cut_at_any_byte_still_arrive(
    broker: BrokerThread,
    clients: ClientFactory,
    raw_clients: Callable[..., RawClient],
    piece: int,
    count: int,
) -> None:
    sub = clients(broker.ws_port, transport="websockets", role="subscriber")
    sub.connect()
    sub.subscribe("market/#")
    feed = raw_clients(broker.tcp_port, role="feed")
    data, _ = tick_stream(count)
    feed.send_in_pieces(data, piece)  # TCP_NODELAY: each piece is its own segment
    assert_in_order_per_topic([json.loads(m.payload) for m in sub.expect(count)], count // len(TOPICS))
    assert feed.ping() == []


def _ws_feed(port: int, client_id: str) -> ClientConnection:
    return ws_connect(
        f"ws://127.0.0.1:{port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
        compression=None,
        open_timeout=DEADLINE_S,
    )


def test_websocket_feed_packets_cut_across_messages_and_sent_with_connect(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    sub = clients(broker.tcp_port, role="subscriber")
    sub.connect()
    sub.subscribe("market/#")
    data, _ = tick_stream(100)
    client_id = unique("wsfeed")
    # CONNECT and the first ticks in one WebSocket message (what amqtt buffered past CONNECT
    # must not be lost), the rest cut every 11 bytes, across message boundaries.
    head = len(data) // 3
    with _ws_feed(broker.ws_port, client_id) as ws:
        ws.send(authed_connect(client_id, role="feed") + data[:head])
        for start in range(head, len(data), 11):
            ws.send(data[start : start + 11])
        assert_in_order_per_topic([json.loads(m.payload) for m in sub.expect(100)], 20)
        connack = ws.recv(timeout=DEADLINE_S)
        assert connack == b"\x20\x02\x00\x00"


# --- protocol violations ----------------------------------------------------------------------

_GOOD_TICK = make_tick().encode()


_QOS1_TICK = publish_packet("market/luno/BTC-ZAR", _GOOD_TICK, qos=1, packet_id=1)


@pytest.mark.parametrize(
    ("garbage", "reason", "ticks_first"),
    [
        pytest.param(b"\x30\xff\xff\xff\xff\x7f", "malformed_length", 0, id="5-byte-length"),
        pytest.param(b"\x00\x00", "reserved_packet", 0, id="type-0"),
        pytest.param(b"\xf0\x00", "reserved_packet", 0, id="type-15"),
        pytest.param(authed_connect("second-connect"), "second_connect", 0, id="second-connect"),
        pytest.param(b"\x36" + _QOS1_TICK[1:], "malformed_publish", 0, id="qos-3"),
        pytest.param(
            _QOS1_TICK.replace(b"\x00\x01{", b"\x00\x00{"), "malformed_publish", 0, id="packet-id-0"
        ),
        pytest.param(b"\x30\x05\x00\x02\xff\xfex", "bad_utf8", 0, id="bad-utf8-topic"),
        pytest.param(b"\x82\x08\x00\x01\x00\x03a/b\x03", "malformed_packet", 0, id="subscribe-qos-3"),
        pytest.param(b"\x82\x02\x00\x01", "malformed_packet", 0, id="subscribe-no-filters"),
        pytest.param(b"\x80\x08\x00\x01\x00\x03a/b\x00", "malformed_packet", 0, id="subscribe-bad-flags"),
        pytest.param(b"\xa2\x02\x00\x01", "malformed_packet", 0, id="unsubscribe-no-filters"),
        pytest.param(b"\xc0\x01\x00", "malformed_packet", 0, id="pingreq-with-body"),
        pytest.param(b"\x40\x03\x00\x01\x00", "malformed_packet", 0, id="puback-too-long"),
        # A good tick first in the same write: it is delivered, then the connection closes.
        pytest.param(
            publish_packet("market/luno/BTC-ZAR", _GOOD_TICK) + b"\xf0\x00",
            "reserved_packet",
            1,
            id="after-a-tick",
        ),
    ],
)
def test_malformed_packet_closes_only_that_connection(
    broker: BrokerThread,
    clients: ClientFactory,
    raw_clients: Callable[..., RawClient],
    caplog: pytest.LogCaptureFixture,
    garbage: bytes,
    reason: str,
    ticks_first: int,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.edge.handler")
    will_topic = unique("status")
    watcher = clients(broker.tcp_port)
    watcher.connect()
    watcher.subscribe([("market/#", 0), (will_topic, 0)])
    feed = clients(broker.ws_port, transport="websockets", role="feed")
    feed.connect()
    feed.publish("market/valr/BTC-ZAR", make_tick("valr", last="1").encode())
    assert json.loads(watcher.expect(1)[0].payload)["last"] == "1"

    bad = raw_clients(broker.tcp_port, will=(will_topic, b"gone"))
    bad.send(garbage)
    assert bad.wait_closed(), "the broker kept a connection that broke the protocol"
    got = watcher.expect(ticks_first + 1)
    # [MQTT-3.1.2-8]: closed for a protocol error, so the will is published.
    assert (got[-1].topic, got[-1].payload) == (will_topic, b"gone")
    assert any(reason in record.getMessage() for record in caplog.records), caplog.text

    # Everyone else carries on: the feed publishes, the watcher receives, seq continues.
    feed.publish("market/valr/BTC-ZAR", make_tick("valr", last="2").encode())
    (after,) = watcher.expect(1)
    assert (json.loads(after.payload)["last"], json.loads(after.payload)["seq"]) == ("2", 2)
    assert not feed.disconnected.is_set()


def test_packet_over_max_packet_bytes_closes_before_its_body_arrives(
    clients: ClientFactory, raw_clients: Callable[..., RawClient]
) -> None:
    limit = 1024
    with BrokerThread(bridge_config(broker={"max_packet_bytes": limit})) as broker:
        watcher = clients(broker.tcp_port)
        watcher.connect()
        watcher.subscribe("market/#")
        feed = raw_clients(broker.tcp_port, role="feed")
        # Exactly the limit is accepted: a tick padded with JSON whitespace to a 1024-byte body.
        topic = "market/luno/BTC-ZAR"
        tick = make_tick(last="1").encode()
        padded = tick[:-1] + b" " * (limit - 2 - len(topic) - len(tick)) + b"}"
        exact = publish_packet(topic, padded)
        assert exact[1:3] == b"\x80\x08"  # remaining length 1024
        feed.send(exact)
        assert json.loads(watcher.expect(1)[0].payload)["last"] == "1"
        # One byte more: only the fixed header is sent, and the broker hangs up on it.
        feed.send(b"\x30" + b"\x81\x08")
        assert feed.wait_closed()
        watcher.paho.publish("x", b"still here")  # the broker itself is fine
        other = raw_clients(broker.tcp_port, role="feed")
        assert other.ping() == []


# --- per-feed inbound rate limit --------------------------------------------------------------


def test_feed_over_its_publish_rate_is_acked_kept_and_its_excess_dropped(
    clients: ClientFactory, raw_clients: Callable[..., RawClient]
) -> None:
    config = bridge_config(limits={"rate": {"publish_per_s": 50, "publish_burst": 10}})
    with BrokerThread(config) as broker:
        sub = clients(broker.ws_port, transport="websockets", role="subscriber")
        sub.connect()
        sub.subscribe("market/#")
        user = unique("phone-owner")
        phone = clients(broker.tcp_port, role="subscriber", username=user)
        phone.connect()
        phone.subscribe(f"user/{user}/#", qos=1)

        feed = raw_clients(broker.tcp_port)  # admin: may publish market/... and user/...
        count, alerts = 200, 20
        data, ticks = tick_stream(count, qos=1)
        data += b"".join(
            publish_packet(f"user/{user}/alerts", f"alert {n}".encode(), qos=1, packet_id=count + 1 + n)
            for n in range(alerts)
        )
        sent = time.monotonic()
        feed.send(data)
        acked = Counter(packet.packet_id for packet in feed.read_many(count + alerts))
        elapsed = time.monotonic() - sent
        # Every QoS 1 PUBLISH is acknowledged, dropped or not (3.1.1 cannot say "refused").
        assert acked == Counter(range(1, count + alerts + 1))
        assert feed.ping() == []

        dropped = stat(broker, lambda s: s.publishes_dropped["rate_limited"])
        admitted = count - dropped
        # The burst, plus what 50/s refilled while the write was being read.
        assert 10 <= admitted <= 10 + 50 * elapsed + 1, (admitted, elapsed)
        assert stat(broker, lambda s: s.ticks_accepted) == admitted
        got = [json.loads(m.payload) for m in sub.expect(admitted)]
        # The admitted ones are the first ticks of the write, stamped 1, 2, ... per topic.
        assert [tick["last"] for tick in got] == [tick.last for tick in ticks[:admitted]]
        # User-addressed messages are never rate limited.
        assert sorted(m.payload for m in phone.expect(alerts)) == sorted(
            f"alert {n}".encode() for n in range(alerts)
        )

        # Once the bucket refills the same connection is admitted again, and the subscriber's
        # next message is that tick: nothing beyond the admitted ones was delivered.
        sentinel = make_tick("luno", "SENTRY-ZAR", last="99")
        packet_id = 1000
        while stat(broker, lambda s: s.ticks_accepted) == admitted:
            packet_id += 1
            assert packet_id < 1000 + 50 * DEADLINE_S, "the feed was never admitted again"
            feed.send(publish_packet(sentinel.topic, sentinel.encode(), qos=1, packet_id=packet_id))
            assert feed.read().packet_id == packet_id
        (next_one,) = sub.expect(1)
        assert next_one.topic == sentinel.topic
        assert sub.messages.empty()


# --- bounds on what one connection can make the broker do ------------------------------------


def test_pingreqs_whose_answers_are_never_read_close_the_connection() -> None:
    # Smallest outbound bound and send buffer: unread PINGRESPs pass the bound quickly.
    config = bridge_config(broker={"max_outbound_bytes": 4096, "socket_send_buffer_bytes": 4096})
    with BrokerThread(config) as broker:
        flooder = RawClient(broker.tcp_port, role="subscriber", rcvbuf=4096)
        batch = PINGREQ * 50_000
        deadline = time.monotonic() + DEADLINE_S
        try:
            while time.monotonic() < deadline:
                flooder.send(batch)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert flooder.wait_closed()
        wait_until(lambda: stat(broker, lambda s: s.protocol_errors["control_flood"]) == 1, what="the close")
        flooder.close()


def test_pingreqs_that_are_read_are_answered(
    broker: BrokerThread, raw_clients: Callable[..., RawClient]
) -> None:
    client = raw_clients(broker.tcp_port, role="subscriber")
    client.send(PINGREQ * 1000)
    assert [client.read().first for _ in range(1000)] == [PINGRESP[0]] * 1000


def test_a_publish_to_an_over_long_topic_is_dropped_and_counted(
    broker: BrokerThread, raw_clients: Callable[..., RawClient]
) -> None:
    feed = raw_clients(broker.tcp_port, role="admin")
    tick = make_tick()
    for topic in ("market/luno/" + "X" * 300, "user/bob/" + "y" * 60_000):
        feed.send(publish_packet(topic, tick.encode(), qos=1, packet_id=7))
        assert feed.read().first == 0x40  # still acknowledged: 3.1.1 cannot say "refused"
    assert stat(broker, lambda s: s.publishes_dropped["topic_too_long"]) == 2
    assert feed.ping() == []


def test_messages_for_users_past_the_publish_rate_are_paced_not_dropped(clients: ClientFactory) -> None:
    limits = {"rate": {"publish_per_s": 100, "publish_burst": 10}}
    with BrokerThread(bridge_config(limits=limits)) as broker:
        user = unique("bob")
        bob = clients(broker.tcp_port, role="subscriber", username=user)
        bob.connect()
        bob.subscribe(f"user/{user}/#")
        service = raw_clients_for(broker, "service")
        service.send(b"".join(publish_packet(f"user/{user}/n", str(i).encode()) for i in range(60)))
        assert [m.payload for m in bob.expect(60)] == [str(i).encode() for i in range(60)]
        assert stat(broker, lambda s: s.publishes_dropped["rate_paced"]) > 0
        assert stat(broker, lambda s: s.publishes_dropped["rate_limited"]) == 0
        service.close()


def raw_clients_for(broker: BrokerThread, role: Role) -> RawClient:
    return RawClient(broker.tcp_port, role=role)


def test_an_amqtt_packet_task_ending_with_its_connection_logs_no_traceback(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: "Task exception was never retrieved ... Packet handling was cancelled" (ERROR)."""
    for _ in range(60):
        client = RawClient(broker.tcp_port, role="admin")
        # A QoS 1 PUBLISH on a non-market topic goes to amqtt's handler task; closing at once
        # cuts that task's PUBACK write.
        client.send(publish_packet("status/x", b"x", qos=1, packet_id=1) * 50)
        client.close()
    wait_until(lambda: broker.call(lambda: broker.broker.stats.connections) == 0, what="all gone")
    broker.call(gc.collect)  # the "never retrieved" report comes when the task is collected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]


# --- inbound PUBLISH to user/...: the read path's own, PUBACK after the group commit ------------


def _raw_publish(topic: str, packet_id: int, *, qos: int = 1, payload: bytes = b"x") -> bytes:
    """A PUBLISH built by hand, so it can carry what no encoder would (QoS 3, packet id 0)."""
    topic_bytes = topic.encode()
    body = len(topic_bytes).to_bytes(2, "big") + topic_bytes + packet_id.to_bytes(2, "big") + payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        pytest.param(_raw_publish("user/bob/+", 1), "invalid_topic", id="wildcard-topic"),
        pytest.param(_raw_publish("user/bob/a\x00b", 1), "invalid_topic", id="nul-in-topic"),
        pytest.param(_raw_publish("user/bob/x", 1, qos=3), "malformed_publish", id="qos-3"),
        pytest.param(_raw_publish("user/bob/x", 0), "malformed_publish", id="packet-id-0"),
    ],
)
def test_a_malformed_publish_to_a_user_closes_only_that_connection(
    broker: BrokerThread,
    raw_clients: Callable[..., RawClient],
    clients: ClientFactory,
    packet: bytes,
    reason: str,
) -> None:
    user = unique("bob")
    phone = clients(broker.tcp_port, role="subscriber", username=user)
    phone.connect()
    phone.subscribe(f"user/{user}/#", 1)
    service = raw_clients(broker.tcp_port, role="service")
    before = stat(broker, lambda s: s.publishes_dropped["invalid_topic"] + s.protocol_errors[reason])
    service.send(packet)
    assert service.wait_closed(), "the broker kept a connection that broke the protocol"
    after = stat(broker, lambda s: s.publishes_dropped["invalid_topic"] + s.protocol_errors[reason])
    assert after == before + 1
    # Nobody else is affected: another service still reaches the user.
    other = raw_clients(broker.tcp_port, role="service")
    other.send(_raw_publish(f"user/{user}/ok", 9, payload=b"ok"))
    assert other.read().body == b"\x00\x09"
    assert phone.expect(1)[0].payload == b"ok"


def test_refused_publishes_to_users_are_acknowledged_dropped_and_counted_each_time(
    broker: BrokerThread, raw_clients: Callable[..., RawClient], clients: ClientFactory
) -> None:
    """Over-long and forbidden topics: acknowledged (3.1.1 cannot say "refused"), never
    stored or delivered, counted every time though decided once per topic."""
    user = unique("bob")
    phone = clients(broker.tcp_port, role="subscriber", username=user)
    phone.connect()
    phone.subscribe(f"user/{user}/#", 1)
    long_topic = f"user/{user}/" + "y" * 300
    service = raw_clients(broker.tcp_port, role="service")
    service.send(_raw_publish(long_topic, 1) + _raw_publish(long_topic, 2))
    assert [p.body for p in service.read_many(2)] == [b"\x00\x01", b"\x00\x02"]
    # A subscriber may not publish, not even to its own mailbox.
    sender = raw_clients(broker.tcp_port, role="subscriber", client_id=user)
    sender.send(_raw_publish(f"user/{user}/x", 3) + _raw_publish(f"user/{user}/x", 4))
    assert [p.body for p in sender.read_many(2)] == [b"\x00\x03", b"\x00\x04"]
    assert stat(broker, lambda s: s.publishes_dropped["topic_too_long"]) == 2
    assert stat(broker, lambda s: s.publishes_dropped["acl"]) == 2
    assert sender.ping() == []
    assert service.ping() == []
    # Nothing refused reached the user: the next message it gets is the one allowed.
    service.send(_raw_publish(f"user/{user}/ok", 5, payload=b"ok"))
    assert service.read().body == b"\x00\x05"
    assert [m.payload for m in phone.expect(1)] == [b"ok"]
