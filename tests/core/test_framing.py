"""framing: packets out of a byte stream cut anywhere, PUBLISH fields, PUBACK bytes. Pure, no sockets.

Expected bytes come from amqtt's own packet classes where they exist, so these tests do not
check the splitter against a second copy of its own arithmetic.
"""

from __future__ import annotations

import itertools

import pytest
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.framing import PacketSplitter, Publish, check_header, parse_publish, puback
from bridge.core.wire import remaining_length
from bridge.errors import ProtocolError

MAX = 1 << 28  # nothing is too large unless a test says so


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


def feed_in_pieces(splitter: PacketSplitter, data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Everything ``splitter`` returns when ``data`` arrives cut at ``cuts``."""
    bounds = [0, *sorted(set(cuts)), len(data)]
    out: list[tuple[int, bytes]] = []
    for start, end in itertools.pairwise(bounds):
        out.extend(splitter.feed(data[start:end]))
    return out


# --- splitting --------------------------------------------------------------------------------


@st.composite
def _bodies(draw: st.DrawFn, sizes: st.SearchStrategy[int]) -> bytes:
    """A body of a drawn size, its bytes a drawn pattern repeated (big bodies cost no entropy)."""
    size = draw(sizes)
    pattern = draw(st.binary(min_size=1, max_size=16))
    return (pattern * (size // len(pattern) + 1))[:size]


_small_bodies = _bodies(st.integers(min_value=0, max_value=200))
# Lengths around the 1/2 and 2/3-byte boundaries, so cuts fall inside multi-byte lengths too.
_any_bodies = st.one_of(_small_bodies, _bodies(st.sampled_from([126, 127, 128, 129, 16_383, 16_384, 16_385])))


def _packet_lists(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    return st.lists(st.tuples(st.integers(min_value=0, max_value=255), bodies), min_size=1, max_size=12)


@given(packets=_packet_lists(_any_bodies), data=st.data())
def test_any_split_of_a_stream_yields_the_same_packets(
    packets: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(packet(first, body) for first, body in packets)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=40))
    splitter = PacketSplitter(MAX)
    assert feed_in_pieces(splitter, stream, cuts) == packets
    assert splitter.buffered == 0


@given(packets=_packet_lists(_small_bodies))
def test_byte_by_byte_yields_each_packet_once_its_last_byte_arrives(packets: list[tuple[int, bytes]]) -> None:
    splitter = PacketSplitter(MAX)
    ends: list[int] = []
    position = 0
    for first, body in packets:
        position += len(packet(first, body))
        ends.append(position)
    stream = b"".join(packet(first, body) for first, body in packets)
    got: list[tuple[int, bytes]] = []
    for index in range(len(stream)):
        new = splitter.feed(stream[index : index + 1])
        if index + 1 in ends:
            assert len(new) == 1, f"packet ending at byte {index + 1} not returned at once"
        else:
            assert new == []
        got.extend(new)
    assert got == packets


def test_empty_feed_returns_nothing_and_keeps_the_partial_packet() -> None:
    splitter = PacketSplitter(MAX)
    assert splitter.feed(b"") == []
    assert splitter.feed(b"\x30\x05\x00\x01a") == []
    assert splitter.buffered == 5
    assert splitter.feed(b"") == []
    assert splitter.feed(b"xy") == [(0x30, b"\x00\x01axy")]
    assert splitter.buffered == 0


def test_packets_with_empty_bodies() -> None:
    # PINGREQ, DISCONNECT: two bytes each, nothing after the length.
    assert PacketSplitter(MAX).feed(b"\xc0\x00\xe0\x00") == [(0xC0, b""), (0xE0, b"")]


@pytest.mark.parametrize(
    ("length", "header_bytes"),
    [
        (0, 1),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
    ],
)
def test_remaining_length_of_one_to_four_bytes(length: int, header_bytes: int) -> None:
    body = bytes(range(256)) * (length // 256) + bytes(length % 256)
    data = packet(0x30, body)
    assert len(data) == 1 + header_bytes + length
    assert PacketSplitter(MAX).feed(data) == [(0x30, body)]
    if length:
        # The header alone, then all but the last byte: nothing until the packet is whole.
        splitter = PacketSplitter(MAX)
        assert splitter.feed(data[: 1 + header_bytes]) == []
        assert splitter.feed(data[1 + header_bytes : -1]) == []
        assert splitter.buffered == len(data) - 1
        assert splitter.feed(data[-1:]) == [(0x30, body)]
        assert splitter.buffered == 0


def test_largest_four_byte_length_is_read_not_refused() -> None:
    splitter = PacketSplitter(MAX)
    assert splitter.feed(b"\x30\xff\xff\xff\x7f") == []  # 268,435,455: waits for its body
    assert splitter.buffered == 5


@pytest.mark.parametrize(
    "chunks",
    [
        [b"\x30\xff\xff\xff\xff\x01"],
        [b"\x30\xff\xff\xff\xff"],  # the fifth length byte need not even arrive
        [b"\x30\xff", b"\xff\xff\xff"],
        [b"\x30", b"\x80", b"\x80", b"\x80", b"\x80"],
        [b"\xc0\x00\x30\xff\xff\xff\xff\x7f"],  # after a good packet in the same chunk
    ],
)
def test_five_byte_remaining_length_is_malformed(chunks: list[bytes]) -> None:
    splitter = PacketSplitter(MAX)
    for chunk in chunks[:-1]:
        assert splitter.feed(chunk) == []  # an incomplete length waits
    with pytest.raises(ProtocolError) as info:
        splitter.feed(chunks[-1])
    assert info.value.reason == "malformed_length"


def test_incomplete_length_waits() -> None:
    splitter = PacketSplitter(MAX)
    assert splitter.feed(b"\x30\xff\xff\xff") == []
    assert splitter.buffered == 4


@pytest.mark.parametrize(
    ("max_packet", "length", "refused"),
    [
        (1024, 1024, False),
        (1024, 1025, True),
        (1024, 2_097_152, True),
        (128, 127, False),
        (128, 129, True),
    ],
)
def test_too_large_is_refused_from_the_header_alone(max_packet: int, length: int, refused: bool) -> None:
    header = b"\x30" + remaining_length(length)
    splitter = PacketSplitter(max_packet)
    if refused:
        with pytest.raises(ProtocolError) as info:
            splitter.feed(header)  # no body byte has arrived
        assert info.value.reason == "too_large"
        assert str(max_packet) in info.value.detail
    else:
        assert splitter.feed(header) == []
        assert splitter.feed(bytes(length)) == [(0x30, bytes(length))]


def test_too_large_packet_after_good_ones_in_one_chunk() -> None:
    splitter = PacketSplitter(16)
    with pytest.raises(ProtocolError) as info:
        splitter.feed(packet(0x30, b"\x00\x01a") + b"\x30" + remaining_length(17))
    assert info.value.reason == "too_large"


# --- PUBLISH ----------------------------------------------------------------------------------


def _body(topic: bytes, packet_id: int | None, payload: bytes) -> bytes:
    pid = b"" if packet_id is None else packet_id.to_bytes(2, "big")
    return len(topic).to_bytes(2, "big") + topic + pid + payload


@pytest.mark.parametrize(
    ("first", "body", "expected"),
    [
        (0x30, _body(b"a/b", None, b"hi"), Publish("a/b", 0, False, False, None, b"hi")),
        (0x31, _body(b"a/b", None, b""), Publish("a/b", 0, True, False, None, b"")),
        (0x32, _body(b"a/b", 1, b"x"), Publish("a/b", 1, False, False, 1, b"x")),
        (0x3A, _body(b"a/b", 65535, b"x"), Publish("a/b", 1, False, True, 65535, b"x")),
        (0x3B, _body(b"a/b", 7, b""), Publish("a/b", 1, True, True, 7, b"")),
        (0x34, _body(b"a/b", 300, b"x"), Publish("a/b", 2, False, False, 300, b"x")),
        (0x30, _body(b"", None, b""), Publish("", 0, False, False, None, b"")),
        (
            0x30,
            _body("market/€/é".encode(), None, b"\xff\x00"),
            Publish("market/€/é", 0, False, False, None, b"\xff\x00"),
        ),
        # A QoS 0 payload that happens to start like a packet id stays payload.
        (0x30, _body(b"t", None, b"\x00\x00"), Publish("t", 0, False, False, None, b"\x00\x00")),
    ],
)
def test_parse_publish(first: int, body: bytes, expected: Publish) -> None:
    assert parse_publish(first, body) == expected


@pytest.mark.parametrize(
    ("first", "body", "reason"),
    [
        (0x36, _body(b"a", 1, b""), "malformed_publish"),  # QoS 3
        (0x37, _body(b"a", 1, b""), "malformed_publish"),  # QoS 3 with retain
        (0x32, _body(b"a", 0, b"x"), "malformed_publish"),  # packet id 0
        (0x34, _body(b"a", 0, b""), "malformed_publish"),
        (0x30, b"", "malformed_publish"),
        (0x30, b"\x00", "malformed_publish"),
        (0x30, b"\x00\x05abc", "malformed_publish"),  # topic longer than the body
        (0x32, b"\x00\x01a", "malformed_publish"),  # no packet id
        (0x32, b"\x00\x01a\x00", "malformed_publish"),  # half a packet id
        (0x30, _body(b"\xff\xfe", None, b""), "bad_utf8"),
        (0x30, _body(b"a\xc3", None, b"x"), "bad_utf8"),  # cut multi-byte sequence
        (0x30, _body(b"\xed\xa0\x80", None, b""), "bad_utf8"),  # surrogate
    ],
)
def test_parse_publish_refuses(first: int, body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_publish(first, body)
    assert info.value.reason == reason


@given(
    topic=st.text(max_size=60).filter(lambda t: "#" not in t and "+" not in t),  # amqtt refuses those
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1, 2]),
    packet_id=st.integers(min_value=1, max_value=65535),
    retain=st.booleans(),
    dup=st.booleans(),
)
def test_parse_publish_reads_what_amqtt_writes(
    topic: str, payload: bytes, qos: int, packet_id: int, retain: bool, dup: bool
) -> None:
    pid = packet_id if qos else None
    data = bytes(PublishPacket.build(topic, payload, pid, dup, qos, retain).to_bytes())
    ((first, body),) = PacketSplitter(MAX).feed(data)
    assert parse_publish(first, body) == Publish(topic, qos, retain, dup, pid, payload)


# --- PUBACK -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([], b""),
        ([1], b"\x40\x02\x00\x01"),
        ([256], b"\x40\x02\x01\x00"),
        ([65535], b"\x40\x02\xff\xff"),
        ([3, 1, 2], b"\x40\x02\x00\x03\x40\x02\x00\x01\x40\x02\x00\x02"),
    ],
)
def test_puback_bytes(ids: list[int], expected: bytes) -> None:
    assert puback(ids) == expected


@given(st.lists(st.integers(min_value=1, max_value=65535), max_size=20))
def test_puback_matches_amqtt_and_splits_back(ids: list[int]) -> None:
    data = puback(ids)
    assert data == b"".join(bytes(PubackPacket.build(pid).to_bytes()) for pid in ids)
    assert PacketSplitter(MAX).feed(data) == [(0x40, pid.to_bytes(2, "big")) for pid in ids]


@pytest.mark.parametrize(
    ("first", "length", "ok"),
    [
        (0x40, 2, True),  # PUBACK
        (0x40, 3, False),
        (0x41, 2, False),  # PUBACK flags must be 0
        (0x62, 2, True),  # PUBREL flags 0b0010
        (0x60, 2, False),
        (0x82, 8, True),  # SUBSCRIBE
        (0x80, 8, False),
        (0xA2, 5, True),  # UNSUBSCRIBE
        (0xA0, 5, False),
        (0xC0, 0, True),  # PINGREQ
        (0xC0, 1, False),
        (0xE0, 0, True),  # DISCONNECT
        (0xE0, 2, False),
        (0xE1, 0, False),
    ],
)
def test_check_header(first: int, length: int, ok: bool) -> None:
    if ok:
        check_header(first, length)
    else:
        with pytest.raises(ProtocolError) as raised:
            check_header(first, length)
        assert raised.value.reason == "malformed_packet"
