"""MqttTickPublisher against a real broker, including the broker going away and coming back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from bridge.errors import ConfigError
from feeds.publisher import BrokerUrl, MqttTickPublisher, parse_broker_url
from tests.conftest import DEADLINE_S, BrokerThread, Client, bridge_config, make_tick, token_for

ClientFactory = Callable[..., Client]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerUrl("tcp", False, "127.0.0.1", 1883, "/mqtt")),
        ("mqtt://localhost", BrokerUrl("tcp", False, "localhost", 1883, "/mqtt")),
        ("mqtts://h:8884", BrokerUrl("tcp", True, "h", 8884, "/mqtt")),
        ("ws://127.0.0.1:8083/mqtt", BrokerUrl("websockets", False, "127.0.0.1", 8083, "/mqtt")),
        ("wss://example.test/feeds", BrokerUrl("websockets", True, "example.test", 443, "/feeds")),
    ],
)
def test_parse_broker_url(url: str, expected: BrokerUrl) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://", "h:1883", "mqtt://h:99999", ""])
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    assert info.value.field == "broker"


async def _publish_until(sink: MqttTickPublisher, sub: Client, last: str) -> None:
    """Publish until the subscriber sees one tick (the first may race the SUBSCRIBE)."""
    async with asyncio.timeout(DEADLINE_S):
        await sink.wait_connected()
        while sub.messages.empty():
            await sink.publish(make_tick(last=last))
            await asyncio.to_thread(sub.messages_arrived.wait, 0.05)


def test_publisher_reconnects_after_the_broker_restarts(clients: ClientFactory) -> None:
    first = BrokerThread(bridge_config())
    first.__enter__()
    port = first.tcp_port

    async def scenario() -> None:
        nonlocal first
        async with MqttTickPublisher(
            f"mqtt://127.0.0.1:{port}",
            username="feeder",
            password=token_for("feeder", "feed"),
            reconnect_min_s=1,
            reconnect_max_s=2,
        ) as sink:
            sub = clients(port)
            sub.connect()
            sub.subscribe("market/#")
            await _publish_until(sink, sub, "1")
            assert json.loads(sub.messages.get_nowait().payload)["last"] == "1"

            first.stop()
            async with asyncio.timeout(DEADLINE_S):
                await sink.wait_disconnected()
            await sink.publish(make_tick(last="999"))
            assert sink.dropped_offline >= 1

            second = BrokerThread(bridge_config(listeners={"ws": {"port": 0}, "tcp": {"port": port}}))
            second.__enter__()
            first = second
            again = clients(port)
            again.connect()
            again.subscribe("market/#")
            await _publish_until(sink, again, "2")
            assert json.loads(again.messages.get_nowait().payload)["last"] == "2"
            assert sink.connects == 2

    try:
        asyncio.run(scenario())
    finally:
        first.stop()
