"""Sans-I/O MQTT 3.1.1 client codec, over WebSocket (RFC 6455) or raw TCP, for the load generator.

Only what a bench client needs: the WebSocket opening handshake, masked client frames,
CONNECT / SUBSCRIBE / PUBLISH / PUBACK / PINGREQ / DISCONNECT encoding, and a streaming
:class:`Receiver` that turns the server's bytes into counts. No I/O here: ``loadgen`` pumps
bytes in and writes ``Receiver.acks`` out.

The receiver is the generator's hot path (it must keep up with a broker sending 500k+
PUBLISH packets a second across a few processes), so it walks indexes over one buffer
instead of building objects per packet, and parses a payload only for every
``sample_every``-th PUBLISH (the latency sample).
"""

from __future__ import annotations

import base64
import hashlib
import os
from array import array
from typing import Final

__all__ = [
    "DISCONNECT",
    "PINGREQ",
    "HandshakeError",
    "ProtocolError",
    "Receiver",
    "check_handshake",
    "connect",
    "handshake_request",
    "masked_frame",
    "puback",
    "publish",
    "subscribe",
]

PINGREQ: Final = b"\xc0\x00"
DISCONNECT: Final = b"\xe0\x00"
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The publisher writes its send time (ns) here; see loadgen.TickMaker.
LATENCY_FIELD: Final = b'"volume_24h":"'

_OP_CONT, _OP_BINARY, _OP_CLOSE, _OP_PING = 0x0, 0x2, 0x8, 0x9


class ProtocolError(Exception):
    """The server sent bytes this client cannot accept (its fault, not ours)."""


class HandshakeError(ProtocolError):
    """The server did not switch to WebSocket with the ``mqtt`` subprotocol."""

    def __init__(self, status_line: str, reason: str) -> None:
        super().__init__(f"{reason}: {status_line!r}")
        self.status_line = status_line
        self.reason = reason


# --- WebSocket ---------------------------------------------------------------------------


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the ``Sec-WebSocket-Accept`` value the server must answer."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    ).encode()
    return request, accept


def check_handshake(head: bytes, accept: bytes) -> None:
    """Validate the server's response head (up to, not including, the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0]
    if status.split(" ", 2)[1:2] != ["101"]:
        raise HandshakeError(status, "not switching protocols")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept", "").encode() != accept:
        raise HandshakeError(status, "wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-protocol", "").lower() != "mqtt":
        raise HandshakeError(status, "subprotocol 'mqtt' not selected")


def masked_frame(payload: bytes, opcode: int = _OP_BINARY) -> bytes:
    """One final client frame; RFC 6455 5.3 requires every client frame to be masked."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0xFE)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    # XOR as one big integer: C speed, no per-byte Python loop.
    stream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(size, "little")
    return header + key + masked


# --- MQTT encoding -------------------------------------------------------------------------


