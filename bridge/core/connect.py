"""Reading and checking a client's CONNECT, before anything else about it is believed.

Pure parsing (:func:`parse_connect`, :func:`connect_preamble`) plus one small reader
(:func:`read_connect`) that pulls chunks until the CONNECT is whole. amqtt read the CONNECT
a byte at a time with no size bound, decoded all of it as 3.1.1 before looking at the
protocol level (an MQTT 5 CONNECT with credentials hung for ``connect_timeout_s``), waited
out the timeout on a non-CONNECT first packet, and accepted a reserved flag, will QoS 3 and
U+0000 in strings. Here:

- the first byte must be CONNECT, or the connection closes at once;
- the whole CONNECT must fit ``budget`` bytes (a few KB plus the largest token): checked from
  its length field, before its body is buffered, and answered with CONNACK 0x05 (over
  WebSocket the frame is refused first, by websockets' message size limit: close 1009);
- a protocol level other than 4 gets CONNACK 0x01 as soon as the level byte has arrived,
  whatever follows ([MQTT-3.1.2-2]);
- every [MQTT-3.1.x] rule on flags and strings is checked; a violation closes the
  connection without CONNACK ([MQTT-4.8.0-1]), except a too long or missing client id on a
  persistent session, which gets CONNACK 0x02 ([MQTT-3.1.3-8/9]).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge.core.framing import packet_extent
from bridge.errors import ProtocolError

__all__ = [
    "CONNACK_ACCEPTED",
    "CONNACK_BAD_CLIENT_ID",
    "CONNACK_BAD_CREDENTIALS",
    "CONNACK_BAD_PROTOCOL",
    "CONNACK_NOT_AUTHORIZED",
    "CONNACK_SERVER_UNAVAILABLE",
    "MAX_CLIENT_ID_BYTES",
    "Connect",
    "ConnectRefused",
    "Will",
    "connect_preamble",
    "parse_connect",
    "read_connect",
]

CONNECT_BYTE = 0x10  # type 1, flags 0 ([MQTT-2.2.2-2])
PROTOCOL_LEVEL = 4  # MQTT 3.1.1
# CONNACK return codes ([MQTT-3.2.2.3]).
CONNACK_ACCEPTED = 0x00
CONNACK_BAD_PROTOCOL = 0x01
CONNACK_BAD_CLIENT_ID = 0x02
CONNACK_SERVER_UNAVAILABLE = 0x03
CONNACK_BAD_CREDENTIALS = 0x04
CONNACK_NOT_AUTHORIZED = 0x05
# Client ids appear in logs, metrics labels and store keys; MQTT 3.1.1 lets a server refuse
# long ones ([MQTT-3.1.3-5] only promises 23 bytes). 256 covers UUIDs with any prefix.
MAX_CLIENT_ID_BYTES = 256

_KNOWN_NAMES = frozenset({b"MQTT", b"MQIsdp"})  # 3.1.1 and later / 3.1


class ConnectRefused(ProtocolError):
    """A CONNECT answered with a refusal code before the connection closes."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        self.code = code
        super().__init__(reason, detail)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str  # may be "" (clean sessions only): the broker makes one up
    clean_session: bool
    keep_alive: int
    will: Will | None
    username: str | None
    password: bytes | None


def connect_preamble(buffer: bytes, budget: int) -> tuple[int, int] | None:
    """The CONNECT's body extent once its header and protocol level can be judged.

    None while more bytes are needed. Raises :class:`ProtocolError` for a first packet that
    is not CONNECT, a length over ``budget`` or an unknown protocol name, and
    :class:`ConnectRefused` (CONNACK 0x01) for a protocol level other than 3.1.1's.
    """
    if not buffer:
        return None
    if buffer[0] != CONNECT_BYTE:
        kind = buffer[0] >> 4
        what = "CONNECT with flags set" if kind == 1 else f"packet type {kind} before CONNECT"
        raise ProtocolError("not_connect", what)  # [MQTT-3.1.0-1], [MQTT-2.2.2-2]
    try:
        extent = packet_extent(buffer, 0, budget)
    except ProtocolError as exc:
        if exc.reason != "too_large":
            raise
        # Told from the length field, before the body is read: almost always a huge token.
        raise ConnectRefused(CONNACK_NOT_AUTHORIZED, "too_large", exc.detail) from None
    if extent is None:
        return None
    start, end = extent
    available = buffer[start : min(end, len(buffer))]
    if len(available) < 2:
        return None
    name_end = 2 + ((available[0] << 8) | available[1])
    if name_end > end - start:
        raise ProtocolError("malformed_connect", "protocol name longer than the packet")
    if len(available) < name_end + 1:
        return None
    name = bytes(available[2:name_end])
    if name not in _KNOWN_NAMES:
        raise ProtocolError("bad_protocol", f"protocol name {name[:16]!r}")  # [MQTT-3.1.2-1]
    level = available[name_end]
    if name != b"MQTT" or level != PROTOCOL_LEVEL:
        raise ConnectRefused(CONNACK_BAD_PROTOCOL, "bad_protocol_level", f"protocol level {level}")
    return start, end


