"""MarketBroker end to end: real broker on loopback, real paho clients over TCP and WebSocket."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
from amqtt.broker import Broker
from websockets.exceptions import InvalidStatus

from bench.mqttws import masked_frame
from bridge.auth import Role
from bridge.edge.broker import MarketBroker
from bridge.errors import ListenerError
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
    varint,
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_late_subscriber_gets_one_snapshot_per_topic_then_live(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick(last="1").encode())
    pub.publish("market/luno/BTC-ZAR", make_tick(last="2").encode())
    pub.publish("market/quidax/BTC-NGN", make_tick("quidax", "BTC-NGN", last="9").encode())
    wait_until(lambda: broker.call(lambda: len(broker.broker.retained_messages)) == 2, what="snapshots")

    sub = clients(broker.port(transport), transport=transport)
    sub.connect()
    sub.subscribe("market/#")
    snapshots = sorted(sub.expect(2), key=lambda m: m.topic)
    assert [(m.topic, m.retain, json.loads(m.payload)["last"]) for m in snapshots] == [
        ("market/luno/BTC-ZAR", True, "2"),
        ("market/quidax/BTC-NGN", True, "9"),
    ]
    # The next message is the live one: no duplicate snapshots were queued before it.
    pub.publish("market/luno/BTC-ZAR", make_tick(last="3").encode())
    (live,) = sub.expect(1)
    assert (live.retain, json.loads(live.payload)["last"], json.loads(live.payload)["seq"]) == (False, "3", 3)


def test_cached_snapshot_frames_follow_every_change(broker: BrokerThread, clients: ClientFactory) -> None:
    # Subscribers with the same filters and zone share one cached snapshot frame; a tick, a
    # new topic, a retained non-market message or its removal each make the next one current.
    pub = clients(broker.tcp_port)
    pub.connect()
    other = unique("other")

    def snapshots(expected: int) -> list[tuple[str, str]]:
        sub = clients(broker.tcp_port)
        sub.connect()
        sub.subscribe("#")
        got = sub.expect(expected)
        assert all(m.retain for m in got)
        sub.close()
        return sorted((m.topic, m.payload.decode()) for m in got)

    def retained_count() -> int:
        return len(broker.call(lambda: dict(broker.broker.retained_messages)))

    pub.publish("market/luno/BTC-ZAR", make_tick(last="1").encode())
    wait_until(lambda: retained_count() == 1, what="snapshot")
    first = snapshots(1)
    assert snapshots(1) == first  # from the cache
    assert json.loads(first[0][1])["last"] == "1"
    pub.publish("market/luno/BTC-ZAR", make_tick(last="2").encode())
    wait_until(
        lambda: (
            b'"last":"2"'
            in broker.call(lambda: bytes(broker.broker.retained_messages["market/luno/BTC-ZAR"].data))
        ),
        what="new snapshot",
    )
    assert json.loads(snapshots(1)[0][1])["last"] == "2"
    pub.publish("market/valr/BTC-ZAR", make_tick("valr", last="7").encode())
    wait_until(lambda: retained_count() == 2, what="second topic")
    assert [t for t, _ in snapshots(2)] == ["market/luno/BTC-ZAR", "market/valr/BTC-ZAR"]
    pub.publish(f"{other}/status", b"up", retain=True)
    wait_until(lambda: retained_count() == 3, what="retained status")
    assert (f"{other}/status", "up") in snapshots(3)
    pub.publish(f"{other}/status", b"", retain=True)  # an empty retained message removes it
    wait_until(lambda: retained_count() == 2, what="status removed")
    assert [t for t, _ in snapshots(2)] == ["market/luno/BTC-ZAR", "market/valr/BTC-ZAR"]


def test_snapshot_caches_stay_bounded_whatever_filters_clients_choose(clients: ClientFactory) -> None:
    config = bridge_config(limits={"max_subscriptions_per_connection": 1000})
    with BrokerThread(config) as broker:
        pub = clients(broker.tcp_port)
        pub.connect()
        pub.publish("market/luno/BTC-ZAR", make_tick().encode())
        wait_until(lambda: broker.call(lambda: len(broker.broker.retained_messages)) == 1, what="snapshot")
        sub = clients(broker.tcp_port)
        sub.connect()
        for n in range(300):  # a new filter set each time: a new cache key
            assert sub.subscribe([("market/#", 0), (f"x/{n}", 0)]) == [0, 0]
        assert len(sub.expect(300)) == 300

        def sizes() -> tuple[int, int]:
            return len(broker.broker._snapshot_frames), len(broker.broker._snapshot_members)

        frames, members = broker.call(sizes)
        assert 0 < frames <= 256
        assert 0 < members <= 256


def test_overlapping_filters_in_one_subscribe_get_each_snapshot_once(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick().encode())
    wait_until(lambda: broker.call(lambda: len(broker.broker.retained_messages)) == 1, what="snapshot")
    sub = clients(broker.tcp_port)
    sub.connect()
    assert sub.subscribe([("market/#", 0), ("market/luno/+", 0)]) == [0, 0]
    (snapshot,) = sub.expect(1)
    assert snapshot.retain
    pub.publish("market/valr/BTC-ZAR", make_tick("valr").encode())
    (live,) = sub.expect(1)
    assert live.topic == "market/valr/BTC-ZAR"


def test_other_clients_subscriptions_do_not_leak_snapshots(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick().encode())
    pub.publish("market/valr/BTC-ZAR", make_tick("valr").encode())
    wait_until(lambda: broker.call(lambda: len(broker.broker.retained_messages)) == 2, what="snapshots")
    wide = clients(broker.tcp_port)
    wide.connect()
    wide.subscribe("market/#")
    assert len(wide.expect(2)) == 2

    # amqtt pushes retained messages for *every* client's filters on CONNECT; we must not.
    narrow = clients(broker.ws_port, transport="websockets")
    narrow.connect()
    narrow.subscribe("market/valr/BTC-ZAR")
    (snapshot,) = narrow.expect(1)
    assert snapshot.topic == "market/valr/BTC-ZAR"
    pub.publish("market/valr/BTC-ZAR", make_tick("valr", last="5").encode())
    (live,) = narrow.expect(1)
    assert (live.topic, live.retain) == ("market/valr/BTC-ZAR", False)


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


def test_websocket_other_paths_are_not_served(broker: BrokerThread) -> None:
    with pytest.raises(InvalidStatus) as info:
        websockets.sync.client.connect(f"ws://127.0.0.1:{broker.ws_port}/other", subprotocols=["mqtt"])  # type: ignore[list-item]
    assert info.value.response.status_code == 404


def test_websocket_without_mqtt_subprotocol_is_refused(broker: BrokerThread) -> None:
    with pytest.raises(InvalidStatus) as info:
        websockets.sync.client.connect(f"ws://127.0.0.1:{broker.ws_port}/mqtt")
    assert info.value.response.status_code == 400


@pytest.mark.parametrize(("configured", "expected"), [({}, None), ({"ping_interval_s": 15}, 15)])
def test_websocket_pings_are_off_unless_configured(
    clients: ClientFactory, configured: dict[str, Any], expected: float | None
) -> None:
    # paho answers WebSocket pings with unmasked pongs and gets dropped: pings must be opt-in.
    config = bridge_config(listeners={"ws": {"port": 0, **configured}, "tcp": {"port": 0}})
    with BrokerThread(config) as running:
        client = clients(running.ws_port, transport="websockets")
        client.connect()

        def ping_interval() -> Any:
            (connection,) = running.broker._connections.values()
            return connection.handler.writer._listener.ping_interval  # type: ignore[union-attr]

        assert running.call(ping_interval) == expected


def test_port_in_use_fails_startup_naming_the_listener() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        config = bridge_config(listeners={"ws": {"port": 0}, "tcp": {"port": taken}})
        thread = BrokerThread(config)
        with pytest.raises(ListenerError) as info:
            thread.__enter__()
        thread.stop()
        assert (info.value.listener, info.value.port) == ("tcp", taken)
        assert f"127.0.0.1:{taken}" in str(info.value)
    finally:
        holder.close()


def test_an_unusable_tls_certificate_fails_startup_naming_the_listener(tmp_path: Path) -> None:
    junk = tmp_path / "cert.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    tls = {"certfile": str(junk), "keyfile": str(junk)}
    config = bridge_config(listeners={"ws": {"port": 0}, "tcp": {"port": 0, "tls": tls}})
    thread = BrokerThread(config)
    with pytest.raises(ListenerError) as info:
        thread.__enter__()
    thread.stop()
    assert info.value.listener == "tcp"
    assert info.value.reason.startswith("TLS certificate or key: ")


def test_listeners_are_independent(clients: ClientFactory) -> None:
    config = bridge_config(listeners={"ws": {"enabled": False}, "tcp": {"port": 0}})
    with BrokerThread(config) as running:
        assert running.call(running.broker.listener_names) == ["tcp"]
        sub = clients(running.tcp_port)
        sub.connect()


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


# --- protocol laxness: what MQTT 3.1.1 says closes the connection, closes it at once -------


@pytest.fixture
def patient_broker() -> Iterator[BrokerThread]:
    # A long connect timeout: a close seen within the deadline came from the check under test.
    with BrokerThread(bridge_config(broker={"connect_timeout_s": 120})) as running:
        yield running


def _mqtt5_connect(user: str) -> bytes:
    """An MQTT 5 CONNECT with credentials and properties (what MQTT.js sends with protocolVersion 5)."""
    token = token_for(user, "subscriber").encode()
    body = (
        b"\x00\x04MQTT\x05\xc2\x00\x3c"
        + b"\x05\x11\x00\x00\x0e\x10"  # properties: session expiry 3600
        + len(user).to_bytes(2, "big")
        + user.encode()
        + b"\x00"  # will properties: none (no will), then user name and password
        + len(user).to_bytes(2, "big")
        + user.encode()
        + len(token).to_bytes(2, "big")
        + token
    )
    return b"\x10" + varint(len(body)) + body


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mqtt5_connect_gets_connack_1_at_once(patient_broker: BrokerThread, transport: Transport) -> None:
    received, closed = _exchange(patient_broker.port(transport), transport, _mqtt5_connect(unique("v5")))
    assert (received, closed) == (b"\x20\x02\x00\x01", True)  # [MQTT-3.1.2-2]


BAD_CONNECTS = [
    ("PUBLISH first", b"\x30\x05\x00\x01ax", "not_connect"),
    ("SUBSCRIBE first", subscribe_packet(1, "market/#"), "not_connect"),
    ("PINGREQ first", b"\xc0\x00", "not_connect"),
    ("reserved flag", authed_connect("r1").replace(b"MQTT\x04\xc2", b"MQTT\x04\xc3"), "malformed_connect"),
    ("will QoS 3", connect_packet("w3", will=("status/x", b"x"), will_qos=3), "malformed_connect"),
    ("NUL in client id", connect_packet("a\x00b"), "bad_utf8"),
    ("newline and ANSI in client id are fine, NUL is not", connect_packet("x\n\x1b[31m\x00"), "bad_utf8"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("what", "data", "reason"), BAD_CONNECTS, ids=[b[0] for b in BAD_CONNECTS])
def test_bad_first_packets_close_at_once_without_connack(
    patient_broker: BrokerThread, transport: Transport, what: str, data: bytes, reason: str
) -> None:
    received, closed = _exchange(patient_broker.port(transport), transport, data)
    assert (received, closed) == (b"", True), what
    wait_until(
        lambda: patient_broker.call(lambda: patient_broker.broker.stats.refusals[reason]) == 1, what=reason
    )


BAD_SUBSCRIBES = [
    ("packet id 0", subscribe_packet(0, "market/#"), "malformed_packet"),
    ("NUL in a filter outside the ACL", subscribe_packet(1, "user/bob/\x00"), "bad_utf8"),
    ("NUL in an allowed filter", subscribe_packet(1, "market/\x00"), "bad_utf8"),
    ("UNSUBSCRIBE with packet id 0", b"\xa2\x05\x00\x00\x00\x01a", "malformed_packet"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("what", "data", "reason"), BAD_SUBSCRIBES, ids=[b[0] for b in BAD_SUBSCRIBES])
def test_malformed_subscribes_close_the_connection(
    broker: BrokerThread, transport: Transport, what: str, data: bytes, reason: str
) -> None:
    user = unique("alice")
    received, closed = _exchange(
        broker.port(transport), transport, authed_connect(user, role="subscriber") + data
    )
    assert (received, closed) == (b"\x20\x02\x00\x00", True), what  # a CONNACK, no SUBACK
    wait_until(lambda: broker.call(lambda: broker.broker.stats.protocol_errors[reason]) == 1, what=reason)


# --- a client that vanishes at any point of its connect leaves nothing behind ----------------


def _cut_and_close(port: int, transport: Transport, data: bytes) -> None:
    if transport == "tcp":
        sock = _raw(port)
        sock.sendall(data)
    else:
        sock = raw_ws(port)
        sock.sendall(masked_frame(data))
    sock.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_closing_at_any_point_of_its_connect_leaves_no_connection(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    """Was: ten phones that sent CONNECT and vanished held the user's ten slots for good."""
    user = unique("ghost")
    connect = connect_packet(
        user, clean=False, username=user.encode(), password=token_for(user, "subscriber").encode()
    )
    subscribe = subscribe_packet(1, f"user/{user}/#", 1)
    stream = connect + subscribe
    # Every prefix of the connect sequence (CONNECT, then a SUBSCRIBE), on its own socket.
    for cut in range(1, len(stream) + 1):
        _cut_and_close(broker.port(transport), transport, stream[:cut])
    running = broker.broker

    def settled() -> bool:
        return (running.stats.connections, running.limits.total, len(running._connections)) == (
            0,
            0,
            0,
        ) and not any(session.transitions.is_connected() for session, _ in running.sessions.values())

    wait_until(lambda: broker.call(settled), what="every connection released")
    # Not locked out: the user's next CONNECT is accepted, on the same persistent session.
    back = clients(
        broker.port(transport),
        transport=transport,
        client_id=user,
        clean_session=False,
        username=user,
        password=token_for(user, "subscriber"),
    )
    back.connect()


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
