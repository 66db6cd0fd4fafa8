"""bridge.core.connect: the CONNECT is read and checked before anything about the client is believed."""

from __future__ import annotations

import asyncio

import pytest

from bridge.core.connect import (
    CONNACK_BAD_CLIENT_ID,
    CONNACK_BAD_PROTOCOL,
    MAX_CLIENT_ID_BYTES,
    Connect,
    ConnectRefused,
    Will,
    connect_preamble,
    parse_connect,
    read_connect,
)
from bridge.errors import ProtocolError
from tests.conftest import mqtt_str, packet, varint

BUDGET = 4096


_s = mqtt_str


def body(
    flags: int = 0x02,
    client_id: bytes = b"c1",
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    keep_alive: int = 30,
    payload: bytes | None = None,
) -> bytes:
    rest = _s(client_id) if payload is None else payload
    return _s(name) + bytes([level, flags]) + keep_alive.to_bytes(2, "big") + rest


def connect_bytes(data: bytes) -> bytes:
    return packet(0x10, data)


VALID = [
    (body(), Connect("c1", True, 30, None, None, None)),
    (body(0x00, keep_alive=0), Connect("c1", False, 0, None, None, None)),
    (body(0x02, b""), Connect("", True, 30, None, None, None)),
    (
        body(0xC2, payload=_s(b"c1") + _s(b"alice") + _s(b"tok\xff")),
        Connect("c1", True, 30, None, "alice", b"tok\xff"),
    ),
    (
        body(0x02 | 0x04 | 0x08 | 0x20, payload=_s(b"c1") + _s(b"market/luno/BTC-ZAR") + _s(b"{}")),
        Connect("c1", True, 30, Will("market/luno/BTC-ZAR", b"{}", 1, True), None, None),
    ),
    (body(0x02, "ñandú-Ωμέγα".encode()), Connect("ñandú-Ωμέγα", True, 30, None, None, None)),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_connects_parse(data: bytes, expected: Connect) -> None:
    assert parse_connect(data) == expected


CLOSED = [
    ("reserved flag", body(0x03), "malformed_connect"),
    ("will QoS 3", body(0x02 | 0x04 | 0x18, payload=_s(b"c") + _s(b"t") + _s(b"m")), "malformed_connect"),
    ("will QoS without will", body(0x02 | 0x08), "malformed_connect"),
    ("will retain without will", body(0x02 | 0x20), "malformed_connect"),
    ("password without user name", body(0x42, payload=_s(b"c") + _s(b"p")), "malformed_connect"),
    ("NUL in client id", body(0x02, b"a\x00b"), "bad_utf8"),
    ("bad UTF-8 client id", body(0x02, b"\xff\xfe"), "bad_utf8"),
    ("NUL in will topic", body(0x06, payload=_s(b"c") + _s(b"a\x00") + _s(b"m")), "bad_utf8"),
    ("NUL in user name", body(0x82, payload=_s(b"c") + _s(b"al\x00ice")), "bad_utf8"),
    ("surrogate in client id", body(0x02, b"\xed\xa0\x80"), "bad_utf8"),
    ("bytes after the payload", body() + b"junk", "malformed_connect"),
    ("client id cut short", body(payload=b"\x00\x09abc"), "malformed_connect"),
    ("no keep-alive", _s(b"MQTT") + bytes([4, 2]), "malformed_connect"),
    ("will flag but no will", body(0x06), "malformed_connect"),
]


@pytest.mark.parametrize(("what", "data", "reason"), CLOSED, ids=[c[0] for c in CLOSED])
def test_violations_close_without_connack(what: str, data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_connect(data)
    assert not isinstance(caught.value, ConnectRefused), what
    assert caught.value.reason == reason


REFUSED = [
    ("MQTT 5", body(level=5), CONNACK_BAD_PROTOCOL),
    ("MQTT 3.1", body(name=b"MQIsdp", level=3), CONNACK_BAD_PROTOCOL),
    ("empty id, persistent", body(0x00, b""), CONNACK_BAD_CLIENT_ID),
    ("id too long", body(0x02, b"x" * (MAX_CLIENT_ID_BYTES + 1)), CONNACK_BAD_CLIENT_ID),
]


@pytest.mark.parametrize(("what", "data", "code"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refusals_carry_their_connack_code(what: str, data: bytes, code: int) -> None:
    with pytest.raises(ConnectRefused) as caught:
        parse_connect(data)
    assert caught.value.code == code, what


def test_longest_client_id_is_accepted() -> None:
    assert parse_connect(body(0x02, b"x" * MAX_CLIENT_ID_BYTES)).client_id == "x" * MAX_CLIENT_ID_BYTES


# --- the preamble: judged as early as the bytes allow ------------------------------------


def test_a_non_connect_first_packet_is_refused_from_its_first_byte() -> None:
    for first in (0x30, 0x82, 0xC0, 0xE0, 0x00, 0xF0):
        with pytest.raises(ProtocolError, match="before CONNECT"):
            connect_preamble(bytes([first]), BUDGET)
    with pytest.raises(ProtocolError, match="flags"):
        connect_preamble(b"\x11", BUDGET)


def test_mqtt5_is_refused_from_the_level_byte_whatever_follows() -> None:
    # An MQTT 5 CONNECT: properties, credentials... none of it needs to arrive, or be 3.1.1.
    head = connect_bytes(body(0xC2, level=5, payload=b"\x00" * 100))[:11]
    with pytest.raises(ConnectRefused) as caught:
        connect_preamble(head, BUDGET)
    assert caught.value.code == CONNACK_BAD_PROTOCOL
    # One byte less and the level has not arrived yet: wait.
    assert connect_preamble(head[:8], BUDGET) is None


def test_an_oversized_connect_is_refused_from_its_length() -> None:
    head = b"\x10" + varint(BUDGET + 1)
    with pytest.raises(ConnectRefused) as caught:
        connect_preamble(head, BUDGET)
    assert (caught.value.code, caught.value.reason) == (5, "too_large")
    with pytest.raises(ProtocolError, match="four bytes"):
        connect_preamble(b"\x10\xff\xff\xff\xff\x01", BUDGET)


def test_unknown_protocol_names_close() -> None:
    with pytest.raises(ProtocolError) as caught:
        connect_preamble(connect_bytes(body(name=b"HTTP")), BUDGET)
    assert caught.value.reason == "bad_protocol"


def test_read_connect_returns_what_came_after_it() -> None:
    first = connect_bytes(body())
    extra = b"\x82\x06\x00\x01\x00\x01a\x00"

    async def run() -> tuple[Connect, bytes] | None:
        chunks = [first[:3], first[3:] + extra[:4], extra[4:]]

        async def read() -> bytes:
            return chunks.pop(0) if chunks else b""

        return await read_connect(read, BUDGET)

    result = asyncio.run(run())
    assert result is not None
    connect, rest = result
    assert connect.client_id == "c1"
    assert rest == extra[:4]  # the rest of a later chunk is the handler's to read


def test_read_connect_sees_the_peer_close() -> None:
    async def run() -> tuple[Connect, bytes] | None:
        chunks = [b"\x10\x10\x00"]

        async def read() -> bytes:
            return chunks.pop(0) if chunks else b""

        return await read_connect(read, BUDGET)

    assert asyncio.run(run()) is None
