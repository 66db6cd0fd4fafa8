"""Timestamps in each subscriber's own zone on every delivery path, rewritten once per zone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    BrokerThread,
    Client,
    Transport,
    bridge_config,
    make_tick,
    token_for,
    unique,
    wait_until,
)
from tests.redis_server import RedisProcess

ClientFactory = Callable[..., Client]
ZONES = {"Africa/Lagos": "+01:00", "Africa/Nairobi": "+03:00", "Africa/Cairo": "+02:00"}
# make_tick's ts is 2026-11-30T11:00:00.000Z: Cairo has no DST in November.
LOCAL = {
    "Africa/Lagos": "2026-11-30T12:00:00.000+01:00",
    "Africa/Nairobi": "2026-11-30T14:00:00.000+03:00",
    "Africa/Cairo": "2026-11-30T13:00:00.000+02:00",
}


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    config = bridge_config(timezones={"rules": [{"filter": "raw/#", "enabled": False}]})
    with BrokerThread(config) as running:
        yield running


def _subscriber(broker: BrokerThread, clients: ClientFactory, tz: str | None, **kwargs: Any) -> Client:
    user = kwargs.pop("username", None) or unique("trader")
    extra: dict[str, Any] = {"tz": tz} if tz else {}
    client = clients(
        broker.ws_port,
        transport="websockets",
        username=user,
        password=token_for(user, "subscriber", **extra),
        **kwargs,
    )
    client.connect()
    return client


def _feed(broker: BrokerThread, clients: ClientFactory) -> Client:
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    return feed


def test_live_ticks_arrive_in_each_subscribers_zone(broker: BrokerThread, clients: ClientFactory) -> None:
    subs = {zone: _subscriber(broker, clients, zone) for zone in ZONES}
    for sub in subs.values():
        sub.subscribe("market/#")
    _feed(broker, clients).publish("market/luno/BTC-ZAR", make_tick().encode())
    for zone, sub in subs.items():
        tick = json.loads(sub.expect(1)[0].payload)
        assert (tick["ts"], tick["tz"], tick["last"]) == (LOCAL[zone], zone, "1250000")


def test_retained_snapshot_arrives_in_each_subscribers_zone(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    _feed(broker, clients).publish("market/valr/BTC-ZAR", make_tick("valr").encode())
    wait_until(lambda: broker.call(lambda: len(broker.broker.retained_messages)) == 1, what="snapshot")
    for zone in ZONES:
        sub = _subscriber(broker, clients, zone)
        sub.subscribe("market/valr/+")
        (snapshot,) = sub.expect(1)
        assert snapshot.retain
        assert json.loads(snapshot.payload)["ts"] == LOCAL[zone]


def test_offline_replay_arrives_in_the_users_zone(broker: BrokerThread, clients: ClientFactory) -> None:
    user, phone_id = unique("alice"), unique("phone")
    phone = _subscriber(
        broker, clients, "Africa/Nairobi", username=user, client_id=phone_id, clean_session=False
    )
    phone.subscribe(f"user/{user}/#", qos=1)
    phone.close()
    wait_until(lambda: phone_id not in broker.call(lambda: dict(broker.broker._connections)), what="offline")
    fill = json.dumps({"order": 7, "created": "2026-11-30T11:00:00Z", "at": 1796036400}).encode()
    result = broker.run(broker.broker.send_to_user(user, "fills", fill))
    assert result.stored is not None
    back = _subscriber(
        broker, clients, "Africa/Nairobi", username=user, client_id=phone_id, clean_session=False
    )
    body = json.loads(back.expect(1)[0].payload)
    assert body == {
        "order": 7,
        "created": "2026-11-30T14:00:00+03:00",
        "at": 1796036400,
        "at_local": "2026-11-30T14:00:00.000+03:00",
        "tz": "Africa/Nairobi",
    }


def test_user_addressed_live_message_arrives_in_the_users_zone(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user = unique("alice")
    phone = _subscriber(broker, clients, "Africa/Cairo", username=user)
    phone.subscribe(f"user/{user}/#", qos=1)
    service = clients(broker.tcp_port, role="service")
    service.connect()
    service.publish(f"user/{user}/alerts", b'{"time": "2026-07-01T09:30:00.500Z"}', qos=1)
    # July: Cairo is on summer time (UTC+3).
    assert json.loads(phone.expect(1)[0].payload)["time"] == "2026-07-01T12:30:00.500+03:00"


def test_one_rewrite_per_zone_not_per_subscriber(broker: BrokerThread, clients: ClientFactory) -> None:
    for zone in ZONES:
        for _ in range(3):
            _subscriber(broker, clients, zone).subscribe("market/#")
    before = broker.call(lambda: broker.broker.stats.tz_rewrites)
    feed = _feed(broker, clients)
    watcher = _subscriber(broker, clients, "Africa/Lagos")
    watcher.subscribe("market/#")
    for last in ("1", "2"):
        feed.publish("market/luno/BTC-ZAR", make_tick(last=last).encode())
    watcher.expect(2)
    wait_until(
        lambda: broker.call(lambda: broker.broker.stats.tz_rewrites) - before == 2 * len(ZONES),
        what="rewrites counted",
    )
    assert broker.call(lambda: broker.broker.stats.tz_rewrites) - before == 2 * len(ZONES)  # 10 subscribers


def test_store_override_beats_the_token_claim(broker: BrokerThread, clients: ClientFactory) -> None:
    user = unique("alice")
    broker.run(broker.broker.set_user_tz(user, "Africa/Nairobi"))
    sub = _subscriber(broker, clients, "Africa/Lagos", username=user)
    sub.subscribe("market/#")
    _feed(broker, clients).publish("market/luno/BTC-ZAR", make_tick().encode())
    assert json.loads(sub.expect(1)[0].payload)["ts"] == LOCAL["Africa/Nairobi"]
    # Cleared: back to the token's zone, for the live connection too.
    broker.run(broker.broker.set_user_tz(user, None))
    _feed(broker, clients).publish("market/luno/BTC-ZAR", make_tick().encode())
    assert json.loads(sub.expect(1)[0].payload)["ts"] == LOCAL["Africa/Lagos"]


def test_connections_take_the_zone_from_memory_and_set_user_tz_is_seen_at_once(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    """A first connection takes its user's zone from the listing read at start, a reconnect
    from memory: neither waits on the store. The admin API's change reaches the next
    connection, and the live one, at once; only the changed user is asked again, once."""
    user = unique("alice")
    broker.run(broker.broker.publish_tick(make_tick()))
    lookups = broker.broker._zone_lookups

    def asked() -> int:
        return broker.call(lambda: lookups.keys)

    def zones() -> dict[str, tuple[str, float]]:
        return broker.call(broker.broker._zone_memo.entries)

    def snapshot_zone() -> str:
        sub = _subscriber(broker, clients, "Africa/Lagos", username=user)
        sub.subscribe("market/luno/BTC-ZAR")
        zone = str(json.loads(sub.expect(1)[0].payload)["tz"])
        sub.close()
        return zone

    before = asked()
    assert snapshot_zone() == "Africa/Lagos"  # first connection: not in the listing, no override
    assert snapshot_zone() == "Africa/Lagos"
    assert asked() == before
    broker.run(broker.broker.set_user_tz(user, "Africa/Nairobi"))
    assert user not in zones()
    assert snapshot_zone() == "Africa/Nairobi"
    assert asked() == before + 1
    assert zones()[user][0] == "Africa/Nairobi"
    assert snapshot_zone() == "Africa/Nairobi"
    assert asked() == before + 1  # remembered
    broker.run(broker.broker.set_user_tz(user, None))
    assert snapshot_zone() == "Africa/Lagos"


def test_a_storm_of_first_connects_asks_the_store_once_per_loop_step(broker: BrokerThread) -> None:
    """Users the memory cannot answer for (here: changed since the listing) asking together
    share one store call, and each gets its own override; once a listing is read again, none
    is asked."""
    users = [unique("storm") for _ in range(30)]
    zoned = {user: "Africa/Cairo" for user in users[::3]}
    for user, zone in zoned.items():
        broker.run(broker.broker.set_user_tz(user, zone))
    lookups = broker.broker._zone_lookups

    async def ask_together() -> tuple[list[str | None], int, int]:
        before = (lookups.batches, lookups.keys)
        answers = await asyncio.gather(*(broker.broker._zone_override(user) for user in users))
        return answers, lookups.batches - before[0], lookups.keys - before[1]

    answers, batches, keys = broker.run(ask_together())
    assert answers == [zoned.get(user) for user in users]
    assert (batches, keys) == (1, len(zoned))  # the others: not in the listing, no override
    answers, batches, keys = broker.run(ask_together())  # again: all from memory
    assert answers == [zoned.get(user) for user in users]
    assert (batches, keys) == (0, 0)


def test_a_change_made_elsewhere_is_seen_at_the_next_listing(broker: BrokerThread) -> None:
    """Another process (the CLI, another node) writes the store: this broker's listing says
    "no override" until it is read again (at most the memory's 10 minutes), then the new
    zone is known without a lookup."""
    user = unique("elsewhere")
    store = broker.broker.store
    assert store is not None
    broker.run(store.set_user_tz(user, "Africa/Casablanca"))  # not through the broker
    lookups = broker.broker._zone_lookups
    asked = broker.call(lambda: lookups.keys)
    assert broker.run(broker.broker._zone_override(user)) is None
    broker.run(broker.broker._list_zones())
    assert broker.run(broker.broker._zone_override(user)) == "Africa/Casablanca"
    assert broker.call(lambda: lookups.keys) == asked


def test_too_many_overrides_to_list_are_asked_per_user(broker: BrokerThread) -> None:
    users = [unique("many") for _ in range(3)]
    for user in users:
        broker.run(broker.broker.set_user_tz(user, "Africa/Nairobi"))
    memo = broker.broker._zone_memo
    broker.call(lambda: setattr(memo, "_max_listing", 1))
    broker.run(broker.broker._list_zones())
    fresh = unique("fresh")
    assert broker.call(lambda: memo.known(fresh, time.monotonic())) is None  # no listing held
    # ... and none is tried again for a while: a listing reads up to 100,001 rows.
    assert not broker.call(lambda: memo.listing_due(time.monotonic()))
    lookups = broker.broker._zone_lookups
    asked = broker.call(lambda: lookups.keys)
    assert broker.run(broker.broker._zone_override(fresh)) is None
    assert broker.call(lambda: lookups.keys) == asked + 1  # asked the store
    assert broker.call(lambda: broker.broker._zone_listing) is None  # no listing started


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_connect_while_redis_is_hung_gets_the_token_zone_at_once(
    tmp_path: Path, clients: ClientFactory, transport: Transport
) -> None:
    """The zone override is looked up at CONNECT within store.quick_timeout_s: a hung Redis
    costs a connecting client that much, and it gets its token's zone."""
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        with BrokerThread(bridge_config(store={"redis_url": redis.url})) as running:
            user = unique("alice")
            running.run(running.broker.set_user_tz(user, "Africa/Nairobi"))
            running.run(running.broker.publish_tick(make_tick()))

            def connect() -> tuple[Client, float]:
                sub = clients(
                    running.port(transport),
                    transport=transport,
                    username=user,
                    password=token_for(user, "subscriber", tz="Africa/Lagos"),
                )
                started = time.monotonic()
                sub.connect()
                return sub, time.monotonic() - started

            with redis.paused():
                sub, took = connect()
                sub.subscribe("market/#")
                snapshot = json.loads(sub.expect(1)[0].payload)
            print(f"redis hung: CONNECT over {transport} took {took:.2f}s")
            assert took < 1.5
            assert (snapshot["ts"], snapshot["tz"]) == (LOCAL["Africa/Lagos"], "Africa/Lagos")
            sub.close()

            # Redis answers again: the next CONNECT finds the override.
            again, _ = connect()
            again.subscribe("market/#")
            assert json.loads(again.expect(1)[0].payload)["tz"] == "Africa/Nairobi"
    finally:
        redis.stop()


def test_token_without_tz_gets_the_configured_default(broker: BrokerThread, clients: ClientFactory) -> None:
    sub = _subscriber(broker, clients, None)
    sub.subscribe("market/#")
    _feed(broker, clients).publish("market/luno/BTC-ZAR", make_tick().encode())
    tick = json.loads(sub.expect(1)[0].payload)
    assert (tick["ts"], tick["tz"]) == ("2026-11-30T11:00:00.000+00:00", "UTC")


def test_rules_switch_rewriting_off_per_topic_and_binary_passes_through(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user = unique("ops")
    admin = clients(broker.tcp_port, username=user, password=token_for(user, "admin", tz="Africa/Lagos"))
    admin.connect()
    admin.subscribe([("raw/#", 0), ("bin/#", 0)])
    raw = b'{"ts":"2026-11-30T11:00:00.000Z"}'
    admin.publish("raw/x", raw)
    admin.publish("bin/x", b"\x00\x01\xff")
    got = {m.topic: m.payload for m in admin.expect(2)}
    assert got == {"raw/x": raw, "bin/x": b"\x00\x01\xff"}
    assert broker.call(lambda: broker.broker.stats.tz_passthrough) >= 1
