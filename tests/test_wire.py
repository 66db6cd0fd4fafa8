"""wire: PUBLISH and WebSocket frames byte for byte, checked against amqtt's and websockets' own codecs."""

from __future__ import annotations

import pytest
from amqtt.mqtt.publish import PublishPacket
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from bridge.topics import is_valid_topic
from bridge.wire import publish_qos0, remaining_length, ws_binary_frame


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