def _varint(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def connect(client_id: str, username: str | None, password: str | None, *, keepalive: int = 60) -> bytes:
    """A clean-session CONNECT; username and password are optional (anonymous brokers)."""
    flags = 0x02
    payload = _string(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode())
        if password is not None:
            flags |= 0x40
            payload += _string(password.encode())
    return _packet(0x10, _string(b"MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big") + payload)


def subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    return _packet(0x82, packet_id.to_bytes(2, "big") + _string(topic_filter.encode()) + bytes((qos,)))


def publish(topic: bytes, payload: bytes, *, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    first = 0x30 | (qos << 1) | int(retain)
    variable = _string(topic) + (packet_id.to_bytes(2, "big") if qos else b"")
    return bytes((first,)) + _varint(len(variable) + len(payload)) + variable + payload


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


# --- Receiving -----------------------------------------------------------------------------


class Receiver:
    """Counts the MQTT packets a server sends; optionally unwraps WebSocket frames first.

    Handles a WebSocket frame holding several MQTT packets, a packet spanning frames, and
    either spanning reads. After :meth:`feed`:

    - ``publishes``: PUBLISH packets so far; ``samples``: latency samples (ns) from every
      ``sample_every``-th one that carries :data:`LATENCY_FIELD`;
    - ``acks``: PUBACKs owed for QoS 1 PUBLISHes (raw MQTT bytes; the caller frames and
      sends them, then clears); ``pubacks``: PUBACKs received (publisher side);
    - ``connack``: the CONNACK return code, ``subacks``: granted QoS bytes of each SUBACK;
    - ``control``: ready-to-send frames owed to the server (pong for a ping);
    - ``closed``: the server sent a WebSocket close frame.
    """

    def __init__(self, *, websocket: bool, sample_every: int = 16) -> None:
        if sample_every < 1 or sample_every & (sample_every - 1):
            raise ValueError("sample_every must be a power of two")
        self.websocket = websocket
        self.publishes = 0
        self.pubacks = 0
        self.pingresps = 0
        self.connack: int | None = None
        self.subacks: list[bytes] = []
        self.samples = array("q")
        self.acks = bytearray()
        self.control: list[bytes] = []
        self.closed = False
        self._mask = sample_every - 1
        self._frames = b""  # an incomplete WebSocket frame
        self._mqtt = b""  # an incomplete MQTT packet

    def feed(self, data: bytes, now_ns: int) -> None:
        if not self.websocket:
            self._packets(self._mqtt + data if self._mqtt else data, 0, now_ns)
            return
        buf = self._frames + data if self._frames else data
        end_of_data = len(buf)
        i = 0
        while end_of_data - i >= 2:
            size = buf[i + 1]
            if size & 0x80:
                raise ProtocolError("server frame is masked (RFC 6455 5.1)")
            if size < 126:
                start = i + 2
            elif size == 126:
                if end_of_data - i < 4:
                    break
                size = buf[i + 2] << 8 | buf[i + 3]
                start = i + 4
            else:
                if end_of_data - i < 10:
                    break
                size = int.from_bytes(buf[i + 2 : i + 10], "big")
                start = i + 10
            end = start + size
            if end > end_of_data:
                break
            opcode = buf[i] & 0x0F
            if opcode in (_OP_BINARY, _OP_CONT):
                # Fast path, the usual frame: exactly one QoS 0 PUBLISH with a 2-byte length.
                if (
                    size > 3
                    and not self._mqtt
                    and buf[start] & 0xF6 == 0x30
                    and buf[start + 1] & 0x80
                    and buf[start + 2] < 0x80
                    and ((buf[start + 1] & 0x7F) | buf[start + 2] << 7) + 3 == size
                ):
                    self.publishes += 1
                    if not self.publishes & self._mask:
                        self._sample(buf, start + 3, end, now_ns)
                elif self._mqtt:
                    self._packets(self._mqtt + buf[start:end], 0, now_ns)
                elif end > start:
                    # Parse in place: the usual frame holds whole packets, nothing is copied.
                    self._packets(buf, start, now_ns, end)
            elif opcode == _OP_CLOSE:
                self.closed = True
            elif opcode == _OP_PING:
                self.control.append(masked_frame(buf[start:end], 0xA))
            i = end
        self._frames = buf[i:]

    def _packets(self, buf: bytes, i: int, now_ns: int, end_of_data: int = -1) -> None:
        """Count the packets in ``buf[i:end_of_data]``; keep an incomplete tail for the next call."""
        if end_of_data < 0:
            end_of_data = len(buf)
        publishes = self.publishes
        mask = self._mask
        while end_of_data - i >= 2:
            first = buf[i]
            # Remaining length: 1 byte for packets < 128 bytes, 2 for a ~200-byte tick.
            size = buf[i + 1]
            if size < 0x80:
                start = i + 2
            elif end_of_data - i >= 3 and buf[i + 2] < 0x80:
                size = (size & 0x7F) | buf[i + 2] << 7
                start = i + 3
            else:
                size, start = self._long_length(buf, i + 1, end_of_data)
                if start < 0:
                    break
            end = start + size
            if end > end_of_data:
                break
            kind = first >> 4
            if kind == 3:
                publishes += 1
                if first & 0x06:
                    at = start + 2 + (buf[start] << 8 | buf[start + 1])
                    self.acks += b"\x40\x02" + buf[at : at + 2]
                if not publishes & mask:
                    self._sample(buf, start, end, now_ns)
            elif kind == 4:
                self.pubacks += 1
            elif kind == 2:
                self.connack = buf[start + 1]
            elif kind == 9:
                self.subacks.append(buf[start + 2 : end])
            elif kind == 13:
                self.pingresps += 1
            i = end
        self.publishes = publishes
        self._mqtt = buf[i:end_of_data]

    @staticmethod
    def _long_length(buf: bytes, at: int, end_of_data: int) -> tuple[int, int]:
        """(remaining length, index after it), or (0, -1) if the length is not all here yet."""
        size = 0
        shift = 0
        for index in range(at, min(at + 4, end_of_data)):
            byte = buf[index]
            size |= (byte & 0x7F) << shift
            if byte < 0x80:
                return size, index + 1
            shift += 7
        if end_of_data - at >= 4:
            raise ProtocolError("remaining length longer than 4 bytes")
        return 0, -1

    def _sample(self, buf: bytes, start: int, end: int, now_ns: int) -> None:
        at = buf.find(LATENCY_FIELD, start, end)
        if at < 0:
            return
        at += len(LATENCY_FIELD)
        close = buf.find(b'"', at, end)
        if close > at:
            self.samples.append(now_ns - int(buf[at:close]))
