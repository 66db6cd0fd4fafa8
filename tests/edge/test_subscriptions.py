"""Subscriptions (bridge/edge/subscriptions.py): the caps, a repeated filter's QoS, and adding or
removing one at a cost that does not grow with the filter's subscribers."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import pytest

from bridge.edge.session import MarketSession
from bridge.metrics import MetricsRegistry
from tests.conftest import (
    BrokerThread,
    Client,
    Transport,
    bridge_config,
    make_tick,
    persistent_client,
    unique,
    wait_until,
)

TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ClientFactory = Callable[..., Client]


# --- subscription caps (limits.max_subscriptions_per_connection, limits.max_topic_bytes) ------


def _capped_broker(**limits: int) -> BrokerThread:
    return BrokerThread(bridge_config(limits=limits))


def _held(broker: BrokerThread, client_id: str) -> set[str]:
    return broker.call(lambda: set(broker.broker._session_filters.get(client_id, ())))


def _capped(broker: BrokerThread) -> dict[str, int]:
    return broker.call(lambda: dict(broker.broker.stats.subscribes_capped))


def _market(exchange: str) -> str:
    return f"market/{exchange}/BTC-ZAR"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_filters_past_the_cap_are_refused_and_held_ones_replaced(
    clients: ClientFactory, transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.edge.broker")
    with _capped_broker(max_subscriptions_per_connection=5) as running:
        topics = [_market(f"x{i}") for i in range(8)]
        sub = clients(running.port(transport), transport=transport)
        sub.connect()
        assert sub.subscribe([(topic, 0) for topic in topics]) == [0] * 5 + [0x80] * 3
        assert _held(running, sub.client_id) == set(topics[:5])
        # One log line for the packet, not one per refused filter.
        lines = [r.getMessage() for r in caplog.records if "SUBSCRIBE of" in r.getMessage()]
        assert lines == [
            f"client {sub.client_id}: SUBSCRIBE of 8 filters, 3 refused: 3 past the cap of 5 per connection, 0 longer than 256 bytes"
        ]
        # A filter it holds is a replacement, granted even at the cap; a new one is not.
        assert sub.subscribe([(topics[0], 0), (topics[5], 0)]) == [0, 0x80]
        sub.paho.unsubscribe(topics[4])
        wait_until(lambda: len(_held(running, sub.client_id)) == 4, what="the unsubscribe")
        assert sub.subscribe(topics[5]) == [0]
        assert sub.subscribe(topics[6]) == [0x80]
        assert _capped(running) == {"too_many_filters": 5}
        # Granted filters deliver; refused and unsubscribed ones do not.
        pub = clients(running.tcp_port)
        pub.connect()
        for index in (4, 6, 7, 0, 5):
            pub.publish(topics[index], make_tick(f"x{index}").encode())
        assert [m.topic for m in sub.expect(2)] == [topics[0], topics[5]]
        pub.publish(topics[1], make_tick("x1").encode())
        assert sub.expect(1)[0].topic == topics[1]
        metrics = running.call(lambda: MetricsRegistry(running.broker).render().decode())
        assert 'mb_drops_total{reason="subscribe_capped:too_many_filters"} 5.0' in metrics


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_filters_longer_than_max_topic_bytes_are_refused(
    clients: ClientFactory, transport: Transport
) -> None:
    with _capped_broker(max_topic_bytes=32) as running:
        sub = clients(running.port(transport), transport=transport)
        sub.connect()
        exact = "market/" + "a" * 25  # 32 bytes
        ascii_long = "market/" + "a" * 26  # 33 bytes
        euro_long = "market/" + "€" * 9  # 16 characters, 34 UTF-8 bytes
        assert sub.subscribe([(exact, 0), (ascii_long, 0), (euro_long, 0), ("market/#", 0)]) == [
            0,
            0x80,
            0x80,
            0,
        ]
        assert _held(running, sub.client_id) == {exact, "market/#"}
        assert _capped(running) == {"filter_too_long": 2}
        pub = clients(running.tcp_port)
        pub.connect()
        pub.publish("market/luno/BTC-ZAR", make_tick().encode())
        assert sub.expect(1)[0].topic == "market/luno/BTC-ZAR"


def test_a_flood_of_filters_holds_only_the_cap_and_others_keep_their_ticks(
    broker: BrokerThread, clients: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack in #11: one connection subscribing tens of thousands of filters."""
    caplog.set_level(logging.INFO, logger="bridge.edge.broker")
    victim = clients(broker.ws_port, transport="websockets")
    victim.connect()
    victim.subscribe("market/luno/BTC-ZAR")
    attacker = clients(broker.tcp_port)
    attacker.connect()
    flood = [(f"market/luno/P{i}-ZAR", 0) for i in range(5000)]
    codes = attacker.subscribe(flood)
    assert codes == [0] * 100 + [0x80] * 4900
    assert len(_held(broker, attacker.client_id)) == 100
    # The broker's filter table grew by the cap, not by the flood.
    assert broker.call(lambda: len(broker.broker._subscriptions)) == 101
    assert sum("SUBSCRIBE of 5000 filters, 4900 refused" in r.getMessage() for r in caplog.records) == 1
    pub = clients(broker.tcp_port)
    pub.connect()
    pub.publish("market/luno/BTC-ZAR", make_tick().encode())
    assert victim.expect(1)[0].topic == "market/luno/BTC-ZAR"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_restored_persistent_session_keeps_the_cap(
    clients: ClientFactory, store: str, request: pytest.FixtureRequest
) -> None:
    store_config = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else None
    config = bridge_config(
        limits={"max_subscriptions_per_connection": 5}, **({"store": store_config} if store_config else {})
    )
    user, client_id = unique("alice"), unique("phone")
    topics = [_market(f"r{i}") for i in range(5)]

    def phone(port: int) -> Client:
        client = persistent_client(clients, port, user, client_id)
        client.connect()
        return client

    with BrokerThread(config) as first:
        assert phone(first.tcp_port).subscribe([(topic, 0) for topic in topics[:3]]) == [0, 0, 0]
    with BrokerThread(config) as second:
        assert _held(second, client_id) == set(topics[:3])
        back = phone(second.tcp_port)
        # The three restored filters count: two more fit, the third is refused.
        assert back.subscribe([(topic, 0) for topic in topics[3:]] + [(_market("r9"), 0)]) == [0, 0, 0x80]
        assert back.subscribe(topics[0]) == [0]
        pub = clients(second.tcp_port)
        pub.connect()
        pub.publish(topics[0], make_tick("r0").encode())
        assert back.expect(1)[0].topic == topics[0]


