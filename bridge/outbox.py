"""Direct QoS 0 delivery: pre-encoded bytes written straight to a connection's transport.

amqtt delivers each message to each subscriber in its own task, encoding it again every
time. Here the broker encodes a PUBLISH (and, for WebSocket, its frame) once per payload
variant, and an :class:`Outbox` per connection writes it with one ``transport.write``.

Slow consumers: when a connection's transport buffer holds more than ``high_water`` bytes,
new messages are conflated (the latest per topic is kept, older ones are superseded and
counted), and written when the buffer drains. Memory per connection is bounded by
``high_water`` plus one message per topic, and a stalled phone never slows the others.
Frames are written whole, so they interleave safely with amqtt's own writes (SUBACK, QoS 1).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from amqtt.adapters import StreamWriterAdapter, WebSocketsWriter, WriterAdapter
from websockets.protocol import State

__all__ = ["Outbox"]


class Outbox:
    def __init__(
        self,
        transport: asyncio.WriteTransport,
        *,
        websocket: bool,
        high_water: int,
        is_open: Callable[[], bool],
    ) -> None:
        self.websocket = websocket
        self._transport = transport
        self._high_water = high_water
        self._is_open = is_open
        self._pending: dict[str, bytes] = {}

    @classmethod
    def for_writer(
        cls, writer: WriterAdapter, high_water: int, send_buffer: int | None = None
    ) -> Outbox | None:
        """An outbox for amqtt's writer, or None where bytes cannot be shared (compression)."""
        outbox = cls._for_writer(writer, high_water)
        if outbox is not None and send_buffer is not None:
            sock = outbox._transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        return outbox

    @classmethod
    def _for_writer(cls, writer: WriterAdapter, high_water: int) -> Outbox | None:
        # amqtt 0.12.1 private attributes: the version is pinned and tests cover this.
        if isinstance(writer, StreamWriterAdapter):
            stream = writer._writer
            transport = stream.transport
            return cls(
                transport,
                websocket=False,
                high_water=high_water,
                is_open=lambda: not writer.is_closed and not transport.is_closing(),
            )
        if isinstance(writer, WebSocketsWriter):
            connection = writer._protocol
            if connection.protocol.extensions:
                return None  # permessage-deflate: every connection's frames differ
            transport = connection.transport
            return cls(
                transport,
                websocket=True,
                high_water=high_water,
                is_open=lambda: connection.protocol.state is State.OPEN,
            )
        return None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(self, topic: str, data: bytes) -> bool:
        """Write now, or keep as the latest for ``topic``; True if an older message was superseded."""
        if not self._is_open():
            return False
        if self._transport.get_write_buffer_size() > self._high_water:
            superseded = topic in self._pending
            self._pending[topic] = data
            return superseded
        if self._pending:
            self.flush()
        self._transport.write(data)
        return False

    def flush(self) -> None:
        """Write what was held back, once the client has caught up."""
        if not self._pending or not self._is_open():
            return
        if self._transport.get_write_buffer_size() > self._high_water:
            return
        pending, self._pending = self._pending, {}
        self._transport.write(b"".join(pending.values()))
