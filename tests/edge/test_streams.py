"""bridge.edge.streams: the broker's own readers, against a live broker on real sockets.

The critical case: amqtt's WebSocket reader spun forever on one empty binary frame sent
before CONNECT, freezing every connection of the broker (issue: security, finding 1).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from bench.mqttws import check_handshake, handshake_request, masked_frame, publish
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    authed_connect,
    bridge_config,
    make_tick,
    subscribe_packet,
    unique,
    wait_until,
)

ClientFactory = Callable[..., Client]
OP_TEXT, OP_BINARY = 0x1, 0x2


@pytest.fixture
def slow_timeout_broker() -> Iterator[BrokerThread]:
    # A long connect timeout: a close seen within the test's deadline came from the check
    # under test, not from the timeout.
    with BrokerThread(bridge_config(broker={"connect_timeout_s": 120})) as running:
        yield running


def raw_ws(port: int) -> socket.socket:
    """A WebSocket opened by hand, so the test can send frames no library would."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    request, accept = handshake_request("127.0.0.1", port, "/mqtt")
    sock.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    check_handshake(head.split(b"\r\n\r\n", 1)[0], accept)
    return sock


def ws_client(port: int) -> ClientConnection:
    return ws_connect(
        f"ws://127.0.0.1:{port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
        compression=None,
        open_timeout=DEADLINE_S,
    )


def closed_by_peer(sock: socket.socket, timeout: float = DEADLINE_S) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def assert_broker_serves(broker: BrokerThread, clients: ClientFactory) -> None:
    """A new client logs in and gets a tick: the event loop is alive and serving."""
    sub = clients(broker.ws_port, transport="websockets", role="subscriber")
    sub.connect()
    sub.subscribe("market/luno/BTC-ZAR")
    broker.run(broker.broker.publish(make_tick(last="1234567")))
    [message] = sub.expect(1)
    assert json.loads(message.payload)["last"] == "1234567"


@pytest.mark.parametrize("then", ["close", "stay"])
def test_an_empty_frame_before_connect_does_not_freeze_the_broker(
    slow_timeout_broker: BrokerThread, clients: ClientFactory, then: str
) -> None:
    broker = slow_timeout_broker
    sock = raw_ws(broker.ws_port)
    sock.sendall(masked_frame(b"", OP_BINARY))
    if then == "close":
        sock.close()
    assert_broker_serves(broker, clients)
    sock.close()


def test_empty_frames_around_packets_are_skipped(broker: BrokerThread, clients: ClientFactory) -> None:
    client_id = unique("empty")
    sub = clients(broker.tcp_port, role="subscriber")
    sub.connect()
    sub.subscribe("market/#")
    with ws_client(broker.ws_port) as ws:
        ws.send(b"")
        connect = authed_connect(client_id, role="feed")
        ws.send(connect[:5])
        ws.send(b"")
        ws.send(connect[5:])
        assert ws.recv(timeout=DEADLINE_S) == b"\x20\x02\x00\x00"
        ws.send(b"")
        tick = make_tick(last="42")
        packet = publish(tick.topic.encode(), tick.encode())
        ws.send(packet[:7])
        ws.send(b"")
        ws.send(packet[7:])
        [message] = sub.expect(1)
        assert json.loads(message.payload)["last"] == "42"


@pytest.mark.parametrize("when", ["before_connect", "after_connect"])
def test_a_text_frame_closes_the_connection(slow_timeout_broker: BrokerThread, when: str) -> None:
    broker = slow_timeout_broker
    client_id = unique("text")
    with ws_client(broker.ws_port) as ws:
        if when == "after_connect":
            ws.send(authed_connect(client_id, role="subscriber"))
            assert ws.recv(timeout=DEADLINE_S) == b"\x20\x02\x00\x00"
        # [MQTT-6.0.0-1]: MQTT is carried in binary frames; anything else closes.
        ws.send(subscribe_packet(1, "market/#").decode("latin-1"))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=DEADLINE_S)
    stats = broker.broker.stats
    if when == "before_connect":
        wait_until(lambda: broker.call(lambda: stats.refusals["text_frame"]) == 1, what="refusal")
    else:
        wait_until(lambda: broker.call(lambda: stats.protocol_errors["text_frame"]) == 1, what="close")


def test_tcp_packets_sent_with_the_connect_are_read(broker: BrokerThread) -> None:
    client_id = unique("eager")
    with socket.create_connection(("127.0.0.1", broker.tcp_port), timeout=DEADLINE_S) as sock:
        sock.sendall(authed_connect(client_id, role="subscriber") + subscribe_packet(7, "market/#"))
        received = b""
        while len(received) < 4 + 5:
            chunk = sock.recv(4096)
            assert chunk
            received += chunk
        assert received[:9] == b"\x20\x02\x00\x00" + b"\x90\x03\x00\x07\x00"