def test_a_session_restored_under_a_lower_cap_is_cut_to_it(clients: ClientFactory) -> None:
    """Filters stored before the cap existed (or was lowered) are not all brought back."""
    before = bridge_config(limits={"max_subscriptions_per_connection": 8})
    after = bridge_config(
        store={"path": str(before.store.path)}, limits={"max_subscriptions_per_connection": 5}
    )
    user, client_id = unique("alice"), unique("phone")
    with BrokerThread(before) as first:
        phone = persistent_client(clients, first.tcp_port, user, client_id)
        phone.connect()
        assert phone.subscribe([(_market(f"c{i}"), 0) for i in range(8)]) == [0] * 8
    with BrokerThread(after) as second:
        assert len(_held(second, client_id)) == 5
        assert _capped(second) == {"too_many_filters": 3}
        back = persistent_client(clients, second.tcp_port, user, client_id)
        back.connect()
        assert back.subscribe(_market("c99")) == [0x80]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_resubscribing_replaces_the_qos_at_the_cap(clients: ClientFactory, transport: Transport) -> None:
    """A repeated filter replaces the subscription: its new QoS is delivered and stored."""
    with _capped_broker(max_subscriptions_per_connection=1) as running:
        user, client_id = unique("alice"), unique("phone")
        sub = persistent_client(clients, running.port(transport), user, client_id, transport=transport)
        sub.connect()
        pub = clients(running.tcp_port)
        pub.connect()
        for round_, qos in enumerate((0, 1, 0)):
            assert sub.subscribe("market/#", qos) == [qos]
            if round_:
                assert sub.expect(1)[0].retain  # the snapshot, sent again for the new subscription
            assert running.run(running.broker.user_subscriptions(user)) == {client_id: {"market/#": qos}}
            pub.publish("market/luno/BTC-ZAR", make_tick().encode(), qos=1)
            (live,) = sub.expect(1)
            assert (live.retain, live.qos) == (False, qos)


