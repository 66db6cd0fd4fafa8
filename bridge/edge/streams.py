"""A connection's bytes, both ways: the broker's own asyncio protocols for TCP and WebSocket.

amqtt's readers read a byte at a time (TCP) or spin forever (WebSocket: after an *empty*
binary message, ``WebSocketsReader._feed_buffer`` loops on a closed connection without ever
yielding, freezing the whole broker before any login). asyncio's streams and websockets'
asyncio connection cost an idle connection a StreamReader, a StreamWriter, queues, waiters
and tasks. Here each socket is one :class:`StreamConnection`, an ``asyncio.Protocol`` that
is also the amqtt reader and writer the broker serves it through:

- what arrives is handed over as one chunk (``b""`` only at the end of the stream) to
  whoever awaits :meth:`ChunkReader.read_chunk`, or kept until someone does; past
  :data:`_CHUNK` unread bytes the socket stops being read (back-pressure);
- writes go straight to the transport; :meth:`StreamConnection.drain` waits while the
  transport has paused writing;
- nothing of it is a task: an idle connection is this object, its transport and whatever
  the broker keeps for its session.

The WebSocket subclass (bridge/edge/ws_connection.py) puts websockets' sans-I/O protocol in
between and applies MQTT's WebSocket rules.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from amqtt.adapters import ReaderAdapter, WriterAdapter

from bridge.errors import ProtocolError

__all__ = ["ChunkReader", "Listener", "StreamConnection", "TcpConnection"]

# Unread bytes past which a connection's socket is no longer read until the broker catches up.
_CHUNK = 256 * 1024

# (the connection as reader, the connection as writer) -> the coroutine that serves it
Serve = Callable[[Any, Any], Coroutine[Any, Any, None]]


class ChunkReader(ReaderAdapter):
    """Inbound bytes in chunks, with bytes read too far given back by :meth:`unread`."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def unread(self, data: bytes) -> None:
        """Bytes that arrived past the CONNECT: the next :meth:`read_chunk` returns them first."""
        self._pending = data + self._pending

    def read_chunk(self) -> Awaitable[bytes]:
        """Whatever has arrived (at least one byte), or ``b""`` at the end of the stream."""
        raise NotImplementedError

    async def read(self, n: int = -1) -> bytes:
        """amqtt's interface: up to ``n`` bytes (all of the next chunk when ``n`` < 0)."""
        data = await self.read_chunk()
        if 0 <= n < len(data):
            self.unread(data[n:])
            data = data[:n]
        return data

    def feed_eof(self) -> None:
        pass

    def logged_in(self, max_unsent: int) -> None:
        """The CONNECT was accepted: a transport may relax its pre-login bounds (and allow
        up to ``max_unsent`` bytes the client has not read)."""


class Listener:
    """What every connection of one listener shares: its name and how it is served."""

    __slots__ = ("name", "serve")

    def __init__(self, name: str, serve: Serve) -> None:
        self.name = name
        self.serve = serve

    def start(self, connection: StreamConnection) -> None:
        """Serve ``connection`` in a task of its own (it ends with the connection)."""
        asyncio.get_running_loop().create_task(self.serve(connection, connection))


class StreamConnection(ChunkReader, WriterAdapter, asyncio.Protocol):
    """One socket: an asyncio protocol that is also its own amqtt reader and writer."""

    __slots__ = ("_drained", "_eof", "_listener", "_paused", "_waiter", "transport")

    transport: asyncio.Transport

    def __init__(self, listener: Listener) -> None:
        super().__init__()
        self._listener = listener
        self._waiter: asyncio.Future[bytes] | None = None  # a read_chunk() waiting
        self._drained: asyncio.Future[None] | None = None  # a drain() waiting
        self._eof = False  # nothing more will arrive
        self._paused = False  # the transport paused writing

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._listener.start(self)

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> bool:
        self._end()
        # Keep a plain socket open for the broker's last writes; TLS cannot half-close.
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)  # drain() then reports the connection gone

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # ------------------------------------------------------------------ reading

    def _feed(self, data: bytes) -> None:
        """Bytes for the broker: to the waiting reader, or kept until it reads."""
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._pending:
            self._waiter = None
            waiter.set_result(data)
            return
        self._pending += data
        if len(self._pending) > _CHUNK:
            self.transport.pause_reading()

    def _end(self) -> None:
        """The stream ended: the reader gets what is left, then ``b""``."""
        self._eof = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            self._finish(waiter)

    def read_chunk(self) -> asyncio.Future[bytes]:
        """A future, not a coroutine: an idle connection's reader waits on it with no frame
        of this method kept alive."""
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pending = self._pending
        if pending:
            self._pending = b""
            if len(pending) > _CHUNK and not self._eof:
                self.transport.resume_reading()
            waiter.set_result(pending)
        elif self._eof:
            self._finish(waiter)
        else:
            self._waiter = waiter
        return waiter

    def _finish(self, waiter: asyncio.Future[bytes]) -> None:
        try:
            waiter.set_result(self._end_of_stream())
        except ProtocolError as exc:
            waiter.set_exception(exc)

    def _end_of_stream(self) -> bytes:
        """What reading returns once the stream has ended (a subclass may raise instead)."""
        return b""

    # ------------------------------------------------------------------ writing (amqtt's WriterAdapter)

    def is_open(self) -> bool:
        return not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused and not self.transport.is_closing():
            drained = self._drained
            if drained is None or drained.done():
                drained = self._drained = asyncio.get_running_loop().create_future()
            await drained
        if self.transport.is_closing() and self._eof:
            raise ConnectionResetError("Connection lost")

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self.transport.get_extra_info("peername")
        if not peer or len(peer) < 2:
            return None
        return peer[0], peer[1]

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return cast("ssl.SSLObject | None", self.transport.get_extra_info("ssl_object"))

    async def close(self) -> None:
        self.transport.close()  # what is buffered is still sent


class TcpConnection(StreamConnection):
    """MQTT over plain TCP (or TLS): bytes as they come."""

    __slots__ = ()
