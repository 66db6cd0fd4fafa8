"""Splitting a byte stream into MQTT packets, and reading a PUBLISH without amqtt's objects.

Pure: no I/O. amqtt reads one packet per event-loop iteration, a byte at a time for the
fixed header; a feed writing hundreds of ticks per ``send()`` then costs hundreds of
iterations. The broker's reader instead hands every complete packet of a read chunk to
:meth:`PacketSplitter.feed` and handles them in one go.
"""

from __future__ import annotations

from typing import NamedTuple

from bridge.errors import ProtocolError

__all__ = [
    "PUBACK",
    "PUBLISH",
    "PacketSplitter",
    "Publish",
    "check_header",
    "packet_extent",
    "parse_publish",
    "puback",
]

PUBLISH = 3
PUBACK = 4
_MAX_LENGTH_BYTES = 4  # [MQTT-2.2.3]: the remaining length takes at most four bytes


class PacketSplitter:
    """Buffers a stream and returns each complete packet as (first byte, body)."""

    __slots__ = ("_buffer", "max_packet")

    def __init__(self, max_packet: int) -> None:
        self.max_packet = max_packet
        self._buffer = b""

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every complete packet now buffered; a partial one waits for the next chunk.

        Raises :class:`ProtocolError` for a malformed remaining length or a packet larger
        than ``max_packet`` (checked from its header, before its body is buffered).
        """
        buffer = self._buffer + data if self._buffer else data
        packets: list[tuple[int, bytes]] = []
        size = len(buffer)
        pos = 0
        while (extent := packet_extent(buffer, pos, self.max_packet)) is not None:
            start, end = extent
            if end > size:
                break
            packets.append((buffer[pos], buffer[start:end]))
            pos = end
        self._buffer = buffer[pos:] if pos < size else b""
        return packets


def packet_extent(buffer: bytes, pos: int, max_packet: int) -> tuple[int, int] | None:
    """Where the body of the packet starting at ``pos`` begins and ends (the end may lie past
    the buffer: the body is still arriving); None while the length itself is incomplete.

    Raises :class:`ProtocolError` for a length over four bytes or above ``max_packet``.
    """
    size = len(buffer)
    if size - pos < 2:
        return None
    length = 0
    multiplier = 1
    cursor = pos + 1
    for _ in range(_MAX_LENGTH_BYTES):
        if cursor >= size:
            return None  # the length itself is still arriving
        byte = buffer[cursor]
        cursor += 1
        length += (byte & 0x7F) * multiplier
        if byte < 0x80:
            break
        multiplier *= 128
    else:
        raise ProtocolError("malformed_length", "remaining length longer than four bytes")
    if length > max_packet:
        raise ProtocolError("too_large", f"packet of {length} bytes exceeds {max_packet}")
    return cursor, cursor + length


class Publish(NamedTuple):
    topic: str
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    payload: bytes


def parse_publish(first: int, body: bytes) -> Publish:
    """A PUBLISH packet's fields; :class:`ProtocolError` for anything malformed."""
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("malformed_publish", "QoS 3 is not a QoS level")  # [MQTT-3.3.1-4]
    if len(body) < 2:
        raise ProtocolError("malformed_publish", "PUBLISH shorter than its topic length")
    topic_end = 2 + ((body[0] << 8) | body[1])
    header_end = topic_end + (2 if qos else 0)
    if header_end > len(body):
        raise ProtocolError("malformed_publish", "PUBLISH shorter than its variable header")
    try:
        topic = body[2:topic_end].decode()
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8", "PUBLISH topic is not UTF-8") from None  # [MQTT-1.5.3-1]
    packet_id = None
    if qos:
        packet_id = (body[topic_end] << 8) | body[topic_end + 1]
        if packet_id == 0:
            raise ProtocolError("malformed_publish", "packet id 0")  # [MQTT-2.3.1-1]
    return Publish(topic, qos, bool(first & 0x01), bool(first & 0x08), packet_id, body[header_end:])


# [MQTT-2.2.2-1/2]: PUBREL, SUBSCRIBE and UNSUBSCRIBE carry flags 0b0010, every other
# packet but PUBLISH 0; packets of a fixed size must have it.
_FLAGS = {6: 0x2, 8: 0x2, 10: 0x2}
_SIZES = {4: 2, 5: 2, 6: 2, 7: 2, 12: 0, 14: 0}


def check_header(first: int, length: int) -> None:
    """:class:`ProtocolError` for a non-PUBLISH packet with wrong flags or size."""
    kind = first >> 4
    if (first & 0x0F) != _FLAGS.get(kind, 0):
        raise ProtocolError("malformed_packet", f"packet type {kind} with flags {first & 0x0F:#x}")
    size = _SIZES.get(kind)
    if size is not None and length != size:
        raise ProtocolError("malformed_packet", f"packet type {kind} of {length} bytes, not {size}")


def puback(packet_ids: list[int]) -> bytes:
    """PUBACK packets for ``packet_ids``, concatenated for one write."""
    return b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in packet_ids)
