"""wire: PUBLISH and WebSocket frames byte for byte, checked against amqtt's and websockets' own codecs."""

from __future__ import annotations

import pytest
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from bridge.core.topics import is_valid_topic
from bridge.core.wire import (
    connack,
    publish,
    publish_acked_parts,
    publish_qos0,
    remaining_length,
    suback,
    ws_binary_frame,
    ws_frame_header,
)


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length(length: int, encoded: bytes) -> None:
    assert remaining_length(length) == encoded


@pytest.mark.parametrize("length", [-1, 268_435_456])
def test_remaining_length_out_of_range(length: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        remaining_length(length)


@given(
    st.text(min_size=1, max_size=80).filter(is_valid_topic),
    st.binary(max_size=70_000),
    st.booleans(),
)
def test_publish_matches_amqtt(topic: str, payload: bytes, retain: bool) -> None:
    expected = PublishPacket.build(topic, payload, None, False, 0, retain).to_bytes()
    assert publish_qos0(topic.encode(), payload, retain=retain) == bytes(expected)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_ws_frame_matches_websockets(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = Frame(Opcode.BINARY, data).serialize(mask=False, extensions=[])
    assert ws_binary_frame(data) == expected


@given(
    st.text(min_size=1, max_size=80).filter(is_valid_topic),
    st.one_of(st.binary(max_size=300), st.sampled_from([bytes(120), bytes(65_520), bytes(70_000)])),
    st.integers(min_value=1, max_value=65535),
    st.sampled_from([1, 2]),
    st.booleans(),
)
def test_acked_parts_around_a_packet_id_match_amqtt(
    topic: str, payload: bytes, packet_id: int, qos: int, retain: bool
) -> None:
    head, tail = publish_acked_parts(topic.encode(), payload, qos=qos, retain=retain, websocket=False)
    expected = bytes(PublishPacket.build(topic, payload, packet_id, False, qos, retain).to_bytes())
    assert head + packet_id.to_bytes(2, "big") + tail == expected


@given(
    st.text(min_size=1, max_size=80).filter(is_valid_topic),
    # Frame sizes either side of 126 and 65536 bytes (7-bit, 16-bit and 64-bit lengths).
    st.one_of(
        st.binary(max_size=300), st.sampled_from([bytes(115), bytes(122), bytes(65_520), bytes(70_000)])
    ),
    st.integers(min_value=1, max_value=65535),
)
def test_qos1_parts_in_a_websocket_frame_match_websockets(topic: str, payload: bytes, packet_id: int) -> None:
    head, tail = publish_acked_parts(topic.encode(), payload, websocket=True)
    packet = bytes(PublishPacket.build(topic, payload, packet_id, False, 1, False).to_bytes())
    expected = Frame(Opcode.BINARY, packet).serialize(mask=False, extensions=[])
    assert head + packet_id.to_bytes(2, "big") + tail == expected


def test_qos1_parts_share_everything_but_the_packet_id() -> None:
    head, tail = publish_acked_parts(b"market/luno/BTC-ZAR", b"{}", websocket=False)
    assert head == b"\x32\x19\x00\x13market/luno/BTC-ZAR"
    assert tail == b"{}"


@pytest.mark.parametrize("qos", [0, 3])
def test_acked_parts_refuse_a_qos_without_packet_id(qos: int) -> None:
    with pytest.raises(ValueError, match="packet id"):
        publish_acked_parts(b"t", b"", qos=qos, websocket=False)


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (2**32, b"\x82\x7f\x00\x00\x00\x01\x00\x00\x00\x00"),
    ],
)
def test_ws_frame_header(size: int, header: bytes) -> None:
    assert ws_frame_header(size) == header
    if size <= 70_000:
        data = bytes(size)
        assert Frame(Opcode.BINARY, data).serialize(mask=False, extensions=[]) == header + data


@pytest.mark.parametrize("code", range(6))
@pytest.mark.parametrize("present", [False, True])
def test_connack_matches_amqtt(code: int, present: bool) -> None:
    # A refusal never says a session is present ([MQTT-3.2.2-4]).
    expected = ConnackPacket.build(int(present and code == 0), code).to_bytes()
    assert connack(code, session_present=present) == bytes(expected)


@given(st.integers(1, 65535), st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=300))
def test_suback_matches_amqtt(packet_id: int, codes: list[int]) -> None:
    assert suback(packet_id, codes) == bytes(SubackPacket.build(packet_id, codes).to_bytes())


@given(
    st.text(min_size=1, max_size=80).filter(is_valid_topic),
    st.one_of(st.binary(max_size=300), st.sampled_from([bytes(120), bytes(70_000)])),
    st.integers(min_value=1, max_value=65535),
    st.sampled_from([1, 2]),
    st.booleans(),
)
def test_publish_with_a_packet_id_matches_amqtt(
    topic: str, payload: bytes, packet_id: int, qos: int, dup: bool
) -> None:
    expected = bytes(PublishPacket.build(topic, payload, packet_id, dup, qos, False).to_bytes())
    assert publish(topic.encode(), payload, qos=qos, packet_id=packet_id, dup=dup) == expected
