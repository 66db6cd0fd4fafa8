"""Hostile inputs for the broker fuzz test (tests/test_broker_fuzz.py), as hypothesis strategies.

A :class:`Hostile` is what one short-lived connection sends, and how it leaves (FIN or RST,
after reading the broker's answer for a moment or not at all). Input classes are registered
by name:

- ``@mqtt_class``: MQTT bytes (:class:`MqttInput`), sent over TCP (whole or one write per
  packet) and over WebSocket (after a valid handshake, in binary frames: one per packet, all
  in one, or cut anywhere over several frames);
- ``@ws_class``: raw bytes for the WebSocket listener (:class:`WsInput`), handshake included.

To add a class, write a ``build(draw) -> MqttInput | WsInput`` function with one of the
decorators; its name is the class name. Make the strategies it draws from at module level
(one made inside ``build`` is validated again for every input, which makes generation
several times slower), and let what it draws depend on hypothesis's choices only (see
:func:`fresh_client_id`). Big inputs come from a drawn seed (:func:`noise`): hypothesis
keeps every drawn byte.

Everything a feed or subscriber could mistake for data carries a marker: hostile ticks have
``last`` 666, hostile client ids put :data:`INJECTED` after a CR/LF.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from hypothesis import strategies as st

from bridge.auth import SigningKey, mint_token
from tests.conftest import mqtt_str, packet, token_for, varint

__all__ = [
    "HANDSHAKE",
    "INJECTED",
    "MQTT_CLASSES",
    "WATCHED",
    "WS_CLASSES",
    "Hostile",
    "Transport",
    "inputs_for",
]

Transport = Literal["tcp", "ws"]
T = TypeVar("T")

WATCHED = "market/luno/BTC-ZAR"  # the topic the fuzz test's feed publishes and subscriber checks
WATCH_USER = "fuzz-watch"  # the test's subscriber: user and client id
FEED_USER = "fuzz-feed"  # the test's feed: user and client id
INJECTED = "FUZZ-INJECTED"  # follows CR/LF in hostile client ids: must never start a log line
HOSTILE_USERS = [f"fuzz-{n}" for n in range(24)]  # subscriber role; 24 so the per-user limit rarely bites
HOSTILE_FEEDS = [f"fuzz-feed-{n}" for n in range(4)]  # feed role, for invalid ticks only
MAX_MESSAGE_BYTES = 1024 * 1024  # listeners.ws.max_message_bytes (default)
MAX_PACKET_BYTES = 1024 * 1024  # broker.max_packet_bytes (default)


def hostile_tick(topic: str = WATCHED) -> bytes:
    """A valid-looking tick for ``topic`` with the hostile marker (``last`` 666)."""
    parts = topic.split("/")
    exchange, pair = (parts[1], parts[2]) if len(parts) == 3 else ("luno", "BTC-ZAR")
    fields = {"exchange": exchange, "pair": pair, "bid": "666", "ask": "666", "last": "666"}
    fields |= {"volume_24h": "6.66", "ts": "2026-11-30T11:00:00.000Z"}
    return json.dumps(fields, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- tokens


def _unsigned_jwt(header: dict[str, object], claims: dict[str, object], signature: bytes = b"") -> bytes:
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    return b".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])


_NOW = time.time()
_WRONG_KEY = SigningKey(kid="test", key=b"not-the-test-secret-0123456789abcdef", algorithm="HS256")
VALID_TOKENS = {user: token_for(user, "subscriber").encode() for user in HOSTILE_USERS}
FEED_TOKENS = {user: token_for(user, "feed").encode() for user in HOSTILE_FEEDS}
WRONG_KEY_TOKEN = mint_token(_WRONG_KEY, sub="fuzz-0", role="subscriber", now=_NOW, ttl_s=3600).encode()
BAD_TOKENS: list[bytes] = [
    b"",
    b"not-a-jwt",
    b"a.b.c",
    b"\x00\xff\xfe",
    token_for("fuzz-0", "subscriber", now=_NOW - 7200, ttl_s=60).encode(),  # expired
    token_for("fuzz-0", "subscriber", now=_NOW + 7200).encode(),  # issued in the future
    WRONG_KEY_TOKEN,
    _unsigned_jwt({"alg": "none", "typ": "JWT", "kid": "test"}, {"sub": "fuzz-0", "exp": _NOW + 3600}),
    _unsigned_jwt({"alg": "HS256", "kid": "nope"}, {"sub": "fuzz-0", "exp": _NOW + 3600}, b"x" * 32),
    _unsigned_jwt({"alg": "HS256", "kid": "test"}, {"sub": "fuzz-0"}, b"x" * 32),  # no exp, bad signature
    token_for("fuzz-0", "subscriber", rate=-1).encode(),
    token_for("fuzz-0", "subscriber", tz="Mars/Olympus").encode(),
    token_for("fuzz-0", "admin")[:-4].encode() + b"AAAA",  # admin role, signature altered
    b"e" * 9000,  # over auth.max_token_bytes
    VALID_TOKENS["fuzz-1"],  # valid, for another user than the username
]

# ---------------------------------------------------------------------------- MQTT encoding


def connect(
    client_id: bytes,
    *,
    username: bytes | None = None,
    password: bytes | None = None,
    will: tuple[bytes, bytes] | None = None,
    will_qos: int = 0,
    will_retain: bool = False,
    clean: bool = True,
    keepalive: int = 60,
    name: bytes = b"MQTT",
    level: int = 4,
    flags: int | None = None,
    properties: bytes | None = None,
) -> bytes:
    """A CONNECT as asked, however wrong; ``flags`` replaces the computed flag byte and
    ``properties`` (the encoded property block) makes it MQTT 5 shaped, will properties too."""
    computed = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if will is not None:
        computed |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        will_properties = b"\x00" if properties is not None else b""
        payload += will_properties + mqtt_str(will[0]) + mqtt_str(will[1])
    if username is not None:
        computed |= 0x80
        payload += mqtt_str(username)
    if password is not None:
        computed |= 0x40
        payload += mqtt_str(password)
    variable = mqtt_str(name) + bytes([level & 0xFF, (computed if flags is None else flags) & 0xFF])
    variable += keepalive.to_bytes(2, "big") + (properties or b"")
    return packet(0x10, variable + payload)


_client_ids = itertools.count()


def fresh_client_id(user: str) -> bytes:
    """Unique, and always as long for a user: hypothesis needs what it draws to depend only on
    its own choices (a ``len()`` of a CONNECT can bound a later draw)."""
    return f"{user}-{next(_client_ids) % 10**8:08d}".encode()


def valid_connect(
    user: str,
    *,
    will: tuple[bytes, bytes] | None = None,
    will_qos: int = 0,
    will_retain: bool = False,
    keepalive: int = 60,
) -> bytes:
    """A well-formed CONNECT with the user's valid subscriber token and a fresh client id."""
    return connect(
        fresh_client_id(user),
        username=user.encode(),
        password=VALID_TOKENS[user],
        will=will,
        will_qos=will_qos,
        will_retain=will_retain,
        keepalive=keepalive,
    )


