"""Owed inbound PUBACKs (bridge/edge/inbound_acks.py): each after its message was handed off, in
arrival order."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.conftest import BrokerThread, Client, make_tick, unique
from tests.edge.test_handler import TOPICS, RawClient, assert_in_order_per_topic, publish_packet, tick_stream

ClientFactory = Callable[..., Client]


# --- QoS 1 from a feed ------------------------------------------------------------------------


def test_qos1_feed_gets_every_puback_after_its_tick_was_handed_off(
    broker: BrokerThread, clients: ClientFactory, raw_clients: Callable[..., RawClient]
) -> None:
    watcher = clients(broker.ws_port, transport="websockets", role="subscriber")
    watcher.connect()
    watcher.subscribe("market/#")
    # The feed also subscribes to what it publishes: its own connection then carries both the
    # fanned-out tick and the PUBACK, and their order on that one stream is the broker's order.
    feed = raw_clients(broker.tcp_port, role="feed")
    feed.subscribe("market/#")
    count = 200
    data, ticks = tick_stream(count, qos=1)
    feed.send(data)
    seen_ticks: set[str] = set()  # "last" values delivered to the feed so far
    acked: list[int] = []
    while len(acked) < count:
        packet = feed.read()
        if packet.kind == 3:
            seen_ticks.add(packet.tick()["last"])
        else:
            assert packet.kind == 4, f"unexpected packet {packet.first:#x}"
            packet_id = packet.packet_id
            assert packet_id is not None
            # PUBACK k only once tick k has been fanned out (it is already on this stream).
            assert ticks[packet_id - 1].last in seen_ticks, f"PUBACK {packet_id} before its tick"
            acked.append(packet_id)
    assert sorted(acked) == list(range(1, count + 1))
    assert_in_order_per_topic([json.loads(m.payload) for m in watcher.expect(count)], count // len(TOPICS))


def test_pubacks_keep_the_arrival_order_across_the_stored_amqtt_and_market_paths(
    broker: BrokerThread, raw_clients: Callable[..., RawClient], clients: ClientFactory
) -> None:
    """[MQTT-4.6.0-2]: one write with a message for a user (PUBACK after its group commit), one
    on another topic (amqtt's flow), a QoS 1 tick (handed off at once) and another for the user:
    the PUBACKs come 1, 2, 3, 4, the tick's waiting for the user's message before it."""
    user = unique("bob")
    phone = clients(
        broker.tcp_port, role="subscriber", username=user, client_id=unique("phone"), clean_session=False
    )
    phone.connect()
    phone.subscribe(f"user/{user}/#", 1)
    status = clients(broker.tcp_port)
    status.connect()
    status.subscribe("status/#", 1)
    admin = raw_clients(broker.tcp_port, role="admin")
    admin.send(
        publish_packet(f"user/{user}/a", b"first", qos=1, packet_id=1)
        + publish_packet("status/x", b"s", qos=1, packet_id=2)
        + publish_packet("market/luno/BTC-ZAR", make_tick().encode(), qos=1, packet_id=3)
        + publish_packet(f"user/{user}/b", b"second", qos=1, packet_id=4)
    )
    acks = admin.read_many(4)
    assert [(p.first, p.packet_id) for p in acks] == [(0x40, 1), (0x40, 2), (0x40, 3), (0x40, 4)]
    assert [m.payload for m in phone.expect(2)] == [b"first", b"second"]
    assert status.expect(1)[0].payload == b"s"
