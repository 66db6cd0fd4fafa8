"""bridge.edge.ws_connection: what a WebSocket client can make the broker hold is bounded.

Before these bounds one connection that never sent CONNECT and never read grew the broker
by 120 MB with 1M pings (security issue, finding 3).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from bench.mqttws import masked_frame
from bridge.edge.ws_connection import PREAUTH_PINGS
from tests.conftest import DEADLINE_S, BrokerThread, authed_connect, bridge_config, unique, wait_until
from tests.edge.test_streams import closed_by_peer, raw_ws

OP_BINARY, OP_PING = 0x2, 0x9


@pytest.fixture
def patient_broker() -> Iterator[BrokerThread]:
    # Long connect timeout, smallest outbound bound and send buffer: a close seen quickly
    # comes from the bounds under test.
    config = bridge_config(
        broker={"connect_timeout_s": 120, "max_outbound_bytes": 4096, "socket_send_buffer_bytes": 4096}
    )
    with BrokerThread(config) as running:
        yield running


def flood(sock: socket.socket, frame: bytes, count: int, deadline_s: float = DEADLINE_S) -> bool:
    """Send ``frame`` ``count`` times without reading; True if the broker closed on us first."""
    batch = frame * 1000
    deadline = time.monotonic() + deadline_s
    sent = 0
    try:
        while sent < count and time.monotonic() < deadline:
            sock.sendall(batch)
            sent += 1000
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def test_pings_before_connect_are_capped(patient_broker: BrokerThread) -> None:
    sock = raw_ws(patient_broker.ws_port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    closed = flood(sock, masked_frame(b"p" * 125, OP_PING), 20_000)
    assert closed or closed_by_peer(sock)
    sock.close()


def test_a_few_pings_before_connect_are_answered_and_login_works(patient_broker: BrokerThread) -> None:
    sock = raw_ws(patient_broker.ws_port)
    for _ in range(PREAUTH_PINGS):
        sock.sendall(masked_frame(b"hi", OP_PING))
    sock.sendall(masked_frame(authed_connect(unique("pinger"), role="subscriber")))
    received = b""
    while b"\x82\x04\x20\x02\x00\x00" not in received:  # the CONNACK's binary frame
        chunk = sock.recv(4096)
        assert chunk, f"closed; got {received!r}"
        received += chunk
    assert received.count(b"\x8a\x02hi") == PREAUTH_PINGS  # every ping got its pong
    sock.close()


def test_a_message_over_the_connect_budget_before_login_closes(patient_broker: BrokerThread) -> None:
    broker = patient_broker
    sock = raw_ws(broker.ws_port)
    budget = broker.call(lambda: broker.broker._connect_budget)
    # Refused from the frame header: the payload is never sent, let alone buffered.
    header = bytes((0x82, 0xFF)) + (budget + 1).to_bytes(8, "big") + b"mask"
    sock.sendall(header)
    # websockets answers with a close frame, 1009 (message too big), and waits for ours.
    close = sock.recv(4)
    assert (close[0], close[2:]) == (0x88, (1009).to_bytes(2, "big"))
    sock.close()  # the server failed the connection: the client closes TCP (RFC 6455 7.1.1)
    wait_until(lambda: broker.call(lambda: broker.broker.stats.refusals["too_large"]) == 1, what="refusal")


def test_unread_pongs_after_login_close_the_connection(patient_broker: BrokerThread) -> None:
    broker = patient_broker
    sock = raw_ws(broker.ws_port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(masked_frame(authed_connect(unique("pongs"), role="subscriber")))
    assert sock.recv(6) == b"\x82\x04\x20\x02\x00\x00"
    # 125-byte pings, never reading the pongs: past ~1 MB unread the broker gives up.
    closed = flood(sock, masked_frame(b"p" * 125, OP_PING), 200_000)
    assert closed or closed_by_peer(sock)
    wait_until(lambda: broker.call(lambda: broker.broker.stats.connections) == 0, what="closed")
    sock.close()
