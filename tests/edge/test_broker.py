"""MarketBroker end to end: real broker on loopback, real paho clients over TCP and WebSocket."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import pytest
from amqtt.broker import Broker

from bench.mqttws import masked_frame
from bridge.auth import Role
from bridge.edge.broker import MarketBroker
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    Transport,
    authed_connect,
    bridge_config,
    connect_packet,
    make_tick,
    subscribe_packet,
    token_for,
    unique,
    wait_until,
)
from tests.edge.test_streams import raw_ws

TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ClientFactory = Callable[..., Client]


def _seqs(messages: list[Any]) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in messages]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_subscriber_receives_ticks_with_increasing_seq(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    sub = clients(broker.port(transport), transport=transport)
    sub.connect()
    assert sub.subscribe("market/#") == [0]
    pub = clients(broker.tcp_port)
    pub.connect()
    for last in ("100", "101", "102"):
        pub.publish("market/valr/BTC-ZAR", make_tick("valr", last=last).encode())
    got = sub.expect(3)
    assert [json.loads(m.payload)["last"] for m in got] == ["100", "101", "102"]
    assert _seqs(got) == [1, 2, 3]
    assert all(m.topic == "market/valr/BTC-ZAR" and not m.retain for m in got)


def test_seq_is_per_topic_and_stamped_by_the_broker(broker: BrokerThread, clients: ClientFactory) -> None:
    sub = clients(broker.tcp_port)
    sub.connect()
    sub.subscribe("market/#")
    pub = clients(broker.tcp_port)
    pub.connect()
    # Publishers' own seq values are ignored: the broker is the sequencer.
    pub.publish("market/luno/BTC-ZAR", make_tick(seq=77).encode())
    pub.publish("market/luno/ETH-ZAR", make_tick(pair="ETH-ZAR", seq=5).encode())
    pub.publish("market/luno/BTC-ZAR", make_tick(seq=3).encode())
    got = sub.expect(3)
    assert [(m.topic, json.loads(m.payload)["seq"]) for m in got] == [
        ("market/luno/BTC-ZAR", 1),
        ("market/luno/ETH-ZAR", 1),
        ("market/luno/BTC-ZAR", 2),
    ]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("market/luno/BTC-ZAR", b"not json", "not_json"),
        ("market/luno/BTC-ZAR", b"[1, 2]", "not_object"),
        (
            "market/luno/BTC-ZAR",
            make_tick().encode().replace(b'"bid":"1249000"', b'"bid":1249000.5'),
            "float_price",
        ),
        (
            "market/luno/BTC-ZAR",
            make_tick().encode().replace(b'"bid":"1249000"', b'"bid":"12e5"'),
            "bad_decimal",
        ),
        ("market/luno/BTC-ZAR", make_tick().encode().replace(b'"bid":"1249000",', b""), "missing_field"),
        ("market/valr/BTC-ZAR", make_tick().encode(), "wrong_topic"),
        ("market/luno/btczar", make_tick().encode(), "wrong_topic"),
        ("market/luno/BTC-ZAR", b"\xff\xfe", "not_json"),
    ],
)
def test_invalid_tick_is_dropped_counted_and_publisher_stays_connected(
    broker: BrokerThread, clients: ClientFactory, topic: str, payload: bytes, reason: str
) -> None:
    sub = clients(broker.tcp_port)
    sub.connect()
    sub.subscribe("market/#")
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish(topic, payload)
    pub.publish("market/luno/BTC-ZAR", make_tick(last="42").encode())
    (only,) = sub.expect(1)
    assert json.loads(only.payload)["last"] == "42"
    assert not pub.disconnected.is_set()
    assert broker.call(lambda: broker.broker.stats.ticks_rejected[reason]) == 1


def test_qos_is_downgraded_to_the_lower_of_publish_and_subscription(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    sub = clients(broker.tcp_port)
    sub.connect()
    assert sub.subscribe("market/#", qos=1) == [1]
    other = unique("plain")
    assert sub.subscribe(f"{other}/#", qos=0) == [0]
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick().encode(), qos=0)
    pub.publish("market/luno/BTC-ZAR", make_tick().encode(), qos=1)
    pub.publish(f"{other}/x", b"hello", qos=1)
    got = sub.expect(3)
    assert [m.qos for m in got] == [0, 1, 0]


def test_unsubscribe_stops_delivery(broker: BrokerThread, clients: ClientFactory) -> None:
    sub = clients(broker.tcp_port)
    sub.connect()
    sub.subscribe("market/luno/#")
    sub.subscribe("market/valr/#")
    sub.paho.unsubscribe("market/luno/#")
    pub = clients(broker.tcp_port)
    pub.connect()
    wait_until(
        lambda: broker.call(lambda: "market/luno/#" not in broker.broker.subscriptions), what="unsubscribe"
    )
    pub.publish("market/luno/BTC-ZAR", make_tick().encode())
    pub.publish("market/valr/BTC-ZAR", make_tick("valr").encode())
    (only,) = sub.expect(1)
    assert only.topic == "market/valr/BTC-ZAR"


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)


def _session_state(broker: BrokerThread, client_id: str) -> str | None:
    def read() -> str | None:
        entry = broker.broker.sessions.get(client_id)
        return None if entry is None else str(entry[0].transitions.state)

    return broker.call(read)


def test_client_closing_before_suback_leaves_no_connected_session(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    client_id = unique("abrupt")
    sock = _raw(broker.tcp_port)
    sock.sendall(authed_connect(client_id, clean=False))
    assert sock.recv(4)[:1] == b"\x20"  # CONNACK
    sock.sendall(subscribe_packet(1, "market/#"))
    sock.close()
    wait_until(lambda: _session_state(broker, client_id) == "disconnected", what="session disconnected")
    pub_ok = clients(broker.tcp_port)
    pub_ok.connect()
    pub_ok.publish("market/luno/BTC-ZAR", make_tick().encode())
    pub_ok.close()
    wait_until(lambda: broker.call(lambda: len(broker.broker._connections)) == 0, what="no live connections")
    assert _session_state(broker, client_id) == "disconnected"


def test_clean_session_is_removed_when_its_connection_drops(broker: BrokerThread) -> None:
    client_id = unique("clean")
    sock = _raw(broker.tcp_port)
    sock.sendall(authed_connect(client_id, clean=True))
    assert sock.recv(4)[:1] == b"\x20"
    sock.close()
    wait_until(lambda: _session_state(broker, client_id) is None, what="clean session removed")


def test_keepalive_is_enforced_and_the_will_is_published(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    watcher = clients(broker.tcp_port)
    watcher.connect()
    will_topic = unique("status")
    watcher.subscribe(will_topic)
    sock = _raw(broker.tcp_port)
    sock.sendall(authed_connect(unique("silent"), keepalive=1, will=(will_topic, b"gone")))
    assert sock.recv(4)[:1] == b"\x20"
    # Say nothing: the broker must drop us after 1.5 x keep-alive and publish the will.
    (will,) = watcher.expect(1, timeout=5)
    assert (will.topic, will.payload) == (will_topic, b"gone")
    sock.settimeout(DEADLINE_S)
    assert sock.recv(16) == b""  # closed by the broker
    sock.close()
    # Counted when the connection's handler finishes, just after the socket is closed.
    wait_until(lambda: broker.call(lambda: broker.broker.stats.keepalive_timeouts) == 1, what="the count")


def test_socket_without_connect_is_closed_after_timeout() -> None:
    config = bridge_config(broker={"connect_timeout_s": 0.3})
    with BrokerThread(config) as running:
        sock = _raw(running.tcp_port)
        assert sock.recv(16) == b""
        sock.close()
        assert running.call(lambda: running.broker.stats.connect_timeouts) == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x10\x00",  # CONNECT with no body
        b"\x10\x05\x00\x04MQ",  # truncated protocol name
        b"\x30\x05\x00\x01a",  # PUBLISH before CONNECT
        b"\x10\xff\xff\xff\xff\x7f",  # malformed remaining length
        connect_packet("x").replace(b"MQTT", b"MQXX"),
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_first_packet_is_closed_and_broker_keeps_serving(
    broker: BrokerThread, clients: ClientFactory, garbage: bytes
) -> None:
    sock = _raw(broker.tcp_port)
    sock.sendall(garbage)
    sock.shutdown(socket.SHUT_WR)
    data = sock.recv(64)
    assert data in (b"", b"\x20\x02\x00\x01")  # closed, or refused with a protocol-version CONNACK
    sock.close()
    ok = clients(broker.tcp_port)
    ok.connect()
    assert ok.subscribe("market/#") == [0]


def test_same_client_id_takes_over_the_old_connection(broker: BrokerThread, clients: ClientFactory) -> None:
    client_id = unique("phone")
    first = clients(broker.tcp_port, client_id=client_id, username=client_id)
    first.connect()
    second = clients(broker.ws_port, transport="websockets", client_id=client_id, username=client_id)
    second.connect()
    assert first.disconnected.wait(DEADLINE_S)
    second.subscribe("market/#")
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick().encode())
    assert len(second.expect(1)) == 1
    assert _session_state(broker, client_id) == "connected"


def test_persistent_session_keeps_subscriptions_across_reconnect(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    client_id = unique("persist")
    first = clients(broker.tcp_port, client_id=client_id, clean_session=False, username=client_id)
    first.connect()
    first.subscribe("market/luno/#")
    first.close()
    wait_until(lambda: _session_state(broker, client_id) == "disconnected", what="disconnect")
    again = clients(broker.tcp_port, client_id=client_id, clean_session=False, username=client_id)
    again.connect()
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick().encode())
    assert again.expect(1)[0].topic == "market/luno/BTC-ZAR"


def test_broker_class_is_the_pinned_amqtt_subclass() -> None:
    # We override private methods of amqtt 0.12.1: an upgrade must fail here first.
    assert version("amqtt") == "0.12.1"
    # The overrides live in the concept mixins (bridge/edge/*.py): each must still replace a
    # method amqtt's Broker has.
    for name in ("_client_connected", "_broadcast_loop", "_handle_message_delivery", "_start_listeners"):
        assert name in Broker.__dict__
        assert getattr(MarketBroker, name) is not getattr(Broker, name)


# --- wills are PUBLISHes: authorised at CONNECT, validated and sequenced when published -------


def _exchange(port: int, transport: Transport, data: bytes, *, close: bool = False) -> tuple[bytes, bool]:
    """Send ``data`` as a new client over ``transport``: (MQTT bytes the broker sent, whether it
    closed the connection within the deadline). ``close``: then drop the connection at once."""
    if transport == "tcp":
        sock = _raw(port)
        sock.sendall(data)
    else:
        sock = raw_ws(port)
        sock.sendall(masked_frame(data))
    if close:
        sock.close()
        return b"", True
    received, closed = b"", False
    sock.settimeout(DEADLINE_S)
    try:
        while chunk := sock.recv(65536):
            received += chunk
            if transport == "websockets" and b"\x88" in _frame_opcodes(received):
                closed = True
                break
        else:
            closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    finally:
        sock.close()
    return (_ws_payloads(received) if transport == "websockets" else received), closed


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames: (opcode byte, payload); a cut frame at the end is left out."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        size, head = data[pos + 1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        if pos + head + size > len(data):
            break
        frames.append((data[pos], data[pos + head : pos + head + size]))
        pos += head + size
    return frames


def _frame_opcodes(data: bytes) -> bytes:
    return bytes(first for first, _ in _frames(data))


def _ws_payloads(data: bytes) -> bytes:
    return b"".join(payload for first, payload in _frames(data) if first == 0x82)


def _will_connect(user: str, role: Role, topic: str, payload: bytes, **kwargs: Any) -> bytes:
    return connect_packet(
        user, username=user.encode(), password=token_for(user, role).encode(), will=(topic, payload), **kwargs
    )


TICK_WILL = make_tick(last="1", bid="1", ask="2").encode(999_999)
WILLS_REFUSED = [
    ("subscriber on a market topic", "subscriber", "market/luno/BTC-ZAR", TICK_WILL),
    ("subscriber to another user", "subscriber", "user/bob/alerts", b"Your account is locked"),
    ("subscriber on a wildcard", "subscriber", "market/#", TICK_WILL),
    ("feed on a wildcard topic", "feed", "market/#", TICK_WILL),
    ("feed with a will that is not a tick", "feed", "market/luno/BTC-ZAR", b"not json"),
    ("feed with a tick for another topic", "feed", "market/valr/BTC-ZAR", TICK_WILL),
    ("feed to a user", "feed", "user/bob/alerts", b"hello"),
    ("admin on a $ topic", "admin", "$SYS/broker/uptime", b"0"),
    ("admin on an over-long topic", "admin", "status/" + "x" * 300, b"0"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("what", "role", "topic", "payload"), WILLS_REFUSED, ids=[w[0] for w in WILLS_REFUSED]
)
def test_a_will_that_could_not_be_published_refuses_the_connect(
    broker: BrokerThread, transport: Transport, what: str, role: Role, topic: str, payload: bytes
) -> None:
    user = unique("willer")
    received, closed = _exchange(broker.port(transport), transport, _will_connect(user, role, topic, payload))
    assert received == b"\x20\x02\x00\x05", what
    assert closed
    assert broker.call(lambda: broker.broker.stats.refusals["will_refused"]) == 1
    assert broker.call(lambda: broker.broker.limits.total) == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_feed_will_is_validated_sequenced_and_snapshotted(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    topic = "market/luno/BTC-ZAR"
    sub = clients(broker.tcp_port, role="subscriber")
    sub.connect()
    sub.subscribe(topic)
    broker.run(broker.broker.publish(make_tick(last="100")))
    assert _seqs(sub.expect(1)) == [1]
    # Its own seq (999999) and retain flag mean nothing: the broker stamps the next one.
    _exchange(
        broker.port(transport),
        transport,
        _will_connect(unique("feed"), "feed", topic, TICK_WILL, will_qos=1, will_retain=True),
        close=True,
    )
    (will,) = sub.expect(1)
    assert (json.loads(will.payload)["seq"], json.loads(will.payload)["bid"]) == (2, "1")
    late = clients(broker.tcp_port, role="subscriber")
    late.connect()
    late.subscribe(topic)
    (snapshot,) = late.expect(1)
    assert snapshot.retain
    assert json.loads(snapshot.payload)["seq"] == 2
    assert broker.call(lambda: broker.broker.stats.wills_published) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_service_will_reaches_the_user_it_is_addressed_to(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    user = unique("bob")
    bob = clients(broker.tcp_port, role="subscriber", username=user)
    bob.connect()
    topic = f"user/{user}/alerts"
    bob.subscribe(topic)
    _exchange(
        broker.port(transport), transport, _will_connect(unique("svc"), "service", topic, b"gone"), close=True
    )
    (message,) = bob.expect(1)
    assert (message.topic, message.payload) == (topic, b"gone")


# --- anonymous persistent sessions and QoS 2 to users ----------------------------------------


def test_anonymous_persistent_sessions_are_kept(clients: ClientFactory) -> None:
    """Was: amqtt's monitor deleted disconnected anonymous sessions within ~1 s."""
    config = bridge_config(auth={"enabled": False})
    with BrokerThread(config) as running:
        client_id = unique("anon")
        first = clients(running.tcp_port, anonymous=True, client_id=client_id, clean_session=False)
        first.connect()
        assert first.subscribe("status/#", qos=1) == [1]
        first.close()
        wait_until(
            lambda: client_id not in running.call(lambda: dict(running.broker._connections)), what="gone"
        )
        # Past the monitor's 1 s period: the session is still there (polled, not slept on).
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert client_id in running.call(lambda: dict(running.broker.sessions)), "session deleted"
            threading.Event().wait(0.1)
        publisher = clients(running.tcp_port, anonymous=True)
        publisher.connect()
        publisher.publish("status/a", b"while away", qos=1)
        back = clients(running.tcp_port, anonymous=True, client_id=client_id, clean_session=False)
        back.connect()
        assert back.session_present
        assert back.expect(1)[0].payload == b"while away"


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_qos2_messages_to_a_user_granted_qos2_arrive_at_qos2(
    broker: BrokerThread, clients: ClientFactory, clean: bool
) -> None:
    user = unique("bob")
    bob = clients(
        broker.tcp_port, role="subscriber", username=user, client_id=unique("phone"), clean_session=clean
    )
    bob.connect()
    assert bob.subscribe(f"user/{user}/#", qos=2) == [2]
    service = clients(broker.tcp_port, role="service")
    service.connect()
    service.publish(f"user/{user}/alerts", b"exactly once", qos=2)
    (message,) = bob.expect(1)
    assert (message.payload, message.qos) == (b"exactly once", 2)  # [MQTT-3.8.4-6]
