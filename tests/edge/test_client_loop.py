"""The per-connection client loop (one parked future per idle connection, packets in order) and
the handler's lean events."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from bridge.core.wire import publish_qos0
from bridge.edge.lean import LeanEvent
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    authed_connect,
    subscribe_packet,
    unique,
    wait_until,
)

ClientFactory = Callable[..., Client]
DISCONNECT = b"\xe0\x00"


def _connected(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(authed_connect(unique("idle")))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def test_an_idle_connection_holds_at_most_three_tasks(broker: BrokerThread) -> None:
    """Connection handler, amqtt's reader and its read: amqtt's loop added four more."""

    async def task_count() -> int:
        return len(asyncio.all_tasks())

    before = broker.run(task_count())
    socks = [_connected(broker.tcp_port) for _ in range(10)]
    try:
        wait_until(lambda: broker.broker.stats.connections == 10, what="10 connections")
        assert broker.run(task_count()) - before <= 3 * len(socks)
    finally:
        for sock in socks:
            sock.close()


def test_publish_then_disconnect_in_one_write_is_delivered(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    topic = f"chat/{unique('room')}"
    subscriber = clients(broker.tcp_port)
    subscriber.connect()
    subscriber.subscribe(topic)
    with _connected(broker.tcp_port) as publisher:
        publisher.sendall(publish_qos0(topic.encode(), b"last words") + DISCONNECT)
        assert publisher.recv(16) == b""  # closed by the broker after the DISCONNECT
    assert [m.payload for m in subscriber.expect(1)] == [b"last words"]


def test_subscribe_and_unsubscribe_queued_together_are_each_acknowledged_in_order(
    broker: BrokerThread,
) -> None:
    topic = f"chat/{unique('room')}".encode()
    unsubscribe = bytes([0xA2, 2 + 2 + len(topic)]) + (2).to_bytes(2, "big") + len(topic).to_bytes(2, "big")
    with _connected(broker.tcp_port) as sock:
        sock.sendall(subscribe_packet(1, topic.decode()) + unsubscribe + topic)
        received = b""
        while len(received) < 9:
            chunk = sock.recv(64)
            if not chunk:
                pytest.fail(f"closed after {received!r}")
            received += chunk
        assert received == b"\x90\x03\x00\x01\x00" + b"\xb0\x02\x00\x02"  # SUBACK, then UNSUBACK


def test_an_idle_connection_keeps_lean_events(broker: BrokerThread) -> None:
    client_id = unique("idle")
    with socket.create_connection(("127.0.0.1", broker.tcp_port), timeout=DEADLINE_S) as sock:
        sock.sendall(authed_connect(client_id))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        wait_until(lambda: client_id in broker.broker._connections, what="the connection")
        connection = broker.broker._connections[client_id]
        # CONNACK goes out before the handler starts: wait for its start() to finish (the
        # reader task exists, and the "ready" Event it was waiting on is dropped).
        handler = connection.handler
        wait_until(
            lambda: handler._reader_task is not None and handler._reader_ready is None, what="handler start"
        )
        assert isinstance(connection.done, LeanEvent)
        assert isinstance(handler._reader_stopped, LeanEvent)
        assert not handler._reader_stopped.is_set()
    wait_until(lambda: client_id not in broker.broker._connections, what="the disconnect")
    assert connection.done.is_set()
    assert connection.handler._reader_stopped.is_set()