def subscribe(packet_id: int, filters: list[tuple[bytes, int]]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(mqtt_str(f) + bytes([q]) for f, q in filters)
    return packet(0x82, body)


def publish(topic: bytes, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 1) -> bytes:
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    return packet(first, mqtt_str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload)


def noise(seed: int, size: int) -> bytes:
    """Seeded bytes: a big input costs hypothesis two integers, not ``size`` choices."""
    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------------------- WebSocket encoding

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_request(
    path: bytes = b"/mqtt",
    *,
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    key: bytes | None = WS_KEY,
    ws_version: bytes | None = b"13",
    protocol: bytes | None = b"mqtt",
    upgrade: bytes | None = b"websocket",
    connection: bytes | None = b"Upgrade",
    extra: bytes = b"",
    eol: bytes = b"\r\n",
) -> bytes:
    """A client handshake; each header can be left out (None) or replaced."""
    lines = [method + b" " + path + b" " + version, b"Host: 127.0.0.1"]
    for name, value in (
        (b"Upgrade", upgrade),
        (b"Connection", connection),
        (b"Sec-WebSocket-Key", key),
        (b"Sec-WebSocket-Version", ws_version),
        (b"Sec-WebSocket-Protocol", protocol),
    ):
        if value is not None:
            lines.append(name + b": " + value)
    return eol.join(lines) + eol + extra + eol


HANDSHAKE = ws_request()


def _mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    repeated = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


def ws_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    form: Literal["min", "16", "64"] = "min",
    key: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """A client frame; ``length`` overrides the declared length, ``form`` its encoding."""
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)])
    bit = 0x80 if masked else 0
    if form == "64" or (form == "min" and declared >= 65536):
        head += bytes([bit | 127]) + (declared & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    elif form == "16" or (form == "min" and declared >= 126):
        head += bytes([bit | 126]) + (declared & 0xFFFF).to_bytes(2, "big")
    else:
        head += bytes([bit | declared])
    return head + key + _mask(payload, key) if masked else head + payload


# ---------------------------------------------------------------------------- inputs and registry


class Hostile:
    """One generated hostile input: what to send on a fresh connection, and how to leave.

    A plain class, not a dataclass: hypothesis pretty-prints dataclasses field by field,
    megabytes for a failing batch; this repr is one line.
    """

    __slots__ = ("chunks", "kind", "reset", "transport", "units", "wait_s")

    def __init__(
        self,
        kind: str,
        transport: Transport,
        chunks: tuple[bytes, ...],
        units: int,
        wait_s: float,
        reset: bool,
    ) -> None:
        self.kind = kind  # the input class
        self.transport = transport
        self.chunks = chunks  # written one after the other
        self.units = units  # packets, frames and handshakes it carries
        self.wait_s = wait_s  # then read until the broker closes, at most this long (0: never read)
        self.reset = reset  # leave with RST instead of FIN

    def __repr__(self) -> str:
        size = sum(len(c) for c in self.chunks)
        return f"<{self.kind}/{self.transport} {self.units}u {size}B w{self.wait_s}{' rst' if self.reset else ''}>"


@dataclass(frozen=True)
class MqttInput:
    """MQTT packets (any of them malformed) and how the connection ends."""

    packets: tuple[bytes, ...]
    wait_s: float
    reset: bool


@dataclass(frozen=True)
class WsInput:
    """Raw bytes for the WebSocket listener, handshake included."""

    chunks: tuple[bytes, ...]
    units: int
    wait_s: float
    reset: bool


MQTT_CLASSES: dict[str, st.SearchStrategy[MqttInput]] = {}
WS_CLASSES: dict[str, st.SearchStrategy[WsInput]] = {}


def mqtt_class(build: Callable[[st.DrawFn], MqttInput]) -> Callable[[st.DrawFn], MqttInput]:
    """Register an MQTT-level class, sent over TCP and over WebSocket."""
    MQTT_CLASSES[build.__name__] = st.composite(build)()
    return build


def ws_class(build: Callable[[st.DrawFn], WsInput]) -> Callable[[st.DrawFn], WsInput]:
    """Register a WebSocket-level class."""
    WS_CLASSES[build.__name__] = st.composite(build)()
    return build


# How a connection ends: read the answer for 0, 20 or 200 ms; then FIN or RST.
ENDINGS = st.tuples(st.sampled_from([0.0, 0.0, 0.02, 0.2]), st.booleans())
SEEDS = st.integers(0, 2**32 - 1)
USERS = st.sampled_from(HOSTILE_USERS)
BOOLS = st.booleans()
QOS = st.sampled_from([0, 1, 2])


@functools.cache
def hostile_bytes(max_big: int = 8192) -> st.SearchStrategy[bytes]:
    """A few drawn bytes, or up to ``max_big`` seeded ones."""
    return st.one_of(st.binary(min_size=1, max_size=48), st.builds(noise, SEEDS, st.integers(1, max_big)))


def _pick(options: list[T]) -> st.SearchStrategy[T]:
    return st.sampled_from(options)


# ---------------------------------------------------------------------------- MQTT classes

_LEADS = _pick([b"", b"\x10", b"\x30", b"\x82", b"\xc0", b"\xe0", b"\x00", b"\xf0"])


@mqtt_class
def random_bytes(draw: st.DrawFn) -> MqttInput:
    return MqttInput((draw(_LEADS) + draw(hostile_bytes()),), *draw(ENDINGS))


_LENGTH_SHAPES = _pick(["five_bytes", "truncated", "max", "past_max_packet", "zero"])
_FIRST_BYTES = _pick([0x10, 0x30, 0x82, 0xC0, 0x00])


@mqtt_class
def bad_remaining_length(draw: st.DrawFn) -> MqttInput:
    first = bytes([draw(_FIRST_BYTES)])
    shape = draw(_LENGTH_SHAPES)
    if shape == "five_bytes":  # [MQTT-2.2.3]: at most four length bytes
        data = first + b"\xff\xff\xff\xff\x7f"
    elif shape == "truncated":
        data = first + b"\x80" * draw(st.integers(1, 3))
    elif shape == "max":  # 256 MB announced, a little sent
        data = first + b"\xff\xff\xff\x7f" + draw(hostile_bytes(65536))
    elif shape == "past_max_packet":
        data = first + varint(MAX_PACKET_BYTES + 1) + draw(hostile_bytes(65536))
    else:
        data = first + b"\x00"
    return MqttInput((data,), *draw(ENDINGS))


@mqtt_class
def truncated_connect(draw: st.DrawFn) -> MqttInput:
    full = valid_connect(draw(USERS), will=(b"user/x/will", b"bye") if draw(BOOLS) else None)
    return MqttInput((full[: draw(st.integers(1, len(full) - 1))],), *draw(ENDINGS))


_PROTOCOL_NAMES = _pick([b"", b"MQIsdp", b"MQTT\x00", b"mqtt", b"MQTX", b"\xff\xfe", b"MQTT" * 50])
_PROTOCOL_LEVELS = _pick([0, 1, 3, 4, 5, 6, 127, 128, 255])


@mqtt_class
def bad_protocol(draw: st.DrawFn) -> MqttInput:
    user = draw(USERS)
    data = connect(
        f"{user}-proto".encode(),
        username=user.encode(),
        password=VALID_TOKENS[user],
        name=draw(_PROTOCOL_NAMES),
        level=draw(_PROTOCOL_LEVELS),
    )
    return MqttInput((data,), *draw(ENDINGS))


_V5_PROPERTIES = _pick(
    [
        b"\x00",
        b"\x05\x11\x00\x00\x0e\x10",  # session expiry 3600
        b"\x03\x21\x00\x0a",  # receive maximum 10
        b"\x04\x27\x00\x00\x10",  # truncated maximum packet size
        b"\xff\xff\xff\xff\x0f",  # malformed property length
        b"\x07\x15\x00\x04JWT1",  # authentication method
    ]
)


@mqtt_class
def mqtt5_connect(draw: st.DrawFn) -> MqttInput:
    user = draw(USERS)
    data = connect(
        f"{user}-v5".encode(),
        username=user.encode(),
        password=VALID_TOKENS[user] if draw(BOOLS) else BAD_TOKENS[4],
        will=(WATCHED.encode(), hostile_tick()) if draw(BOOLS) else None,
        level=5,
        properties=draw(_V5_PROPERTIES),
    )
    return MqttInput((data,), *draw(ENDINGS))


_FLAG_CASES = _pick(["reserved", "will_qos3", "will_qos_no_will", "will_retain_no_will", "any"])


@mqtt_class
def bad_connect_flags(draw: st.DrawFn) -> MqttInput:
    user = draw(USERS)
    cid, name, token = f"{user}-flags".encode(), user.encode(), VALID_TOKENS[user]
    case = draw(_FLAG_CASES)
    if case == "reserved":  # [MQTT-3.1.2-3]
        data = connect(cid, username=name, password=token, flags=0xC3)
    elif case == "will_qos3":
        data = connect(cid, username=name, password=token, will=(b"user/" + name + b"/w", b"x"), will_qos=3)
    elif case == "will_qos_no_will":
        data = connect(cid, username=name, password=token, flags=0xC2 | 0x08)
    elif case == "will_retain_no_will":
        data = connect(cid, username=name, password=token, flags=0xC2 | 0x20)
    else:
        data = connect(cid, username=name, password=token, flags=draw(st.integers(0, 255)))
    return MqttInput((data,), *draw(ENDINGS))


_HOSTILE_TEXT = _pick(
    [
        b"\x00",
        b"\n" + INJECTED.encode(),
        b"\r" + INJECTED.encode(),
        b"\r\n" + INJECTED.encode(),
        b"\x1b[31mred\x1b[0m",
        b"\x1b]0;title\x07",
        b"\x1b[2J",
        b"\xc3\x28",  # invalid UTF-8
        b"\xc0\xaf",  # overlong encoding
        b"\xed\xa0\x80",  # UTF-16 surrogate
        b"\xc0\x80",  # overlong NUL
        b"\xef\xbb\xbf",  # BOM
        "\u202e".encode(),  # right-to-left override
        b"%s%n%x",
        b"'\"",
        b"/",
        b"#",
        b"+",
        b"",
    ]
)
_LONG_IDS = _pick([0, 0, 0, 0, 0, 0, 24, 1024, 65000])


@mqtt_class
def odd_client_id(draw: st.DrawFn) -> MqttInput:
    """Control characters, bad UTF-8 and huge lengths in the client id (and username)."""
    user = draw(USERS)
    client_id = b"fuzz" + b"".join(draw(st.lists(_HOSTILE_TEXT, min_size=1, max_size=3)))
    client_id += b"x" * draw(_LONG_IDS)
    username = user.encode() + (draw(_HOSTILE_TEXT) if draw(BOOLS) else b"")
    data = connect(client_id, username=username, password=VALID_TOKENS[user], clean=draw(BOOLS))
    return MqttInput((data,), *draw(ENDINGS))


_USERNAMES = st.one_of(USERS.map(str.encode), st.binary(max_size=16), st.none())
_PASSWORDS = st.one_of(_pick(BAD_TOKENS), hostile_bytes(2048), st.none())


@mqtt_class
def bad_token(draw: st.DrawFn) -> MqttInput:
    data = connect(b"fuzz-badtoken", username=draw(_USERNAMES), password=draw(_PASSWORDS))
    return MqttInput((data,), *draw(ENDINGS))


GARBAGE_PACKETS = [
    b"\x00\x00",  # reserved type 0
    b"\xf0\x00",  # reserved type 15
    b"\x62\x02\x00\x01",  # PUBREL
    b"\x60\x02\x00\x01",  # PUBREL with flags 0
    b"\x50\x02\x00\x07",  # PUBREC for nothing
    b"\x40\x02\x00\x09",  # PUBACK for nothing
    b"\x40\x00",  # PUBACK too short
    b"\xc0\x01\x00",  # PINGREQ with a body
    b"\xc1\x00",  # PINGREQ with flags
    b"\xe0\x01\x00",  # DISCONNECT with a body
    b"\x20\x02\x00\x00",  # CONNACK from a client
    b"\x90\x03\x00\x01\x00",  # SUBACK from a client
    b"\x82\x02\x00\x01",  # SUBSCRIBE without filters
    b"\xa2\x02\x00\x01",  # UNSUBSCRIBE without filters
    b"\x80\x08\x00\x01\x00\x03a/b\x00",  # SUBSCRIBE with flags 0
    b"\x36\x05\x00\x01a\x00\x01",  # PUBLISH QoS 3
    b"\x32\x05\x00\x01a\x00\x00",  # PUBLISH QoS 1, packet id 0
    b"\x30\x04\x00\x02\xff\xfe",  # PUBLISH, topic not UTF-8
    b"\x30\x05\x00\x09abc",  # PUBLISH shorter than its topic length
    b"\x30\x00",  # PUBLISH without a topic
    b"\x30\x03\x00\x01\x00",  # PUBLISH to a NUL topic
    b"\x30\xff\xff\xff\x7f",  # PUBLISH of 256 MB, then nothing
]


@mqtt_class
def connect_then_garbage(draw: st.DrawFn) -> MqttInput:
    user = draw(USERS)
    second_connect = st.just(valid_connect(user))
    garbage = draw(
        st.lists(
            st.one_of(_pick(GARBAGE_PACKETS), hostile_bytes(4096), second_connect), min_size=1, max_size=4
        )
    )
    return MqttInput((valid_connect(user), *garbage), *draw(ENDINGS))


_FILTERS = _pick(
    [
        b"#",
        b"+/+",
        b"+/#",
        b"market/#",
        b"market/luno/+",
        WATCHED.encode(),
        b"$SYS/#",
        b"$share/g/market/#",
        b"user/+/#",
        b"user/fuzz-watch/#",
        b"a/#/b",
        b"a+/b",
        b"#/a",
        b"market/\x00",
        b"",
        b"\xff\xfe",
        b"a/" * 300,
        b"x" * 4096,
        b"/" * 1000,
    ]
)
_SUBSCRIPTIONS = st.lists(st.tuples(_FILTERS, _pick([0, 1, 2, 3])), min_size=1, max_size=4)
_PACKET_IDS = _pick([0, 1, 65535])
_MANY_FILTERS = subscribe(2, [(f"market/luno/P{n}-ZAR".encode(), 0) for n in range(150)])


@mqtt_class
def hostile_subscribe(draw: st.DrawFn) -> MqttInput:
    """Wildcards, NUL, bad UTF-8, long and forbidden filters, packet id 0, QoS 3, too many."""
    packets = [valid_connect(draw(USERS))]
    packets += [subscribe(draw(_PACKET_IDS), draw(_SUBSCRIPTIONS)) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.integers(0, 7)) == 0:  # past limits.max_subscriptions_per_connection
        packets.append(_MANY_FILTERS)
    if draw(BOOLS):
        packets.append(b"\xa2\x07\x00\x03\x00\x01")  # UNSUBSCRIBE cut short
    return MqttInput(tuple(packets), *draw(ENDINGS))


PUBLISH_TOPICS = [
    WATCHED,
    "market/luno/ETH-ZAR",
    "market/fuzz/BTC-ZAR",
    "market/luno/BTC-ZAR/extra",
    "market/+/BTC-ZAR",
    "market/#",
    "#",
    f"user/{WATCH_USER}/alerts",
    "user/+/alerts",
    "service/fuzz-0/evictions",
    "$SYS/broker/uptime",
    "",
]
_PUBLISH_TOPICS = _pick(PUBLISH_TOPICS)


@mqtt_class
def forbidden_publish(draw: st.DrawFn) -> MqttInput:
    """A subscriber publishing (marked ticks) where it may not, at every QoS, retained or not."""
    packets = [valid_connect(draw(USERS))]
    for n in range(draw(st.integers(1, 3))):
        topic = draw(_PUBLISH_TOPICS)
        packets.append(
            publish(topic.encode(), hostile_tick(topic), qos=draw(QOS), retain=draw(BOOLS), packet_id=n + 1)
        )
    return MqttInput(tuple(packets), *draw(ENDINGS))


@mqtt_class
def will_injection(draw: st.DrawFn) -> MqttInput:
    """A subscriber's will on topics it may not publish to; the connection just ends."""
    user = draw(USERS)
    topic = draw(_pick([*PUBLISH_TOPICS, f"user/{user}/will"]))
    data = valid_connect(
        user,
        will=(topic.encode(), hostile_tick(topic)),
        will_qos=draw(QOS),
        will_retain=draw(BOOLS),
        keepalive=draw(_pick([0, 1, 60])),
    )
    return MqttInput((data,), *draw(ENDINGS))


@mqtt_class
def client_id_takeover(draw: st.DrawFn) -> MqttInput:
    """Another user (or a bad token) using the test's subscriber's or feed's client id."""
    user = draw(USERS)
    data = connect(
        draw(_pick([WATCH_USER, FEED_USER])).encode(),
        username=user.encode(),
        password=VALID_TOKENS[user] if draw(BOOLS) else WRONG_KEY_TOKEN,
        clean=draw(BOOLS),
    )
    return MqttInput((data,), *draw(ENDINGS))


_FIRST_PACKETS = _pick(
    [
        publish(WATCHED.encode(), hostile_tick()),
        publish(WATCHED.encode(), hostile_tick(), qos=1),
        subscribe(1, [(b"#", 0)]),
        b"\xc0\x00",  # PINGREQ
        b"\xe0\x00",  # DISCONNECT
        *GARBAGE_PACKETS,
    ]
)


@mqtt_class
def not_connect_first(draw: st.DrawFn) -> MqttInput:
    then = (valid_connect(draw(USERS)),) if draw(BOOLS) else ()
    return MqttInput((draw(_FIRST_PACKETS), *then), *draw(ENDINGS))


_TICK = b'"exchange":"luno","pair":"BTC-ZAR","bid":"1","ask":"2","last":"2","volume_24h":"1"'
INVALID_TICKS = [
    b'{"exchange":"luno","pair":"BTC-ZAR","bid":1.5,"ask":"2","last":"2","volume_24h":"1","ts":"2026-11-30T11:00:00Z"}',
    b'{"exchange":"luno","pair":"BTC-ZAR","bid":"1","ask":"2","last":"2","ts":"2026-11-30T11:00:00Z"}',
    b"{" + _TICK + b',"ts":"2026-11-30T11:00:00"}',  # naive timestamp
    b"{" + _TICK.replace(b"luno", b"valr") + b',"ts":"2026-11-30T11:00:00Z"}',  # not this topic's exchange
    b"{" + _TICK.replace(b'"bid":"1"', b'"bid":"1e3"') + b',"ts":"2026-11-30T11:00:00Z"}',
    b"{" + _TICK.replace(b'"bid":"1"', b'"bid":"-1"') + b',"ts":"2026-11-30T11:00:00Z"}',
    b"{" + _TICK + b',"ts":"2026-11-30T11:00:00Z","x":1}',
    b"{" + _TICK + b',"ts":"2026-11-30T11:00:00Z","seq":-5}',
    b"{" + _TICK + b',"ts":"2026-11-30T11:00:00Z","seq":1e99}',
    b"{" + _TICK + b',"ts":"2026-11-30T11:00:00Z"',  # not closed
    b"[]",
    b"null",
    b"",
    b"\xff\xfe\x00",
    b'{"a":' * 5000,
    b"{" + _TICK + b',"ts":"2026-11-30T11:00:00Z"}' + b" " * 5000,  # over 4 KiB
]
# 1,600 invalid ticks in one write: past limits.rate.publish_burst (1,000) as well.
_FLOODS = {
    qos: b"".join(
        publish(WATCHED.encode(), tick, qos=qos, packet_id=1 + n)
        for n, tick in enumerate(INVALID_TICKS * 100)
    )
    for qos in (0, 1)
}


@mqtt_class
def feed_invalid_ticks(draw: st.DrawFn) -> MqttInput:
    """A feed-role client publishing invalid ticks to the watched topic: all must be dropped."""
    user = draw(_pick(HOSTILE_FEEDS))
    packets = [connect(fresh_client_id(user), username=user.encode(), password=FEED_TOKENS[user])]
    qos = draw(_pick([0, 1]))
    if draw(st.integers(0, 3)) == 0:
        packets.append(_FLOODS[qos])
    else:
        ticks = draw(st.lists(_pick(INVALID_TICKS), min_size=1, max_size=4))
        packets += [publish(WATCHED.encode(), tick, qos=qos, packet_id=n + 1) for n, tick in enumerate(ticks)]
    return MqttInput(tuple(packets), *draw(ENDINGS))


# ---------------------------------------------------------------------------- WebSocket classes


def _handshake_variants() -> list[bytes]:
    return [
        HANDSHAKE[:10],
        HANDSHAKE[:-2],  # no blank line
        HANDSHAKE[:-1],
        ws_request(upgrade=None),
        ws_request(upgrade=None, connection=b"close"),
        ws_request(connection=b"keep-alive"),
        ws_request(key=None),
        ws_request(key=b""),
        ws_request(key=b"short"),
        ws_request(key=b"!!!!"),
        ws_request(key=b"a" * 200),
        ws_request(ws_version=b"8"),
        ws_request(ws_version=b""),
        ws_request(ws_version=b"13, 8"),
        ws_request(ws_version=b"99999999999999999999"),
        ws_request(ws_version=None),
        ws_request(b"/"),
        ws_request(b"/mqtt/"),
        ws_request(b"/MQTT"),
        ws_request(b"*"),
        ws_request(b"//mqtt"),
        ws_request(b"/mqtt?x=\x01"),
        ws_request(b"/mqtt\x00"),
        ws_request(b"/" + b"a" * 10000),
        ws_request(protocol=b"mqttv3.1"),
        ws_request(protocol=b"mqtt, mqtt"),
        ws_request(protocol=b""),
        ws_request(protocol=b",,,"),
        ws_request(protocol=None),
        ws_request(method=b"POST"),
        ws_request(method=b"get"),
        ws_request(method=b"CONNECT"),
        ws_request(method=b"\x16\x03\x01"),  # a TLS ClientHello's first bytes
        ws_request(version=b"HTTP/1.0"),
        ws_request(version=b"HTTP/2.0"),
        ws_request(version=b""),
        ws_request(eol=b"\n"),
        ws_request(extra=b"X-Big: " + b"a" * 8192 + b"\r\n"),
        ws_request(extra=b"X-Big: " + b"a" * 65536 + b"\r\n"),
        ws_request(extra=b"".join(b"X-%d: v\r\n" % n for n in range(300))),
        ws_request(extra=b"X-Name: \xff\xfe\x80\r\n"),
        ws_request(extra=b"Bad Header\r\n"),
        ws_request(extra=b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"),  # twice
        ws_request(extra=b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=99\r\n"),
        ws_request(extra=b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n",
        ws_request(extra=b"Content-Length: 100000\r\n") + b"x" * 100,
    ]


_HANDSHAKES = _pick(_handshake_variants())


@ws_class
def ws_bad_handshake(draw: st.DrawFn) -> WsInput:
    """Junk, partial and wrong HTTP upgrade requests."""
    data = draw(st.one_of(_HANDSHAKES, hostile_bytes(16384)))
    return WsInput((data,), 1, *draw(ENDINGS))


_WS_ENDINGS = _pick([(), (ws_frame(OP_CLOSE, b"\x03\xe8"),), (ws_frame(OP_BINARY, b"x", masked=False),)])


@ws_class
def ws_empty_binary(draw: st.DrawFn) -> WsInput:
    """Empty binary frames, before CONNECT or after it; then maybe a close or a bad frame."""
    frames = [ws_frame(OP_BINARY)] * draw(st.integers(1, 3))
    if draw(BOOLS):
        frames.insert(0, ws_frame(OP_BINARY, valid_connect(draw(USERS))))
    frames += draw(_WS_ENDINGS)
    return WsInput((HANDSHAKE, *frames), 1 + len(frames), *draw(ENDINGS))


_TEXT_PAYLOADS = st.one_of(
    USERS.map(valid_connect),
    st.text(max_size=40).map(str.encode),
    st.just(b"\xff\xfe not UTF-8"),
    hostile_bytes(),
)


@ws_class
def ws_text_frame(draw: st.DrawFn) -> WsInput:
    frames = (ws_frame(OP_TEXT, draw(_TEXT_PAYLOADS)), *draw(_WS_ENDINGS))
    return WsInput((HANDSHAKE, *frames), 1 + len(frames), *draw(ENDINGS))


_FRAGMENT_CASES = _pick(
    ["continuation_first", "two_starts", "fragmented_ping", "never_ends", "cont_after_fin"]
)


@ws_class
def ws_bad_fragmentation(draw: st.DrawFn) -> WsInput:
    data = valid_connect(draw(USERS))
    case = draw(_FRAGMENT_CASES)
    if case == "continuation_first":
        frames = [ws_frame(OP_CONT, data)]
    elif case == "two_starts":
        frames = [ws_frame(OP_BINARY, data[:5], fin=False), ws_frame(OP_BINARY, data[5:])]
    elif case == "fragmented_ping":
        frames = [ws_frame(OP_PING, b"a", fin=False), ws_frame(OP_CONT, b"b")]
    elif case == "never_ends":
        frames = [ws_frame(OP_BINARY, data[:5], fin=False)]
        frames += [ws_frame(OP_CONT, b"x", fin=False)] * draw(st.integers(1, 200))
    else:
        frames = [ws_frame(OP_BINARY, data), ws_frame(OP_CONT, b"\x00")]
    return WsInput((HANDSHAKE, b"".join(frames)), 1 + len(frames), *draw(ENDINGS))


_DECLARED = _pick([2**63 - 1, 2**63, 2**64 - 1, 2**32, MAX_MESSAGE_BYTES + 1, 16 * MAX_MESSAGE_BYTES])
_DATA_OPCODES = _pick([OP_BINARY, OP_TEXT, OP_CONT, OP_PING])


@ws_class
def ws_oversized_length(draw: st.DrawFn) -> WsInput:
    """A frame header announcing far more than will come (or than is allowed)."""
    frame = ws_frame(draw(_DATA_OPCODES), draw(hostile_bytes(65536)), length=draw(_DECLARED), form="64")
    return WsInput((HANDSHAKE, frame), 2, *draw(ENDINGS))


@ws_class
def ws_ping_flood(draw: st.DrawFn) -> WsInput:
    """Hundreds of pings (or pongs), never reading the answers; then RST."""
    count = draw(st.integers(100, 400))
    flood = ws_frame(draw(_pick([OP_PING, OP_PING, OP_PONG])), b"p" * draw(_pick([0, 1, 64, 125]))) * count
    return WsInput((HANDSHAKE, flood), 1 + count, 0.0, True)


@ws_class
def ws_control_too_big(draw: st.DrawFn) -> WsInput:
    """Control frames over 125 bytes ([RFC 6455 5.5])."""
    size = draw(_pick([126, 127, 1000, 65535, 70000]))
    frame = ws_frame(draw(_pick([OP_PING, OP_PONG, OP_CLOSE])), b"\x03\xe8" + b"c" * (size - 2))
    return WsInput((HANDSHAKE, frame), 2, *draw(ENDINGS))


@ws_class
def ws_reserved_opcode(draw: st.DrawFn) -> WsInput:
    opcode = draw(_pick([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]))
    frames = (ws_frame(opcode, draw(st.binary(max_size=32))), *draw(_WS_ENDINGS))
    return WsInput((HANDSHAKE, *frames), 1 + len(frames), *draw(ENDINGS))


@ws_class
def ws_rsv_bits(draw: st.DrawFn) -> WsInput:
    """RSV bits set with no extension negotiated."""
    opcode = draw(_pick([OP_BINARY, OP_PING]))
    frame = ws_frame(opcode, valid_connect(draw(USERS)), rsv=draw(st.integers(1, 7)))
    return WsInput((HANDSHAKE, frame), 2, *draw(ENDINGS))


@ws_class
def ws_unmasked(draw: st.DrawFn) -> WsInput:
    """A client frame without a mask, first or after a valid CONNECT."""
    opcode = draw(_pick([OP_BINARY, OP_TEXT, OP_PING, OP_CLOSE]))
    frame = ws_frame(opcode, valid_connect(draw(USERS)) if opcode != OP_CLOSE else b"\x03\xe8", masked=False)
    before = [ws_frame(OP_BINARY, valid_connect(draw(USERS)))] if draw(BOOLS) else []
    return WsInput((HANDSHAKE, *before, frame), 2 + len(before), *draw(ENDINGS))


_CLOSE_PAYLOADS = _pick(
    [
        b"\x03",  # one byte
        *(struct.pack("!H", code) for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)),
        struct.pack("!H", 1000) + b"\xff\xfe",  # reason not UTF-8
    ]
)


@ws_class
def ws_bad_close(draw: st.DrawFn) -> WsInput:
    """Close frames with reserved or invalid codes, then maybe more data."""
    after = [ws_frame(OP_BINARY, valid_connect(draw(USERS)))] if draw(BOOLS) else []
    frames = (ws_frame(OP_CLOSE, draw(_CLOSE_PAYLOADS)), *after)
    return WsInput((HANDSHAKE, *frames), 1 + len(frames), *draw(ENDINGS))


@ws_class
def ws_non_minimal_length(draw: st.DrawFn) -> WsInput:
    frame = ws_frame(OP_BINARY, valid_connect(draw(USERS)), form=draw(_pick(["16", "64"])))
    return WsInput((HANDSHAKE, frame), 2, *draw(ENDINGS))


@ws_class
def ws_big_message(draw: st.DrawFn) -> WsInput:
    """64 KiB or just over listeners.ws.max_message_bytes, in 1 to 16 fragments."""
    size = draw(_pick([64 * 1024, MAX_MESSAGE_BYTES + 1]))
    pieces = draw(_pick([1, 4, 16]))
    body, step = noise(draw(SEEDS), size), -(-size // pieces)
    frames = [
        ws_frame(OP_CONT if n else OP_BINARY, body[n * step : (n + 1) * step], fin=n == pieces - 1)
        for n in range(pieces)
    ]
    if draw(BOOLS):  # after a valid CONNECT this time
        frames.insert(0, ws_frame(OP_BINARY, valid_connect(draw(USERS))))
    return WsInput((HANDSHAKE, *frames), 1 + len(frames), *draw(ENDINGS))


_RANDOM_FRAMES = st.lists(
    st.builds(
        ws_frame, st.integers(0, 15), st.binary(max_size=24), fin=BOOLS, rsv=st.integers(0, 7), masked=BOOLS
    ),
    min_size=1,
    max_size=6,
)


@ws_class
def ws_random_frames(draw: st.DrawFn) -> WsInput:
    frames = draw(_RANDOM_FRAMES)
    return WsInput((HANDSHAKE, b"".join(frames)), 1 + len(frames), *draw(ENDINGS))


# ---------------------------------------------------------------------------- per transport

_FRAMINGS = _pick(["per_packet", "one_frame", "split"])
_CUTS = st.lists(st.integers(0, 2**16), max_size=7)


@st.composite
def _over_tcp(draw: st.DrawFn, kind: str, inner: st.SearchStrategy[MqttInput]) -> Hostile:
    mqtt = draw(inner)
    chunks = mqtt.packets if draw(BOOLS) else (b"".join(mqtt.packets),)
    return Hostile(kind, "tcp", chunks, len(mqtt.packets), mqtt.wait_s, mqtt.reset)


@st.composite
def _over_ws(draw: st.DrawFn, kind: str, inner: st.SearchStrategy[MqttInput]) -> Hostile:
    mqtt = draw(inner)
    framing = draw(_FRAMINGS)
    if framing == "per_packet":
        frames = [ws_frame(OP_BINARY, p) for p in mqtt.packets]
    elif framing == "one_frame":
        frames = [ws_frame(OP_BINARY, b"".join(mqtt.packets))]
    else:  # the same bytes over up to 8 frames, cut anywhere
        data = b"".join(mqtt.packets)
        cuts = sorted({cut % (len(data) + 1) for cut in draw(_CUTS)} | {0, len(data)})
        frames = [ws_frame(OP_BINARY, data[a:b]) for a, b in itertools.pairwise(cuts)]
    return Hostile(kind, "ws", (HANDSHAKE, b"".join(frames)), 1 + len(frames), mqtt.wait_s, mqtt.reset)


@st.composite
def _ws_only(draw: st.DrawFn, kind: str, inner: st.SearchStrategy[WsInput]) -> Hostile:
    ws = draw(inner)
    return Hostile(kind, "ws", ws.chunks, ws.units, ws.wait_s, ws.reset)


def inputs_for(classes: list[str]) -> dict[Transport, list[tuple[str, st.SearchStrategy[Hostile]]]]:
    """Per transport, (class name, strategy) for each named class that applies to it."""
    out: dict[Transport, list[tuple[str, st.SearchStrategy[Hostile]]]] = {"tcp": [], "ws": []}
    for name in classes:
        if name in MQTT_CLASSES:
            out["tcp"].append((name, _over_tcp(name, MQTT_CLASSES[name])))
            out["ws"].append((name, _over_ws(name, MQTT_CLASSES[name])))
        elif name in WS_CLASSES:
            out["ws"].append((name, _ws_only(name, WS_CLASSES[name])))
    return {transport: pairs for transport, pairs in out.items() if pairs}
