"""Retained snapshots (bridge/edge/snapshots.py): one per topic, at once, cached and bounded, never
another client's."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.conftest import BrokerThread, Client, Transport, bridge_config, make_tick, unique, wait_until

TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ClientFactory = Callable[..., Client]


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
