"""bridge.core.wsframes: a client's frames from bytes, table-driven, no sockets."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from bench.mqttws import masked_frame
from bridge.core.wsframes import BINARY, CLOSE, CONT, PING, PONG, TEXT, FrameError, FrameReader, close_echo

MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A client frame built by websockets' own serializer (the reference for ours)."""
    data = Frame(Opcode(opcode), payload, fin=fin).serialize(mask=masked)
    return bytes((data[0] | rsv,)) + data[1:]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (frame(BINARY, b"\x10\x0c"), [(BINARY, b"\x10\x0c")]),
        (frame(BINARY, b""), [(BINARY, b"")]),
        (frame(BINARY, bytes(range(256)) * 3), [(BINARY, bytes(range(256)) * 3)]),  # 16-bit length
        (frame(BINARY, b"x" * 70_000), [(BINARY, b"x" * 70_000)]),  # 64-bit length
        (frame(BINARY, b"ab", fin=False) + frame(CONT, b"cd"), [(BINARY, b"ab"), (CONT, b"cd")]),
        (
            frame(PING, b"hi") + frame(PONG, b"") + frame(TEXT, b"t"),
            [(PING, b"hi"), (PONG, b""), (TEXT, b"t")],
        ),
        (
            frame(BINARY, b"a", fin=False) + frame(PING, b"") + frame(CONT, b"b"),
            [(BINARY, b"a"), (PING, b""), (CONT, b"b")],
        ),
        (frame(CLOSE, (1000).to_bytes(2, "big")), [(CLOSE, b"\x03\xe8")]),
    ],
)
def test_whole_frames_come_out_unmasked_and_in_order(data: bytes, expected: list[tuple[int, bytes]]) -> None:
    assert FrameReader(1 << 20).feed(data) == expected


def test_a_frame_split_anywhere_comes_out_once_whole() -> None:
    data = frame(BINARY, b"hello") + frame(BINARY, b"y" * 300) + masked_frame(b"")
    for cut in range(len(data) + 1):
        reader = FrameReader(1 << 20)
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert got == [(BINARY, b"hello"), (BINARY, b"y" * 300), (BINARY, b"")], cut


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (frame(BINARY, b"x", masked=False), 1002, "websocket_framing"),
        (frame(BINARY, b"x", rsv=0x40), 1002, "websocket_framing"),
        (bytes((0x83, 0x80)) + MASK, 1002, "websocket_framing"),  # reserved data opcode
        (bytes((0x8B, 0x80)) + MASK, 1002, "websocket_framing"),  # reserved control opcode
        (bytes((0x09, 0x80)) + MASK, 1002, "websocket_framing"),  # a ping without FIN
        (bytes((0x89, 0xFE, 0x00, 0x7E)) + MASK, 1002, "websocket_framing"),  # 126-byte ping
        (frame(CONT, b"x"), 1002, "websocket_framing"),
        (frame(BINARY, b"a", fin=False) + frame(BINARY, b"b"), 1002, "websocket_framing"),
        (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big"), 1002, "websocket_framing"),
        # Over max_size, refused from the header: the payload need not arrive.
        (bytes((0x82, 0xFE)) + (101).to_bytes(2, "big"), 1009, "too_large"),
        (frame(BINARY, b"a" * 60, fin=False) + frame(CONT, b"b" * 41), 1009, "too_large"),
    ],
)
def test_a_broken_frame_raises_with_the_close_code(data: bytes, code: int, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        FrameReader(100).feed(data)
    assert (info.value.code, info.value.reason) == (code, reason)


def test_the_size_limit_can_be_raised_after_login() -> None:
    reader = FrameReader(100)
    reader.max_size = 1000
    assert reader.feed(frame(BINARY, b"z" * 500)) == [(BINARY, b"z" * 500)]


@pytest.mark.parametrize(
    ("payload", "echo"),
    [
        (b"", b""),
        (b"\x03\xe8", b"\x03\xe8"),
        (b"\x03\xe9bye", b"\x03\xe9bye"),
        ((4000).to_bytes(2, "big") + "é".encode(), (4000).to_bytes(2, "big") + "é".encode()),
    ],
)
def test_a_valid_close_is_echoed(payload: bytes, echo: bytes) -> None:
    assert close_echo(payload) == echo


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),
        ((999).to_bytes(2, "big"), 1002),
        ((1005).to_bytes(2, "big"), 1002),
        (b"\x03\xe8\xff", 1007),
    ],
)
def test_an_invalid_close_raises(payload: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        close_echo(payload)
    assert info.value.code == code