def test_a_new_subscription_costs_the_same_however_many_share_its_filter(broker: BrokerThread) -> None:
    """Subscribing a session to a filter does not search the filter's other subscribers (with
    10,000 on ``market/#`` that search was most of a connect's CPU): counted in Python calls
    made, not timed. A repeated filter still replaces the one entry it has."""
    topic_filter = f"market/{unique('x')}/#"

    async def subscribe(client_id: str, qos: int = 0) -> tuple[int, int]:
        session = _session(client_id)
        calls = 0
        task = asyncio.current_task()

        def count(_frame: object, event: str, _arg: object) -> None:
            # Only this task's calls (generator resumptions included): other callbacks the
            # loop runs while it awaits (timers, flushes) are not the subscribe's cost.
            nonlocal calls
            calls += event == "call" and asyncio.current_task() is task

        sys.setprofile(count)
        try:
            code, _ = await broker.broker._subscribe((topic_filter, qos), session)
        finally:
            sys.setprofile(None)
        return code, calls

    async def crowd(count: int) -> None:
        for index in range(count):
            await broker.broker._subscribe((topic_filter, 0), _session(f"crowd-{index}"))

    broker.run(subscribe("first"))  # the filter's first subscriber also creates its index entry
    code, alone = broker.run(subscribe("second"))
    broker.run(crowd(1000))
    crowded_code, crowded = broker.run(subscribe("last"))
    assert (code, crowded_code) == (0, 0)
    assert crowded == alone
    assert broker.run(subscribe("last", 1))[0] == 1  # repeated: replaces its QoS, no second entry
    entries = broker.call(lambda: [(s.client_id, q) for s, q in broker.broker._subscriptions[topic_filter]])
    assert len(entries) == 1003
    assert entries[-1] == ("last", 1)


class _CountedSession(MarketSession):
    """Counts reads of its client id: what a search through a filter's subscribers does."""

    reads = 0

    @property
    def client_id(self) -> str | None:
        _CountedSession.reads += 1
        return self._counted_id

    @client_id.setter
    def client_id(self, value: str | None) -> None:
        self._counted_id = value


def test_removing_a_subscription_costs_the_same_however_many_share_its_filter(broker: BrokerThread) -> None:
    """A disconnect does not search the filter's other subscribers either (amqtt's removal was
    linear in them, so a storm of disconnects was quadratic): counted in client id reads, not
    timed. Every other subscriber stays, exactly once, at its QoS."""
    topic_filter = f"market/{unique('x')}/#"
    sessions: dict[str, MarketSession] = {}
    for index in range(1000):
        session = sessions[f"s-{index}"] = _CountedSession()
        session.client_id = f"s-{index}"

    async def subscribe_all() -> None:
        for index, session in enumerate(sessions.values()):
            await broker.broker._subscribe((topic_filter, index % 2), session)

    def remove(client_id: str) -> tuple[int, int]:
        session = sessions.pop(client_id)
        before = _CountedSession.reads
        deleted = broker.broker._del_subscription(topic_filter, session)
        return deleted, _CountedSession.reads - before

    broker.run(subscribe_all())
    first = broker.call(lambda: remove("s-0"))
    middle = broker.call(lambda: remove("s-500"))
    last = broker.call(lambda: remove("s-999"))
    assert first == middle == last
    assert first[0] == 1
    assert first[1] < 10
    entries = broker.call(lambda: {s.client_id: q for s, q in broker.broker._subscriptions[topic_filter]})
    assert len(broker.call(lambda: broker.broker._subscriptions[topic_filter])) == len(sessions) == 997
    assert entries == {client_id: int(client_id[2:]) % 2 for client_id in sessions}
    assert broker.call(lambda: remove("s-1"))[0] == 1
    assert broker.call(lambda: broker.broker._del_subscription(topic_filter, _session("s-1"))) == 0


def _session(client_id: str) -> MarketSession:
    session = MarketSession()
    session.client_id = client_id
    return session
