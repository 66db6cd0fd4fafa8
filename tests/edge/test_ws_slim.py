"""An open WebSocket connection drops its handshake leftovers and keeps working."""

from __future__ import annotations

from typing import Any

import websockets.sync.client
from websockets.asyncio.server import ServerConnection

from bridge.core.wire import publish_qos0
from bridge.edge.lean import SmallDeque
from tests.conftest import BrokerThread, authed_connect, subscribe_packet, unique, wait_until


def _server_connections(broker: BrokerThread) -> list[ServerConnection]:
    def connections() -> list[ServerConnection]:
        instance: Any = broker.broker._servers["ws"].instance
        return list(instance.connections)

    return broker.call(connections)


def test_open_connection_keeps_no_handshake_headers_and_still_works(broker: BrokerThread) -> None:
    topic = f"chat/{unique('room')}"
    with websockets.sync.client.connect(
        f"ws://127.0.0.1:{broker.ws_port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
        compression=None,
    ) as ws:
        ws.send(authed_connect(unique("slim")))
        assert ws.recv(timeout=5) == b"\x20\x02\x00\x00"
        wait_until(lambda: len(_server_connections(broker)) == 1, what="the server connection")
        (connection,) = _server_connections(broker)
        assert connection.request is not None
        assert list(connection.request.headers.raw_items()) == []
        assert connection.response is None
        assert isinstance(connection.recv_messages.frames.queue, SmallDeque)
        assert isinstance(connection.drain_waiters, SmallDeque)
        # Frames still flow both ways through the swapped containers.
        ws.send(subscribe_packet(1, topic))
        assert ws.recv(timeout=5) == b"\x90\x03\x00\x01\x00"
        ws.send(publish_qos0(topic.encode(), b"hello"))
        assert ws.recv(timeout=5) == publish_qos0(topic.encode(), b"hello")
