"""Bytes on the wire, built once per message and reused for every subscriber.

Pure: MQTT 3.1.1 PUBLISH packets (QoS 1/2 ones around their packet id) and server-to-client WebSocket binary frames. A
server's frames are unmasked (RFC 6455 5.1), so one frame serves every WebSocket
subscriber of the same payload.
"""

from __future__ import annotations

__all__ = [
    "connack",
    "publish",
    "publish_acked_parts",
    "publish_qos0",
    "remaining_length",
    "suback",
    "ws_binary_frame",
    "ws_frame_header",
]


_ONE_BYTE = tuple(bytes((n,)) for n in range(128))


def remaining_length(length: int) -> bytes:
    """MQTT variable-length integer (1 to 4 bytes)."""
    if 0 <= length < 16_384:  # one or two bytes: nearly every packet, on the hot path
        return _ONE_BYTE[length] if length < 128 else bytes(((length & 0x7F) | 0x80, length >> 7))
    if not 0 <= length <= 268_435_455:
        raise ValueError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


# Every CONNACK there is: (session present, return code) -> packet ([MQTT-3.2]).
_CONNACKS = {
    (present, code): bytes((0x20, 2, int(present), code)) for present in (False, True) for code in range(6)
}


def connack(code: int, *, session_present: bool = False) -> bytes:
    """A CONNACK; a refusal never says a session is present ([MQTT-3.2.2-4])."""
    return _CONNACKS[(session_present and code == 0, code)]


def suback(packet_id: int, codes: list[int]) -> bytes:
    """A SUBACK: one return code (granted QoS or 0x80) per filter, in order ([MQTT-3.9])."""
    body = packet_id.to_bytes(2, "big") + bytes(codes)
    return b"\x90" + remaining_length(len(body)) + body


def publish_qos0(topic: bytes, payload: bytes, *, retain: bool = False) -> bytes:
    """A QoS 0 PUBLISH: no packet id, so identical for every subscriber."""
    topic_length = len(topic)
    return b"".join(
        (
            b"\x31" if retain else b"\x30",
            remaining_length(2 + topic_length + len(payload)),
            topic_length.to_bytes(2, "big"),
            topic,
            payload,
        )
    )


def publish(topic: bytes, payload: bytes, *, qos: int, packet_id: int, dup: bool = False) -> bytes:
    """One subscriber's PUBLISH at QoS 1 or 2 (its packet id), DUP when it is a resend."""
    first = 0x30 | qos << 1 | (0x08 if dup else 0)
    header = bytes([first]) + remaining_length(2 + len(topic) + 2 + len(payload))
    return b"".join((header, len(topic).to_bytes(2, "big"), topic, packet_id.to_bytes(2, "big"), payload))


def publish_acked_parts(
    topic: bytes, payload: bytes, *, qos: int = 1, retain: bool = False, websocket: bool
) -> tuple[bytes, bytes]:
    """A QoS 1 or 2 PUBLISH (in a WebSocket frame if asked) as (head, tail): the packet id
    goes between. Only the 2-byte packet id differs between subscribers, so the rest is built once.
    """
    if qos not in (1, 2):
        raise ValueError(f"QoS {qos} PUBLISH has no packet id")
    body_length = 2 + len(topic) + 2 + len(payload)
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    head = b"".join((bytes((first,)), remaining_length(body_length), len(topic).to_bytes(2, "big"), topic))
    if websocket:
        head = ws_frame_header(len(head) + 2 + len(payload)) + head
    return head, payload


def ws_frame_header(size: int) -> bytes:
    """The header of one final, unmasked binary frame of ``size`` bytes."""
    if size < 126:
        return bytes((0x82, size))
    if size < 65536:
        return bytes((0x82, 126)) + size.to_bytes(2, "big")
    return bytes((0x82, 127)) + size.to_bytes(8, "big")


def ws_binary_frame(data: bytes) -> bytes:
    """One final, unmasked binary frame carrying ``data``."""
    return ws_frame_header(len(data)) + data
