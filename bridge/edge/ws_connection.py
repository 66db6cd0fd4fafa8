"""MQTT over WebSocket: websockets' sans-I/O protocol driven by our own asyncio protocol.

websockets' asyncio server gave every connection a handler task, a ``ServerConnection``
with its queues, futures and handshake headers, and a task of ours parked in ``recv()``:
~3.5 KB over a TCP connection while idle. Here :class:`WsConnection` feeds the bytes to
``websockets.server.ServerProtocol`` for the opening handshake; once open, an uncompressed
connection's frames are read by :class:`~bridge.core.wsframes.FrameReader` (websockets'
protocol, its parser generators and the request they held are let go), a compressed one's
by websockets still. Binary frames go straight to the broker's reader
(:class:`~bridge.edge.streams.StreamConnection`), writes straight to the transport; pings
are answered and the closing handshake done here.

The handshake: only :attr:`WsListener.path` is served (else 404), subprotocol ``mqtt``
required (else 400, websockets' own checks give 400/426 for the rest), permessage-deflate
only if the listener enables it, and a handshake not done within ``open_timeout`` is cut.
A client's failed handshake is logged in one line (bridge/logs.py). With ``allowed_origins``
a browser page from another origin gets 403 before the upgrade (bridge/core/origin.py); with
``trusted_proxies`` the client's address is read from a trusted proxy's ``X-Forwarded-For``
(bridge/core/forwarded.py) and is the peer the broker logs, counts and lists.

MQTT's rules ([MQTT-6.0.0-1..4]): empty binary frames carry no bytes and are skipped; a text
frame is a protocol error (the reader raises ``ProtocolError("text_frame")``); packets may
span frames. WebSocket pings are answered by websockets; ours are sent only if the listener
sets ``ping_interval`` (MQTT's keep-alive finds dead clients).

What a client can make the broker hold is bounded. websockets answers every ping with a
pong with no back-pressure; a client that sends pings and never reads grew the broker
without limit (1M pings in 6 s: +120 MB, before any login). So:

- before the CONNECT is accepted, a connection may send at most :data:`PREAUTH_PINGS` pings
  and the largest message it may send is the CONNECT budget (a few KB plus the largest
  token; more is closed with 1009 and the reader raises ``ProtocolError("too_large")``);
- always: when bytes the client has not read pass ``max_unsent`` (small before login; after
  it, room for the broker's own bounded output plus slack), the client is not consuming what
  its own frames cause and the connection is aborted.
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import struct
from collections import Counter
from collections.abc import Sequence

from websockets.exceptions import InvalidHandshake
from websockets.extensions import ServerExtensionFactory
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.typing import Subprotocol

from bridge.config import HttpConfig, WsListenerConfig
from bridge.core.forwarded import TrustedProxies, client_address
from bridge.core.origin import OriginPolicy, dashboard_origins
from bridge.core.wire import ws_binary_frame
from bridge.core.wsframes import BINARY, CLOSE, CONT, PING, PONG, FrameError, FrameReader, close_echo
from bridge.edge.streams import Listener, Serve, StreamConnection
from bridge.errors import ProtocolError
from bridge.logs import CLIENT, HandshakeLog, clip, handshake_failed

__all__ = ["PREAUTH_PINGS", "PREAUTH_UNSENT", "WsConnection", "WsListener", "origin_policy"]

PREAUTH_PINGS = 16
# Before login the broker sends nothing but pongs (and the handshake, already gone).
PREAUTH_UNSENT = 16 * 1024
# websockets' defaults, kept: a handshake, and a closing handshake, have this long.
OPEN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0
# With ``ping_interval`` set: a ping unanswered this long closes the connection (1011).
PING_TIMEOUT_S = 20.0

_MQTT = [Subprotocol("mqtt")]
_OPEN, _CLOSED = State.OPEN, State.CLOSED
_BINARY, _CONT, _TEXT, _PING, _PONG = Opcode.BINARY, Opcode.CONT, Opcode.TEXT, Opcode.PING, Opcode.PONG


def origin_policy(listener: WsListenerConfig, http: HttpConfig) -> OriginPolicy | None:
    """The listener's Origin allowlist with the broker's own HTTP pages (the dashboard) in it;
    None when any origin may connect. With ``http.port: 0`` the dashboard's origins are added
    once the port is bound (``policy.allow(dashboard_origins(host, port))``, bridge.runtime)."""
    if listener.allowed_origins is None:
        return None
    policy = OriginPolicy(listener.allowed_origins)
    if http.enabled:
        policy.allow(dashboard_origins(http.host, http.port))
    return policy


class WsListener(Listener):
    """One WebSocket listener: its settings, its open connections, and how it closes.

    Stands in for the ``asyncio.Server`` it wraps where amqtt's ``Server`` expects one
    (``sockets``, ``close()``, ``wait_closed()``): closing also ends every connection with
    a 1001 close frame, as websockets' server did.
    """

    __slots__ = (
        "_all_closed",
        "closing",
        "connect_budget",
        "connections",
        "extensions",
        "handshake_log",
        "log",
        "max_size",
        "origins",
        "path",
        "ping_interval",
        "refusals",
        "refused_origins",
        "server",
        "trusted_proxies",
    )

    def __init__(
        self,
        name: str,
        serve: Serve,
        *,
        path: str,
        connect_budget: int,
        max_size: int,
        compression: bool = False,
        ping_interval: float | None = None,
        origins: OriginPolicy | None = None,
        trusted_proxies: TrustedProxies | None = None,
        refusals: Counter[str] | None = None,
        log: logging.Logger,
    ) -> None:
        super().__init__(name, serve)
        self.path = path
        self.origins = origins  # None: any page may connect
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.refused_origins = 0
        self.refusals = refusals  # the broker's, by reason (mb_refusals): "ws_origin" counted there
        self.connect_budget = connect_budget
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.extensions: Sequence[ServerExtensionFactory] | None = (
            enable_server_permessage_deflate(None) if compression else None
        )
        self.log = log
        # websockets' own records (a handshake that failed in our code, ...): one line for a
        # client's fault, a traceback for ours.
        self.handshake_log = HandshakeLog(log, name)
        self.connections: set[WsConnection] = set()  # from TCP accept to connection_lost
        self.server: asyncio.Server | None = None
        self.closing = False
        self._all_closed: asyncio.Event | None = None

    def connection(self) -> WsConnection:
        """The protocol factory for ``loop.create_server``."""
        return WsConnection(self)

    # asyncio.Server's face, for amqtt's Server.close_instance() and the broker's bound_port().

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    def close(self) -> None:
        """Stop accepting; every open connection gets a 1001 close frame."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.going_away()

    async def wait_closed(self) -> None:
        """Until every connection is gone (each has its closing timeout)."""
        if self.server is not None:
            await self.server.wait_closed()
        if self.connections:
            self._all_closed = asyncio.Event()
            await self._all_closed.wait()

    def _forget(self, connection: WsConnection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


class WsConnection(StreamConnection):
    """One WebSocket connection (see module docstring)."""

    __slots__ = (
        "_eof_sent",
        "_frames",
        "_max_unsent",
        "_peer",
        "_ping",
        "_pings",
        "_sent_close",
        "_text",
        "_timer",
        "_ws",
        "authenticated",
        "compressed",
    )

    _listener: WsListener

    def __init__(self, listener: WsListener) -> None:
        super().__init__(listener)
        self._ws: ServerProtocol | None = None
        self._peer: tuple[str, int] | None = None  # the client behind a trusted proxy
        self._timer: asyncio.TimerHandle | None = None  # handshake, keep-alive or closing deadline
        self._pings = 0  # pings before login
        self._ping: bytes | None = None  # our unanswered ping, if any (its payload)
        self._max_unsent = PREAUTH_UNSENT
        self._text = False  # a text frame came: reading ends with a protocol error
        self._eof_sent = False  # we half-closed: the closing handshake is done on our side
        # Open and uncompressed: our own frame reader instead of websockets' parser, and the
        # close code we sent (0: none yet).
        self._frames: FrameReader | None = None
        self._sent_close = 0
        self.authenticated = False
        self.compressed = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        listener = self._listener
        listener.connections.add(self)
        self._ws = ServerProtocol(
            subprotocols=_MQTT,
            extensions=listener.extensions,
            max_size=listener.connect_budget,
            logger=listener.handshake_log,
        )
        self._timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT_S, self._open_timeout)

    def data_received(self, data: bytes) -> None:
        if self._frames is not None:
            self._frames_received(self._frames, data)
            return
        ws = self._ws
        if ws is None:
            return  # a handshake that failed or timed out: nothing more is read
        opening = ws.state is State.CONNECTING
        ws.receive_data(data)
        events = ws.events_received()
        if opening:
            request = events[0] if events else None
            if isinstance(request, Request):
                del events[0]
                self._answer(ws, request)
            elif ws.handshake_exc is not None:
                self._handshake_failed(ws.handshake_exc)
            if self._ws is None or ws.state is not _OPEN:
                return  # refused, failed, or the request is not whole yet
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
        self._send(ws)
        if ws.state > _OPEN:  # closing or closed: nothing more will be read
            self._end()
        elif not self.compressed and not self._eof:
            self._own_frames(ws)
        self._check_unsent()

    def _check_unsent(self) -> None:
        unsent = self.transport.get_write_buffer_size()
        if unsent > self._max_unsent:
            self._abort(f"{unsent} bytes unread by the client")

    def eof_received(self) -> bool:
        ws = self._ws
        if ws is None:
            self._end()  # without a closing handshake: the stream just ends
            return False
        opening = ws.state is State.CONNECTING
        ws.receive_eof()
        if opening:
            self._handshake_failed(ws.handshake_exc)
            return False
        self._send(ws)
        self._end()
        return False  # the WebSocket has its own closing handshake: nothing more to write

    def connection_lost(self, exc: Exception | None) -> None:
        ws = self._ws
        if ws is not None and ws.state is State.CONNECTING:
            ws.receive_eof()  # gone before its request was whole: a failed handshake
            self._handshake_failed(ws.handshake_exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._listener._forget(self)
        super().connection_lost(exc)

    # ------------------------------------------------------------------ the opening handshake

    def get_peer_info(self) -> tuple[str, int] | None:
        return self._peer or super().get_peer_info()

    def _answer(self, ws: ServerProtocol, request: Request) -> None:
        listener = self._listener
        if listener.trusted_proxies:
            self._forwarded(request)
        origins = listener.origins
        refusal = origins.refusal(request.headers.get_all("Origin")) if origins is not None else None
        if request.path.split("?", 1)[0] != listener.path:
            response = ws.reject(http.HTTPStatus.NOT_FOUND, f"MQTT is served on {listener.path}\n")
        elif refusal is not None:
            listener.refused_origins += 1
            if listener.refusals is not None:
                listener.refusals["ws_origin"] += 1
            listener.log.info(
                "WebSocket handshake from %s on %s refused (403): %s: %s",
                self.get_peer_info(),
                listener.name,
                refusal,
                clip(",".join(request.headers.get_all("Origin")), 120),
                extra=CLIENT,
            )
            response = ws.reject(http.HTTPStatus.FORBIDDEN, "Origin not allowed.\n")
        elif listener.closing:
            response = ws.reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n")
        else:
            response = ws.accept(request)
        ws.send_response(response)
        if ws.state is not _OPEN:
            self._handshake_failed(ws.handshake_exc)
            return
        self._timer.cancel()  # type: ignore[union-attr]
        self._timer = None
        self.compressed = bool(ws.extensions)
        if self.compressed:
            _forget_request(ws)
        if listener.ping_interval is not None:
            self._timer = asyncio.get_running_loop().call_later(listener.ping_interval, self._keepalive)
        listener.start(self)

    def _forwarded(self, request: Request) -> None:
        """Behind a trusted proxy: the client's address from ``X-Forwarded-For`` (no port)."""
        peer = super().get_peer_info()
        if peer is None:
            return
        address = client_address(
            peer[0], request.headers.get_all("X-Forwarded-For"), self._listener.trusted_proxies
        )
        if address != peer[0]:
            self._peer = (address, 0)

    def _handshake_failed(self, exc: BaseException | None) -> None:
        """Send the answer (if any), close, and read nothing more. Logged once: anything but
        a client's bad request (or our own refusal, ``exc`` None) websockets has logged with
        its traceback."""
        ws, self._ws = self._ws, None
        if ws is not None and not self.transport.is_closing():
            for data in ws.data_to_send():
                if data:
                    self.transport.write(data)
            self.transport.close()
        if isinstance(exc, InvalidHandshake):
            handshake_failed(self._listener.log, self._listener.name, self.get_peer_info(), exc)

    def _open_timeout(self) -> None:
        self._ws = None  # nothing to log: websockets did not either
        self.transport.abort()

    # ------------------------------------------------------------------ frames

    def _frame(self, frame: Frame) -> None:
        if self._text:
            return  # nothing after a text frame is read
        opcode = frame.opcode
        if opcode is _BINARY or opcode is _CONT:
            if frame.data:  # an empty binary frame carries nothing ([MQTT-6.0.0-1..4])
                self._feed(bytes(frame.data))
        elif opcode is _TEXT:
            self._fail_reading()
        elif opcode is _PING:
            if not self.authenticated:
                self._pings += 1
                if self._pings > PREAUTH_PINGS:
                    self._abort(f"more than {PREAUTH_PINGS} pings before CONNECT")
        elif opcode is _PONG and frame.data == self._ping:
            self._ping = None

    def _fail_reading(self) -> None:
        """A text frame: MQTT travels in binary frames only. The reader raises after what
        came before it; nothing after it is read."""
        self._text = True
        self._end()

    def _end_of_stream(self) -> bytes:
        ws = self._ws
        if self._text:
            raise ProtocolError(
                "text_frame", "MQTT over WebSocket is sent in binary frames"
            )  # [MQTT-6.0.0-1]
        if self._sent_close == CloseCode.MESSAGE_TOO_BIG or (
            ws is not None and ws.close_sent is not None and ws.close_sent.code == CloseCode.MESSAGE_TOO_BIG
        ):
            raise ProtocolError("too_large", "WebSocket message over the size limit")
        return b""

    # ------------------------------------------------------------------ frames, open and uncompressed

    def _own_frames(self, ws: ServerProtocol) -> None:
        """From now on frames are read by :class:`FrameReader`: websockets' parser is let go
        between two frames (its inner parser waiting in ``at_eof``, nothing of a frame read,
        no fragmented message under way). Otherwise it stays, at a memory cost only."""
        if not _between_frames(ws) or ws.cur_size is not None:
            _forget_request(ws)
            return
        self._frames = FrameReader(ws.max_size or self._listener.max_size)
        self._ws = None

    def _frames_received(self, reader: FrameReader, data: bytes) -> None:
        if self._eof_sent:
            return  # the closing handshake is over on our side: nothing more is read
        try:
            frames = reader.feed(data)
        except FrameError as exc:
            self._fail(exc.code)
            return
        for opcode, payload in frames:
            if opcode in (BINARY, CONT):
                # An empty binary frame carries nothing ([MQTT-6.0.0-1..4]); after a text
                # frame or a close only the closing handshake goes on.
                if payload and not self._eof:
                    self._feed(payload)
            elif opcode == PING:
                if not self.authenticated:
                    self._pings += 1
                    if self._pings > PREAUTH_PINGS:
                        self._abort(f"more than {PREAUTH_PINGS} pings before CONNECT")
                        return
                self._control(0x8A, payload)  # the pong ([RFC 6455] 5.5.2)
            elif opcode == PONG:
                if payload == self._ping:
                    self._ping = None
            elif opcode == CLOSE:
                try:
                    echo = close_echo(payload)
                except FrameError as exc:
                    self._fail(exc.code)
                    return
                if not self._sent_close:
                    self._sent_close = CloseCode.NORMAL_CLOSURE
                    self._control(0x88, echo)
                self._half_close()  # a server closes the TCP connection first ([RFC 6455] 7.1.1)
                self._end()
                return
            else:  # TEXT: MQTT travels in binary frames only
                self._fail_reading()
        self._check_unsent()

    def _control(self, first: int, payload: bytes) -> None:
        if not self._eof_sent and not self.transport.is_closing():
            self.transport.write(bytes((first, len(payload))) + payload)

    def _fail(self, code: int, reason: str = "") -> None:
        """Fail the connection ([RFC 6455] 7.1.7): a close frame with ``code``, then our end
        of the stream; nothing more is read."""
        if not self._sent_close:
            self._sent_close = code
            self._control(0x88, code.to_bytes(2, "big") + reason.encode()[:120])
        self._half_close()
        self._end()

    def _half_close(self) -> None:
        transport = self.transport
        if self._eof_sent or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()  # TLS cannot half-close
            return
        self._eof_sent = True
        try:
            transport.write_eof()
        except (OSError, RuntimeError):  # uvloop raises RuntimeError on a closed one
            transport.abort()
            return
        self._closing_deadline()

    def _send(self, ws: ServerProtocol) -> None:
        """Write what websockets has for the network; its end-of-stream marker half-closes
        (the client then closes, or is cut after the closing timeout)."""
        transport = self.transport
        for data in ws.data_to_send():
            if self._eof_sent or transport.is_closing():
                return  # after our end of stream (or an abort) nothing more goes out
            if data:
                transport.write(data)
            else:
                self._half_close()

    def _closing_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.transport.abort)

    def _abort(self, why: str) -> None:
        if not self.transport.is_closing():
            self._listener.log.info("WebSocket on %s aborted: %s", self._listener.name, why)
            self.transport.abort()
        self._end()

    # ------------------------------------------------------------------ keep-alive (opt-in)

    def _keepalive(self) -> None:
        ws = self._ws
        interval = self._listener.ping_interval
        if not self.is_open() or interval is None:
            self._timer = None
            return
        loop = asyncio.get_running_loop()
        if self._ping is not None:
            (sent,) = struct.unpack("!d", self._ping[:8])
            if loop.time() - sent >= PING_TIMEOUT_S:
                self._timer = None
                if ws is None:
                    self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                else:
                    ws.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                    self._send(ws)
                    self._end()
                return
        else:
            self._ping = struct.pack("!d", loop.time()) + os.urandom(4)
            if ws is None:
                self._control(0x89, self._ping)
            else:
                ws.send_ping(self._ping)
                self._send(ws)
        self._timer = loop.call_later(interval, self._keepalive)

    # ------------------------------------------------------------------ the broker's side

    def logged_in(self, max_unsent: int) -> None:
        """The CONNECT was accepted: full-size messages, the post-login bound on unread bytes."""
        self.authenticated = True
        self._max_unsent = max_unsent
        if self._frames is not None:
            self._frames.max_size = self._listener.max_size
        if self._ws is not None:
            self._ws.max_size = self._listener.max_size

    def is_open(self) -> bool:
        if self._eof_sent or self.transport.is_closing():
            return False
        if self._frames is not None:
            return not self._sent_close
        ws = self._ws
        return ws is not None and ws.state is _OPEN

    def write(self, data: bytes) -> None:
        """One binary frame (MQTT does not care where frames begin or end)."""
        if not self.is_open():
            return
        ws = self._ws
        if ws is not None and self.compressed:
            ws.send_binary(data)
            self._send(ws)
        else:
            self.transport.write(ws_binary_frame(data))

    async def drain(self) -> None:
        await super().drain()
        ws = self._ws
        if (ws is not None and ws.state is _CLOSED) or (
            self._frames is not None and self._eof and self._eof_sent
        ):
            raise ConnectionResetError("WebSocket closed")

    async def close(self) -> None:
        """The closing handshake (1000); the client has the closing timeout to answer."""
        self._close(CloseCode.NORMAL_CLOSURE)

    def going_away(self) -> None:
        """The listener is closing (1001); a handshake still under way is cut."""
        self._close(CloseCode.GOING_AWAY)

    def _close(self, code: int) -> None:
        ws = self._ws
        if self.transport.is_closing():
            return
        if self._frames is not None:
            if not self._sent_close:
                self._sent_close = code
                self._control(0x88, code.to_bytes(2, "big"))
            self._closing_deadline()
            return
        if ws is None or ws.state is State.CONNECTING:
            self.transport.abort()
            return
        if ws.state is _OPEN:
            ws.send_close(code)
            self._send(ws)
        self._closing_deadline()


def _forget_request(ws: ServerProtocol) -> None:
    """Let the handshake request go once the connection is open.

    ``ServerProtocol.parse`` keeps the request (its headers: ~2.6 KB) in its generator frame
    for the connection's whole life, then parses frames as ``Protocol.parse``. Between two
    frames (the inner parser waiting in ``at_eof``, nothing of a frame consumed) that parser
    can be started afresh without the request. Anywhere else (a frame half-read, another
    websockets version) the parser is left as it is: the cost is memory, never behaviour.
    """
    if ws.parser.gi_code is ServerProtocol.parse.__code__ and _between_frames(ws):  # type: ignore[attr-defined]
        ws.parser = Protocol.parse(ws)
        next(ws.parser)


def _between_frames(ws: ServerProtocol) -> bool:
    """websockets' parser waits for the next frame with none of it read (its innermost
    generator is ``StreamReader.at_eof`` and nothing is buffered)."""
    inner = ws.parser
    while (outer := getattr(inner, "gi_yieldfrom", None)) is not None:
        inner = outer
    return getattr(inner, "gi_code", None) is _AT_EOF and not ws.reader.buffer


_AT_EOF = StreamReader.at_eof.__code__
