"""A client's WebSocket frames once the connection is open (RFC 6455 section 5), pure.

websockets' sans-I/O parser stays for the opening handshake (and for connections with
permessage-deflate); for the rest of an uncompressed connection's life it would cost three
suspended generators, a stream buffer, its protocol object and the last frame it read
(~1.5 KB while idle). :class:`FrameReader` is one small object holding at most one partial
frame: no I/O, no clock, never more than ``max_size`` plus a header buffered per message.

Rules checked ([RFC 6455]): every client frame is masked (5.1); RSV bits are zero, as no
extension is in use (5.2); opcodes 0, 1, 2, 8, 9, 10 only; control frames are final and at
most 125 bytes (5.5); a continuation frame only inside a fragmented message and a new data
frame never inside one (5.4); a 64-bit length has its top bit clear (5.2); a message over
``max_size`` is refused from its header with 1009, as websockets does; a close frame is empty
or a valid code (7.4.1) and a UTF-8 reason (5.5.1). A violation raises :class:`FrameError`
with the close code to send.
"""

from __future__ import annotations

from bridge.errors import ProtocolError

__all__ = ["BINARY", "CLOSE", "CONT", "PING", "PONG", "TEXT", "FrameError", "FrameReader", "close_echo"]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10

PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009

# Close codes a peer may send (RFC 6455 7.4.1 and IANA's registry, as websockets accepts).
_PEER_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class FrameError(ProtocolError):
    """The client broke WebSocket framing: the connection is closed with ``code``."""

    def __init__(self, code: int, detail: str) -> None:
        self.code = code
        super().__init__("too_large" if code == MESSAGE_TOO_BIG else "websocket_framing", detail)


class FrameReader:
    """Whole frames out of the bytes a client sends (see module docstring)."""

    __slots__ = ("_buffer", "_message", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size  # the largest message, fragments added up
        self._buffer = b""  # a frame not yet whole
        self._message = -1  # bytes so far of a fragmented data message; -1: none under way

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every frame ``data`` completes, as (opcode, unmasked payload), in order.

        Raises :class:`FrameError` at the first violation (frames before it are lost with
        the connection).
        """
        buffer = self._buffer + data if self._buffer else data
        frames: list[tuple[int, bytes]] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            opcode = first & 0x0F
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise FrameError(PROTOCOL_ERROR, "unmasked frame from a client")
            size, head = second & 0x7F, 2
            if size == 126:
                if end - pos < 4:
                    break
                size, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if end - pos < 10:
                    break
                size, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
                if size >> 63:
                    raise FrameError(PROTOCOL_ERROR, "payload length with its top bit set")
            message = self._message
            if opcode >= CLOSE:
                if opcode > PONG:
                    raise FrameError(PROTOCOL_ERROR, f"reserved opcode {opcode}")
                if not first & 0x80:
                    raise FrameError(PROTOCOL_ERROR, "fragmented control frame")
                if size > 125:
                    raise FrameError(PROTOCOL_ERROR, "control frame over 125 bytes")
            else:
                if opcode > BINARY:
                    raise FrameError(PROTOCOL_ERROR, f"reserved opcode {opcode}")
                if opcode == CONT and message < 0:
                    raise FrameError(PROTOCOL_ERROR, "continuation frame outside a message")
                if opcode != CONT and message >= 0:
                    raise FrameError(PROTOCOL_ERROR, "new message inside a fragmented one")
                so_far = max(message, 0)
                if so_far + size > self.max_size:
                    raise FrameError(MESSAGE_TOO_BIG, f"message over {self.max_size} bytes")
                message = -1 if first & 0x80 else so_far + size
            start = pos + head + 4
            if end - start < size:
                break  # the rest of this frame has not arrived
            self._message = message
            frames.append((opcode, _unmask(buffer[start : start + size], buffer[start - 4 : start])))
            pos = start + size
        self._buffer = buffer[pos:] if pos else buffer
        return frames


def close_echo(payload: bytes) -> bytes:
    """The payload of the close frame that answers a client's ([RFC 6455] 5.5.1: the same
    code and reason); raises :class:`FrameError` for an invalid one."""
    if not payload:
        return b""
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _PEER_CODES and not 3000 <= code <= 4999:
        raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not UTF-8") from None
    return payload


def _unmask(data: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, repeated (RFC 6455 5.3), done on one big integer."""
    size = len(data)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
