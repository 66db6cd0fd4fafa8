"""Admission (bridge/edge/admission.py): what MQTT 3.1.1 says closes a connection at CONNECT closes
it at once, and a client vanishing at any point of its connect leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from bench.mqttws import masked_frame
from tests.conftest import (
    BrokerThread,
    Client,
    Transport,
    authed_connect,
    bridge_config,
    connect_packet,
    subscribe_packet,
    token_for,
    unique,
    varint,
    wait_until,
)
from tests.edge.test_broker import _exchange, _raw
from tests.edge.test_streams import raw_ws

TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ClientFactory = Callable[..., Client]


# --- protocol laxness: what MQTT 3.1.1 says closes the connection, closes it at once -------


@pytest.fixture
def patient_broker() -> Iterator[BrokerThread]:
    # A long connect timeout: a close seen within the deadline came from the check under test.
    with BrokerThread(bridge_config(broker={"connect_timeout_s": 120})) as running:
        yield running


def _mqtt5_connect(user: str) -> bytes:
    """An MQTT 5 CONNECT with credentials and properties (what MQTT.js sends with protocolVersion 5)."""
    token = token_for(user, "subscriber").encode()
    body = (
        b"\x00\x04MQTT\x05\xc2\x00\x3c"
        + b"\x05\x11\x00\x00\x0e\x10"  # properties: session expiry 3600
        + len(user).to_bytes(2, "big")
        + user.encode()
        + b"\x00"  # will properties: none (no will), then user name and password
        + len(user).to_bytes(2, "big")
        + user.encode()
        + len(token).to_bytes(2, "big")
        + token
    )
    return b"\x10" + varint(len(body)) + body


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mqtt5_connect_gets_connack_1_at_once(patient_broker: BrokerThread, transport: Transport) -> None:
    received, closed = _exchange(patient_broker.port(transport), transport, _mqtt5_connect(unique("v5")))
    assert (received, closed) == (b"\x20\x02\x00\x01", True)  # [MQTT-3.1.2-2]


BAD_CONNECTS = [
    ("PUBLISH first", b"\x30\x05\x00\x01ax", "not_connect"),
    ("SUBSCRIBE first", subscribe_packet(1, "market/#"), "not_connect"),
    ("PINGREQ first", b"\xc0\x00", "not_connect"),
    ("reserved flag", authed_connect("r1").replace(b"MQTT\x04\xc2", b"MQTT\x04\xc3"), "malformed_connect"),
    ("will QoS 3", connect_packet("w3", will=("status/x", b"x"), will_qos=3), "malformed_connect"),
    ("NUL in client id", connect_packet("a\x00b"), "bad_utf8"),
    ("newline and ANSI in client id are fine, NUL is not", connect_packet("x\n\x1b[31m\x00"), "bad_utf8"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("what", "data", "reason"), BAD_CONNECTS, ids=[b[0] for b in BAD_CONNECTS])
def test_bad_first_packets_close_at_once_without_connack(
    patient_broker: BrokerThread, transport: Transport, what: str, data: bytes, reason: str
) -> None:
    received, closed = _exchange(patient_broker.port(transport), transport, data)
    assert (received, closed) == (b"", True), what
    wait_until(
        lambda: patient_broker.call(lambda: patient_broker.broker.stats.refusals[reason]) == 1, what=reason
    )


BAD_SUBSCRIBES = [
    ("packet id 0", subscribe_packet(0, "market/#"), "malformed_packet"),
    ("NUL in a filter outside the ACL", subscribe_packet(1, "user/bob/\x00"), "bad_utf8"),
    ("NUL in an allowed filter", subscribe_packet(1, "market/\x00"), "bad_utf8"),
    ("UNSUBSCRIBE with packet id 0", b"\xa2\x05\x00\x00\x00\x01a", "malformed_packet"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("what", "data", "reason"), BAD_SUBSCRIBES, ids=[b[0] for b in BAD_SUBSCRIBES])
def test_malformed_subscribes_close_the_connection(
    broker: BrokerThread, transport: Transport, what: str, data: bytes, reason: str
) -> None:
    user = unique("alice")
    received, closed = _exchange(
        broker.port(transport), transport, authed_connect(user, role="subscriber") + data
    )
    assert (received, closed) == (b"\x20\x02\x00\x00", True), what  # a CONNACK, no SUBACK
    wait_until(lambda: broker.call(lambda: broker.broker.stats.protocol_errors[reason]) == 1, what=reason)


# --- a client that vanishes at any point of its connect leaves nothing behind ----------------


def _cut_and_close(port: int, transport: Transport, data: bytes) -> None:
    if transport == "tcp":
        sock = _raw(port)
        sock.sendall(data)
    else:
        sock = raw_ws(port)
        sock.sendall(masked_frame(data))
    sock.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_closing_at_any_point_of_its_connect_leaves_no_connection(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    """Was: ten phones that sent CONNECT and vanished held the user's ten slots for good."""
    user = unique("ghost")
    connect = connect_packet(
        user, clean=False, username=user.encode(), password=token_for(user, "subscriber").encode()
    )
    subscribe = subscribe_packet(1, f"user/{user}/#", 1)
    stream = connect + subscribe
    # Every prefix of the connect sequence (CONNECT, then a SUBSCRIBE), on its own socket.
    for cut in range(1, len(stream) + 1):
        _cut_and_close(broker.port(transport), transport, stream[:cut])
    running = broker.broker

    def settled() -> bool:
        return (running.stats.connections, running.limits.total, len(running._connections)) == (
            0,
            0,
            0,
        ) and not any(session.transitions.is_connected() for session, _ in running.sessions.values())

    wait_until(lambda: broker.call(settled), what="every connection released")
    # Not locked out: the user's next CONNECT is accepted, on the same persistent session.
    back = clients(
        broker.port(transport),
        transport=transport,
        client_id=user,
        clean_session=False,
        username=user,
        password=token_for(user, "subscriber"),
    )
    back.connect()