async def read_connect(
    read_chunk: Callable[[], Awaitable[bytes]], budget: int
) -> tuple[Connect, bytes] | None:
    """Read until one whole CONNECT has arrived: (CONNECT, bytes that came after it).

    None if the peer closed first. Raises what :func:`connect_preamble` and
    :func:`parse_connect` raise.
    """
    buffer = b""
    while True:
        chunk = await read_chunk()
        if not chunk:
            return None
        buffer += chunk
        extent = connect_preamble(buffer, budget)
        if extent is not None and extent[1] <= len(buffer):
            start, end = extent
            return parse_connect(buffer[start:end]), buffer[end:]


class _Cursor:
    __slots__ = ("body", "pos")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.body):
            raise ProtocolError("malformed_connect", f"CONNECT ends inside its {what}")
        data = self.body[self.pos : end]
        self.pos = end
        return data

    def binary(self, what: str) -> bytes:
        size = int.from_bytes(self.take(2, what), "big")
        return self.take(size, what)

    def text(self, what: str) -> str:
        raw = self.binary(what)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_utf8", f"{what} is not UTF-8") from None  # [MQTT-1.5.3-1]
        if "\x00" in value:
            raise ProtocolError("bad_utf8", f"{what} contains U+0000")  # [MQTT-1.5.3-2]
        return value


def parse_connect(body: bytes) -> Connect:
    """A CONNECT body (after the fixed header), every 3.1.1 rule checked."""
    cursor = _Cursor(body)
    cursor.binary("protocol name")
    level = cursor.take(1, "protocol level")[0]
    if level != PROTOCOL_LEVEL:
        raise ConnectRefused(CONNACK_BAD_PROTOCOL, "bad_protocol_level", f"protocol level {level}")
    flags = cursor.take(1, "flags")[0]
    keep_alive = int.from_bytes(cursor.take(2, "keep-alive"), "big")
    if flags & 0x01:
        raise ProtocolError("malformed_connect", "reserved flag set")  # [MQTT-3.1.2-3]
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise ProtocolError("malformed_connect", "will QoS 3")  # [MQTT-3.1.2-14]
    if not will_flag and (will_qos or will_retain):
        raise ProtocolError("malformed_connect", "will QoS or retain without a will")  # [MQTT-3.1.2-13/15]
    has_username, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if has_password and not has_username:
        raise ProtocolError("malformed_connect", "password without user name")  # [MQTT-3.1.2-22]
    client_id = cursor.text("client id")
    will = None
    if will_flag:
        topic = cursor.text("will topic")
        will = Will(topic, cursor.binary("will message"), will_qos, will_retain)
    username = cursor.text("user name") if has_username else None
    password = cursor.binary("password") if has_password else None
    if cursor.pos != len(body):
        raise ProtocolError("malformed_connect", f"{len(body) - cursor.pos} bytes after the payload")
    clean = bool(flags & 0x02)
    if not client_id and not clean:
        raise ConnectRefused(
            CONNACK_BAD_CLIENT_ID, "bad_client_id", "empty client id on a persistent session"
        )
    if len(client_id.encode()) > MAX_CLIENT_ID_BYTES:
        raise ConnectRefused(
            CONNACK_BAD_CLIENT_ID, "bad_client_id", f"client id over {MAX_CLIENT_ID_BYTES} bytes"
        )
    return Connect(client_id, clean, keep_alive, will, username, password)
