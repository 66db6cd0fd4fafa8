"""Listeners (bridge/edge/listeners.py): WebSocket path and subprotocol, pings, a taken port or bad
TLS naming the listener."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
from websockets.exceptions import InvalidStatus

from bridge.errors import ListenerError
from tests.conftest import BrokerThread, Client, Transport, bridge_config

TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ClientFactory = Callable[..., Client]


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
