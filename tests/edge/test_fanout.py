"""Fan-out end to end: QoS per subscription, bounded inflight, resends, plans kept current, zones.

A plan per topic is cached until subscriptions or connections change; these tests change
something and check the *very next* tick, so a plan that outlived the change shows up.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.sync.connection import Connection

from bridge.core.wire import remaining_length
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    authed_connect,
    bridge_config,
    make_tick,
    token_for,
    unique,
    wait_until,
)
from tests.edge.test_handler import (
    Packet,
    RawClient,
    puback_packet,
    publish_packet,
    split_packets,
    stat,
    tick_stream,
)

ClientFactory = Callable[..., Client]
RawFactory = Callable[..., RawClient]
LUNO = "market/luno/BTC-ZAR"
VALR = "market/valr/BTC-ZAR"


@pytest.fixture
def raw_clients() -> Iterator[RawFactory]:
    made: list[RawClient] = []

    def factory(port: int, **kwargs: Any) -> RawClient:
        client = RawClient(port, **kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


def _mqtt_str(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def subscribe_many(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(_mqtt_str(f) + bytes([q]) for f, q in filters)
    return b"\x82" + remaining_length(len(body)) + body


def unsubscribe(packet_id: int, topic_filter: str) -> bytes:
    body = packet_id.to_bytes(2, "big") + _mqtt_str(topic_filter)
    return b"\xa2" + remaining_length(len(body)) + body


def publish_acked(feed: RawClient, ticks: list[tuple[str, bytes]], *, first_id: int = 1) -> None:
    """QoS 1 ticks in one write; returns once the broker has acknowledged (handed off) each."""
    feed.send(
        b"".join(
            publish_packet(topic, payload, qos=1, packet_id=first_id + n)
            for n, (topic, payload) in enumerate(ticks)
        )
    )
    acks = [feed.read() for _ in ticks]
    assert [(p.kind, p.packet_id) for p in acks] == [(4, first_id + n) for n in range(len(ticks))]


def inflight(broker: BrokerThread, client_id: str) -> list[int]:
    def read() -> list[int]:
        session = broker.broker.sessions[client_id][0]
        return sorted(session.inflight_out)

    return broker.call(read)


# --- QoS --------------------------------------------------------------------------------------


def test_qos1_publish_reaches_each_subscriber_at_its_own_qos(
    broker: BrokerThread, clients: ClientFactory, raw_clients: RawFactory
) -> None:
    at_qos0 = clients(broker.tcp_port, role="subscriber")
    at_qos0.connect()
    at_qos0.subscribe("market/#", qos=0)
    paho_qos1 = clients(broker.ws_port, transport="websockets", role="subscriber")
    paho_qos1.connect()
    paho_qos1.subscribe("market/#", qos=1)
    raw_qos1 = raw_clients(broker.tcp_port, role="subscriber")
    raw_qos1.subscribe("market/#", qos=1)

    feed = raw_clients(broker.tcp_port, role="feed")
    publish_acked(feed, [(LUNO, make_tick(last=str(n)).encode()) for n in (1, 2, 3)])
    feed.send(publish_packet(LUNO, make_tick(last="4").encode(), qos=0))

    assert [m.qos for m in at_qos0.expect(4)] == [0, 0, 0, 0]
    # paho acknowledges QoS 1 itself; it saw QoS 1, then the QoS 0 publish at QoS 0.
    assert [m.qos for m in paho_qos1.expect(4)] == [1, 1, 1, 0]

    got = raw_qos1.read_many(4)
    assert [(p.kind, p.qos, p.dup, p.retain) for p in got] == [(3, 1, False, False)] * 3 + [
        (3, 0, False, False)
    ]
    ids = [p.packet_id for p in got[:3]]
    assert None not in ids
    assert 0 not in ids
    assert len(set(ids)) == 3
    assert got[3].packet_id is None
    assert [p.tick()["last"] for p in got] == ["1", "2", "3", "4"]
    # Unacknowledged until the subscriber says so; the PUBACKs settle them.
    assert inflight(broker, raw_qos1.client_id) == sorted(i for i in ids if i is not None)
    raw_qos1.send(b"".join(puback_packet(i) for i in ids if i is not None))
    wait_until(lambda: inflight(broker, raw_qos1.client_id) == [], what="PUBACKs settled")


def test_overlapping_subscriptions_get_a_copy_per_matching_filter(
    broker: BrokerThread, raw_clients: RawFactory
) -> None:
    # As amqtt and this broker always did ([MQTT-3.3.5-1] allows it): one copy per matching
    # subscription, each at min(publish QoS, that subscription's QoS).
    sub = raw_clients(broker.tcp_port, role="subscriber")
    sub.send(subscribe_many(1, [("market/#", 0), ("market/luno/#", 1)]))
    suback = sub.read()
    assert (suback.kind, suback.body) == (9, b"\x00\x01\x00\x01")
    feed = raw_clients(broker.tcp_port, role="feed")
    publish_acked(feed, [(LUNO, make_tick(last="1").encode()), (VALR, make_tick("valr", last="2").encode())])
    got = sub.read_many(3)
    luno = sorted((p.qos, p.tick()["seq"]) for p in got if p.topic == LUNO)
    valr = [(p.qos, p.tick()["seq"]) for p in got if p.topic == VALR]
    assert (luno, valr) == ([(0, 1), (1, 1)], [(0, 1)])
    sub.send(b"".join(puback_packet(p.packet_id) for p in got if p.qos and p.packet_id is not None))
    assert sub.ping() == []  # no further copy before the PINGRESP


# --- bounded inflight -------------------------------------------------------------------------


def test_qos1_subscriber_that_never_acks_is_capped_then_gets_the_latest(raw_clients: RawFactory) -> None:
    config = bridge_config(broker={"max_inflight_messages": 5})
    with BrokerThread(config) as broker:
        sub = raw_clients(broker.tcp_port, role="subscriber")
        sub.subscribe("market/#", qos=1)
        feed = raw_clients(broker.tcp_port, role="feed")
        per_topic = 20
        ticks = [
            (f"market/{exchange}/BTC-ZAR", make_tick(exchange, last=str(n)).encode())
            for n in range(1, per_topic + 1)
            for exchange in ("luno", "valr")
        ]
        publish_acked(feed, ticks)

        def outbox_state() -> tuple[int, int]:
            outbox = broker.broker._connections[sub.client_id].outbox
            assert outbox is not None
            return outbox.inflight, outbox.pending

        # Five in flight, and the rest held as the latest tick per topic.
        assert broker.call(outbox_state) == (5, 2)
        assert stat(broker, lambda s: s.publishes_dropped["conflated"]) == 2 * per_topic - 5 - 2
        first = sub.read_many(5)
        assert [p.tick()["last"] for p in first] == ["1", "1", "2", "2", "3"]
        assert all(p.qos == 1 and not p.dup for p in first)

        # Acknowledging frees the slots: the held latest ticks go, and only those.
        sub.send(b"".join(puback_packet(p.packet_id) for p in first if p.packet_id is not None))
        latest = sub.read_many(2)
        assert sorted((p.topic, p.tick()["seq"], p.tick()["last"]) for p in latest) == [
            (LUNO, per_topic, str(per_topic)),
            (VALR, per_topic, str(per_topic)),
        ]
        assert broker.call(outbox_state) == (2, 0)
        sub.send(b"".join(puback_packet(p.packet_id) for p in latest if p.packet_id is not None))
        wait_until(lambda: broker.call(outbox_state) == (0, 0), what="all acknowledged")
        # Still live afterwards, one at a time.
        publish_acked(feed, [(LUNO, make_tick(last="21").encode())], first_id=100)
        assert sub.read().tick()["seq"] == per_topic + 1


def test_qos2_ticks_take_the_pipeline_bounded_by_inflight_until_pubcomp(raw_clients: RawFactory) -> None:
    config = bridge_config(broker={"max_inflight_messages": 2})
    with BrokerThread(config) as broker:
        sub = raw_clients(broker.tcp_port, role="subscriber")
        sub.subscribe("market/#", qos=2)
        for n in range(1, 6):
            broker.run(broker.broker.publish_tick(make_tick(last=str(n)), qos=2))
        first = sub.read_many(2)
        assert [(p.kind, p.qos, p.dup, p.tick()["last"]) for p in first] == [
            (3, 2, False, "1"),
            (3, 2, False, "2"),
        ]
        ids = [p.packet_id for p in first]
        assert None not in ids
        # PUBREC -> PUBREL from the broker; the slot is free only at PUBCOMP.
        sub.send(b"".join(b"\x50\x02" + i.to_bytes(2, "big") for i in ids if i is not None))
        pubrels = sub.read_many(2)
        assert [(p.first, p.packet_id) for p in pubrels] == [(0x62, i) for i in ids]
        assert sorted(inflight(broker, sub.client_id)) == sorted(i for i in ids if i is not None)
        sub.send(b"".join(b"\x70\x02" + i.to_bytes(2, "big") for i in ids if i is not None))
        # The held latest tick of the topic goes next, once; the ones in between were conflated.
        (latest,) = sub.read_many(1)
        assert (latest.qos, latest.tick()["last"], latest.tick()["seq"]) == (2, "5", 5)
        assert inflight(broker, sub.client_id) == [latest.packet_id]
        assert stat(broker, lambda s: s.publishes_dropped["conflated"]) == 2


def test_persistent_subscriber_gets_unacked_qos1_again_with_dup_after_reconnecting(
    broker: BrokerThread, raw_clients: RawFactory
) -> None:
    client_id = unique("phone")
    sub = raw_clients(broker.tcp_port, role="subscriber", client_id=client_id, clean=False)
    sub.subscribe("market/luno/#", qos=1)
    feed = raw_clients(broker.tcp_port, role="feed")
    publish_acked(feed, [(LUNO, make_tick(last=str(n)).encode()) for n in (1, 2, 3)])
    sent = sub.read_many(3)
    assert all(p.qos == 1 and not p.dup for p in sent)
    sub.close()  # gone without acknowledging any of them
    wait_until(lambda: client_id not in broker.call(lambda: dict(broker.broker._connections)), what="gone")

    again = raw_clients(broker.tcp_port, role="subscriber", client_id=client_id, clean=False)
    assert again.session_present
    resent = again.read_many(3)
    # [MQTT-4.4.0-1]: the same packet ids and payloads, now with DUP set.
    assert [(p.packet_id, p.payload, p.qos, p.dup) for p in resent] == [
        (p.packet_id, p.payload, 1, True) for p in sent
    ]
    again.send(b"".join(puback_packet(p.packet_id) for p in resent if p.packet_id is not None))
    wait_until(lambda: inflight(broker, client_id) == [], what="resent ones acknowledged")
    # Then the snapshot of what it follows, and live ticks as before.
    snapshot = again.read()
    assert (snapshot.retain, snapshot.tick()["seq"]) == (True, 3)
    publish_acked(feed, [(LUNO, make_tick(last="4").encode())], first_id=10)
    live = again.read()
    assert (live.qos, live.dup, live.tick()["seq"]) == (1, False, 4)


# --- plans follow every change ----------------------------------------------------------------


def test_subscribe_and_unsubscribe_apply_to_the_very_next_tick(
    broker: BrokerThread, clients: ClientFactory, raw_clients: RawFactory
) -> None:
    always = clients(broker.tcp_port, role="subscriber")
    always.connect()
    always.subscribe("market/#")
    late = raw_clients(broker.tcp_port, role="subscriber")  # connected, not yet subscribed
    feed = raw_clients(broker.tcp_port, role="feed")
    publish_acked(feed, [(LUNO, make_tick(last="1").encode())])  # LUNO's plan: `always` only

    late.subscribe("market/luno/#")
    assert late.read().retain  # the snapshot
    publish_acked(feed, [(LUNO, make_tick(last="2").encode())], first_id=2)
    live = late.read()
    assert (live.retain, live.tick()["seq"]) == (False, 2)  # LUNO's plan now has `late`

    late.subscribe("market/valr/#", packet_id=2)
    publish_acked(feed, [(LUNO, make_tick(last="3").encode())], first_id=3)  # LUNO's plan rebuilt
    assert late.read().tick()["seq"] == 3
    late.send(unsubscribe(3, "market/luno/#"))
    unsuback = late.read()
    assert (unsuback.kind, unsuback.packet_id) == (11, 3)
    # One write: a LUNO tick, then a VALR tick. The first thing `late` gets is the VALR one.
    publish_acked(
        feed, [(LUNO, make_tick(last="4").encode()), (VALR, make_tick("valr").encode())], first_id=4
    )
    assert late.read().topic == VALR
    assert late.ping() == []
    assert [m.topic for m in always.expect(5)] == [LUNO] * 4 + [VALR]


def test_disconnect_and_reconnect_apply_to_the_very_next_tick(
    broker: BrokerThread, clients: ClientFactory, raw_clients: RawFactory
) -> None:
    always = clients(broker.tcp_port, role="subscriber")
    always.connect()
    always.subscribe("market/#")
    client_id = unique("phone")
    phone = raw_clients(broker.tcp_port, role="subscriber", client_id=client_id, clean=False)
    phone.subscribe("market/#")
    feed = raw_clients(broker.tcp_port, role="feed")
    publish_acked(feed, [(LUNO, make_tick(last="1").encode())])
    assert phone.read().tick()["seq"] == 1

    phone.close()
    wait_until(lambda: client_id not in broker.call(lambda: dict(broker.broker._connections)), what="gone")
    before = stat(broker, lambda s: s.messages_out["market"])
    publish_acked(feed, [(LUNO, make_tick(last="2").encode())], first_id=2)
    # Only the connected subscriber was in the plan (the session is kept, disconnected).
    assert stat(broker, lambda s: s.messages_out["market"]) - before == 1
    always.expect(2)

    # Back on a new connection, no new SUBSCRIBE: the next tick goes to the new connection.
    back = raw_clients(broker.tcp_port, role="subscriber", client_id=client_id, clean=False)
    snapshot = back.read()
    assert (snapshot.retain, snapshot.tick()["seq"]) == (True, 2)
    publish_acked(feed, [(LUNO, make_tick(last="3").encode())], first_id=3)
    live = back.read()
    assert (live.retain, live.tick()["seq"]) == (False, 3)


def test_time_zone_change_applies_to_the_very_next_tick(broker: BrokerThread, clients: ClientFactory) -> None:
    user = unique("trader")
    sub = clients(broker.tcp_port, username=user, password=token_for(user, "subscriber", tz="Africa/Lagos"))
    sub.connect()
    sub.subscribe("market/#")
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()

    def next_tz() -> tuple[str, str]:
        feed.publish(LUNO, make_tick().encode())
        tick = json.loads(sub.expect(1)[0].payload)
        return tick["tz"], tick["ts"]

    assert next_tz() == ("Africa/Lagos", "2026-11-30T12:00:00.000+01:00")
    broker.run(broker.broker.set_user_tz(user, "Asia/Kathmandu"))
    assert next_tz() == ("Asia/Kathmandu", "2026-11-30T16:45:00.000+05:45")
    broker.run(broker.broker.set_user_tz(user, None))
    assert next_tz() == ("Africa/Lagos", "2026-11-30T12:00:00.000+01:00")


# --- one encoding per zone --------------------------------------------------------------------


def test_each_tick_is_localised_once_per_zone_whatever_the_subscribers(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    zones = ["Africa/Lagos", "Asia/Kathmandu"]
    subs: dict[str, list[Client]] = {zone: [] for zone in zones}
    # Per zone: TCP and WebSocket, QoS 0 and QoS 1, so several groups share one variant.
    for zone in zones:
        for transport, qos in (("tcp", 0), ("tcp", 1), ("websockets", 0), ("websockets", 1), ("tcp", 0)):
            user = unique("z")
            sub = clients(
                broker.port(transport),  # type: ignore[arg-type]
                transport=transport,
                username=user,
                password=token_for(user, "subscriber", tz=zone),
            )
            sub.connect()
            sub.subscribe("market/#", qos=qos)
            subs[zone].append(sub)
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    before = stat(broker, lambda s: s.tz_rewrites)
    ticks = 5
    for n in range(ticks):
        feed.publish(LUNO, make_tick(last=str(n + 1)).encode(), qos=1)
    for zone in zones:
        payloads = [[m.payload for m in sub.expect(ticks)] for sub in subs[zone]]
        assert all(p == payloads[0] for p in payloads), f"{zone}: subscribers got different bytes"
        assert {json.loads(p)["tz"] for p in payloads[0]} == {zone}
    assert stat(broker, lambda s: s.tz_rewrites) - before == len(zones) * ticks


# --- compressed WebSocket (framed per connection) -----------------------------------------


def _deflate_client(port: int, client_id: str) -> ClientConnection:
    ws = ws_connect(
        f"ws://127.0.0.1:{port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
        compression="deflate",
        open_timeout=DEADLINE_S,
    )
    ws.send(authed_connect(client_id, role="subscriber"))
    return ws


def _ws_packets(ws: Connection, count: int) -> list[Packet]:
    buffer, packets = bytearray(), list[Packet]()
    while len(packets) < count:
        message = ws.recv(timeout=DEADLINE_S)
        assert isinstance(message, bytes)
        buffer.extend(message)
        packets.extend(split_packets(buffer))
    assert len(packets) == count, "more than expected arrived"
    assert not buffer, "a partial packet arrived"
    return packets


def test_compressed_websocket_subscriber_still_gets_every_tick(
    clients: ClientFactory, raw_clients: RawFactory
) -> None:
    config = bridge_config(listeners={"ws": {"port": 0, "compression": True}, "tcp": {"port": 0}})
    with BrokerThread(config) as broker:
        client_id = unique("browser")
        with _deflate_client(broker.ws_port, client_id) as compressed:
            assert compressed.protocol.extensions, "permessage-deflate was not negotiated"
            (connack,) = _ws_packets(compressed, 1)
            assert (connack.kind, connack.body) == (2, b"\x00\x00")
            compressed.send(subscribe_many(1, [("market/#", 0)]))
            (suback,) = _ws_packets(compressed, 1)
            assert suback.kind == 9
            plain = clients(broker.ws_port, transport="websockets", role="subscriber")
            plain.connect()
            plain.subscribe("market/#")

            def framing() -> tuple[bool | None, bool | None]:
                def websocket(name: str) -> bool | None:
                    outbox = broker.broker._connections[name].outbox
                    return None if outbox is None else outbox.websocket

                return websocket(client_id), websocket(plain.client_id)

            # Both take the one pipeline: the compressed connection is given bare packets and
            # frames them with its own deflate context; the plain one shares pre-built frames.
            assert broker.call(framing) == (False, True)
            feed = raw_clients(broker.tcp_port, role="feed")
            data, ticks = tick_stream(50)
            feed.send(data)
            expected = [(t.topic, t.last) for t in ticks]
            got = _ws_packets(compressed, 50)
            assert sorted((p.topic, p.tick()["last"]) for p in got) == sorted(expected)
            for topic in {t.topic for t in ticks}:
                assert [p.tick()["seq"] for p in got if p.topic == topic] == list(range(1, 11))
            assert [(m.topic, json.loads(m.payload)["last"]) for m in plain.expect(50)] == expected


# --- order across a reconnect -----------------------------------------------------------------


def test_resent_qos1_ticks_go_before_newer_ticks_from_the_same_publisher(
    broker: BrokerThread, raw_clients: RawFactory
) -> None:
    # A feed that also follows its own topic on a persistent QoS 1 session. Everything on
    # LUNO comes from this one client, so [MQTT-4.6.0-6] (same order as received) and
    # [MQTT-4.6.0-1] (resends in their original order) both say: 1, 2, 3 again, then 4.
    client_id = unique("feed-monitor")
    first = raw_clients(broker.tcp_port, role="feed", client_id=client_id, clean=False)
    first.subscribe("market/luno/#", qos=1)
    first.send(
        b"".join(publish_packet(LUNO, make_tick(last=str(n)).encode(), qos=1, packet_id=n) for n in (1, 2, 3))
    )
    received = first.read_many(6)  # its three ticks back (QoS 1, never acked) and three PUBACKs
    assert [p.tick()["seq"] for p in received if p.kind == 3] == [1, 2, 3]
    first.close()
    wait_until(lambda: client_id not in broker.call(lambda: dict(broker.broker._connections)), what="gone")

    # Back, with tick 4 in the same write as CONNECT (a client need not wait for CONNACK).
    again = socket.create_connection(("127.0.0.1", broker.tcp_port), timeout=DEADLINE_S)
    try:
        again.sendall(
            authed_connect(client_id, role="feed", clean=False)
            + publish_packet(LUNO, make_tick(last="4").encode())
        )
        buffer, packets = bytearray(), list[Packet]()
        while len([p for p in packets if p.kind == 3]) < 4:
            chunk = again.recv(65536)
            assert chunk, "closed by the broker"
            buffer.extend(chunk)
            packets.extend(split_packets(buffer))
        publishes = [p for p in packets if p.kind == 3]
        again.sendall(b"".join(puback_packet(p.packet_id) for p in publishes if p.packet_id is not None))
        assert [(p.tick()["seq"], p.dup) for p in publishes] == [(1, True), (2, True), (3, True), (4, False)]
    finally:
        again.close()
