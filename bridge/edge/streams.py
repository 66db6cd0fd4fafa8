"""A connection's inbound bytes, as chunks: the broker's own readers for TCP and WebSocket.

amqtt's readers read a byte at a time (TCP) or spin forever (WebSocket: after an *empty*
binary message, ``WebSocketsReader._feed_buffer`` loops on a closed connection without ever
yielding, freezing the whole broker before any login). These readers hand the broker
whatever has arrived as one chunk, ``b""`` only at the end of the stream, and apply MQTT's
WebSocket rules ([MQTT-6.0.0-1..4]):

- an empty binary message carries no bytes and is skipped (waiting for the next one yields);
- a text message closes the connection (MQTT travels in binary frames only);
- MQTT packets may span messages, and a message may hold several packets (the framing
  above this layer does not care where messages begin).

They are amqtt ``ReaderAdapter``\\s too, so amqtt's code that still reads through them works.
"""

from __future__ import annotations

import asyncio

from amqtt.adapters import ReaderAdapter
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from bridge.errors import ProtocolError

__all__ = ["ChunkReader", "TcpReader", "WsReader"]

_CHUNK = 256 * 1024


class ChunkReader(ReaderAdapter):
    """Inbound bytes in chunks, with bytes read too far given back by :meth:`unread`."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def unread(self, data: bytes) -> None:
        """Bytes that arrived past the CONNECT: the next :meth:`read_chunk` returns them first."""
        self._pending = data + self._pending

    async def read_chunk(self) -> bytes:
        """Whatever has arrived (at least one byte), or ``b""`` at the end of the stream."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self._receive()

    async def _receive(self) -> bytes:
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


class TcpReader(ChunkReader):
    __slots__ = ("_stream",)

    def __init__(self, stream: asyncio.StreamReader) -> None:
        super().__init__()
        self._stream = stream

    async def _receive(self) -> bytes:
        try:
            return await self._stream.read(_CHUNK)
        except ConnectionError:
            return b""


class WsReader(ChunkReader):
    __slots__ = ("connection",)

    def __init__(self, connection: ServerConnection) -> None:
        super().__init__()
        self.connection = connection

    async def _receive(self) -> bytes:
        while True:
            try:
                message = await self.connection.recv()
            except ConnectionClosed as exc:
                if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                    raise ProtocolError("too_large", "WebSocket message over the size limit") from None
                return b""
            if isinstance(message, str):
                raise ProtocolError(
                    "text_frame", "MQTT over WebSocket is sent in binary frames"
                )  # [MQTT-6.0.0-1]
            if message:
                return message
