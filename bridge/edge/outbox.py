"""Direct delivery: pre-encoded bytes batched per connection and written with one ``write``.

amqtt delivers each message to each subscriber in its own task, encoding it again every
time and writing it with its own ``send()``. Here the broker encodes a PUBLISH (and, for
WebSocket, its frame) once per payload variant; each connection's :class:`Outbox` appends
it to a batch, and the :class:`Batcher` writes every touched connection once, after the
event-loop step that produced the batch (a publisher's whole read chunk, say).

Slow consumers: once a connection's transport buffer holds more than ``high_water`` bytes,
new market messages are conflated: the latest per topic is kept, older ones are superseded
and counted, and the held ones go out when the buffer has drained. QoS 1 deliveries are
conflated the same way when the connection has ``max_inflight`` unacknowledged. Memory per
connection is bounded by ``high_water`` plus one message per topic, and a stalled phone
never slows the others. Frames are written whole, so they interleave safely with amqtt's
own writes (SUBACK, retained messages, user messages).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable

from amqtt.adapters import WriterAdapter
from amqtt.mqtt.constants import QOS_1
from amqtt.session import OutgoingApplicationMessage, Session

from bridge.core.ratelimit import TopicGate
from bridge.core.wire import ws_binary_frame
from bridge.edge.streams import StreamConnection
from bridge.edge.ws_connection import WsConnection

__all__ = ["Batcher", "Outbox", "Qos1Publish"]


class Qos1Publish:
    """A QoS 1 PUBLISH encoded once: ``head + packet id + tail`` is one connection's copy."""

    __slots__ = ("head", "payload", "size", "tail", "topic")

    def __init__(self, topic: str, head: bytes, tail: bytes, payload: bytes) -> None:
        self.topic = topic
        self.head = head
        self.tail = tail
        self.payload = payload  # kept for a resend after reconnecting (amqtt rebuilds it)
        self.size = len(head) + 2 + len(tail)  # bytes on the wire


# Marks a message as sent once, so amqtt's resend after a reconnect sets DUP.
_SENT = object()


class Batcher:
    """Connections with bytes waiting, written once per event-loop step."""

    __slots__ = ("_dirty", "_loop", "_scheduled", "backlogged")

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.backlogged: set[Outbox] = set()

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def touch(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self.loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()

    def drain_backlog(self) -> None:
        """Write what slow connections held back, for those whose buffers have drained."""
        for outbox in list(self.backlogged):
            outbox.resume()


class Outbox:
    __slots__ = (
        "_batch",
        "_batched",
        "_batcher",
        "_conflated",
        "_high_water",
        "_is_open",
        "_over",
        "_pending",
        "_queued",
        "_timer",
        "_transport",
        "closed",
        "gate",
        "max_inflight",
        "session",
        "websocket",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        *,
        websocket: bool,
        high_water: int,
        is_open: Callable[[], bool],
        batcher: Batcher | None = None,
        conflated: Counter[str] | None = None,
        session: Session | None = None,
        max_inflight: int = 1000,
        gate: TopicGate | None = None,
    ) -> None:
        self.websocket = websocket
        self.session = session
        self.max_inflight = max_inflight
        self.closed = False
        self._transport = transport
        self._high_water = high_water
        self._is_open = is_open
        self._batcher = batcher or Batcher()
        self._conflated = conflated if conflated is not None else Counter()
        self._batch: list[bytes] = []
        self._batched = 0  # bytes in _batch
        self._over = False  # conflating until the transport buffer drains to half
        self._queued = 0  # the transport's buffer when this batch began
        self._pending: dict[str, bytes | Qos1Publish] = {}
        # Per-topic update cap for this subscriber (None: every update); held topics are
        # released by one timer.
        self.gate = gate
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_writer(
        cls,
        writer: WriterAdapter,
        high_water: int,
        send_buffer: int | None = None,
        **kwargs: object,
    ) -> Outbox | None:
        """An outbox for amqtt's writer, or None where bytes cannot be shared (compression)."""
        found = cls._transport_of(writer)
        if found is None:
            return None
        transport, websocket, is_open = found
        if send_buffer is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        return cls(transport, websocket=websocket, high_water=high_water, is_open=is_open, **kwargs)  # type: ignore[arg-type]

    @staticmethod
    def _transport_of(
        writer: WriterAdapter,
    ) -> tuple[asyncio.WriteTransport, bool, Callable[[], bool]] | None:
        """The socket under a connection, whether frames must be WebSocket ones, and a test
        that it is still open; None for a writer that cannot take pre-encoded bytes."""
        if isinstance(writer, WsConnection):
            if writer.compressed:
                return None  # permessage-deflate: every connection's frames differ
            return writer.transport, True, writer.is_open
        if isinstance(writer, StreamConnection):
            return writer.transport, False, writer.is_open
        return None

    @property
    def swamped(self) -> bool:
        """More unread than market data alone can leave (it stops at ``high_water``): the
        client sends packets whose answers it does not read."""
        return self._transport.get_write_buffer_size() + self._batched > 4 * self._high_water + (1 << 20)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def inflight(self) -> int:
        return len(self.session.inflight_out) if self.session is not None else 0

    # ------------------------------------------------------------------ queueing

    def push(self, topic: str, data: bytes) -> None:
        """A QoS 0 message (final bytes): batched now, or held as the latest for ``topic``."""
        if self.closed:
            return
        if topic in self._pending or not self._fits(len(data)):
            # Behind: keep only the latest per topic (and never send around a held one,
            # or an older tick would follow a newer one).
            self._hold(topic, data)
            return
        if self.gate is not None and not self._gate_admits(topic):
            self._hold(topic, data, backlog=False)
            return
        self._queue(data)

    def push_qos1(self, publish: Qos1Publish) -> None:
        """A QoS 1 market message: sent with the next packet id, held while the client lags."""
        if self.closed:
            return
        session = self.session
        if (
            session is None
            or publish.topic in self._pending
            or len(session.inflight_out) >= self.max_inflight
            or not self._fits(publish.size)
        ):
            self._hold(publish.topic, publish)
            return
        if self.gate is not None and not self._gate_admits(publish.topic):
            self._hold(publish.topic, publish, backlog=False)
            return
        self._send_qos1(session, publish)

    def push_control(self, packet: bytes) -> None:
        """A protocol packet (PUBACK): never conflated, written with this step's batch."""
        if self.closed:
            return
        self._queue(ws_binary_frame(packet) if self.websocket else packet)

    def _send_qos1(self, session: Session, publish: Qos1Publish) -> None:
        packet_id = session.next_packet_id
        message = OutgoingApplicationMessage(packet_id, publish.topic, QOS_1, publish.payload, False)
        message.publish_packet = _SENT  # type: ignore[assignment]
        session.inflight_out[packet_id] = message
        batch = self._batch
        batch.append(publish.head)
        batch.append(packet_id.to_bytes(2, "big"))
        batch.append(publish.tail)
        if not self._batched:
            self._batcher.touch(self)
        self._batched += publish.size

    def _fits(self, size: int) -> bool:
        """Room for ``size`` more bytes: transport buffer plus this batch stay within high_water."""
        if self._over:
            return False
        if not self._batched:
            self._queued = self._transport.get_write_buffer_size()
        if self._queued + self._batched + size > self._high_water:
            self._over = True
            self._batcher.backlogged.add(self)
            return False
        return True

    def _hold(self, topic: str, item: bytes | Qos1Publish, *, backlog: bool = True) -> None:
        if topic in self._pending:
            self._conflated["conflated"] += 1
        self._pending[topic] = item
        if backlog:
            self._batcher.backlogged.add(self)

    # ------------------------------------------------------------------ rate limit

    def _gate_admits(self, topic: str) -> bool:
        assert self.gate is not None
        loop = self._batcher.loop()
        if self.gate.admit(topic, loop.time()):
            return True
        self._arm(loop)
        return False

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.gate is not None
        due = self.gate.next_due()
        if due is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timer = loop.call_at(due, self._release, due)

    def _release(self, when: float) -> None:
        """The gate's timer: send the latest held message of each topic now due."""
        self._timer = None
        if self.closed or self.gate is None:
            return
        loop = self._batcher.loop()
        for topic in self.gate.release(max(loop.time(), when)):
            item = self._pending.get(topic)
            if item is None:
                continue
            size = item.size if isinstance(item, Qos1Publish) else len(item)
            if not self._fits(size):
                continue  # sent by resume() once the client catches up
            if isinstance(item, Qos1Publish):
                session = self.session
                if session is None or len(session.inflight_out) >= self.max_inflight:
                    self._batcher.backlogged.add(self)
                    continue
                del self._pending[topic]
                self._send_qos1(session, item)
            else:
                del self._pending[topic]
                self._queue(item)
        self._arm(loop)

    # ------------------------------------------------------------------ writing

    def flush(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batched = 0
        if self.closed or not self._is_open():
            return
        self._transport.write(batch[0] if len(batch) == 1 else b"".join(batch))
        if self._transport.get_write_buffer_size() > self._high_water:
            self._over = True
            self._batcher.backlogged.add(self)

    def acked(self) -> None:
        """A PUBACK freed an inflight slot: held QoS 1 messages may go."""
        if self._pending and not self._over:
            self.resume()

    def resume(self) -> None:
        """Send held messages once the client has caught up (buffer at or below half)."""
        if self.closed or not self._is_open():
            self._batcher.backlogged.discard(self)
            self._pending.clear()
            return
        if self._over:
            if self._transport.get_write_buffer_size() > self._high_water // 2:
                return
            self._over = False
        pending = self._pending
        session = self.session
        gate = self.gate
        for topic, item in list(pending.items()):
            qos1 = isinstance(item, Qos1Publish)
            if qos1 and (session is None or len(session.inflight_out) >= self.max_inflight):
                return  # the next PUBACK calls acked()
            size = item.size if isinstance(item, Qos1Publish) else len(item)
            if not self._fits(size):
                return  # still behind: the next backlog pass tries again
            if gate is not None and not self._gate_admits(topic):
                continue  # the gate's timer sends it
            del pending[topic]
            if isinstance(item, Qos1Publish):
                assert session is not None
                self._send_qos1(session, item)
            else:
                self._queue(item)
        self._batcher.backlogged.discard(self)

    def _queue(self, data: bytes) -> None:
        self._batch.append(data)
        if not self._batched:
            self._batcher.touch(self)
        self._batched += len(data)

    def abort(self) -> None:
        """Close the connection now, discarding what the client has not read."""
        self.close()
        self._transport.abort()

    def close(self) -> None:
        """The connection is gone: drop what is batched or held (market data is conflatable)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._batch = []
        self._batched = 0
        self._pending.clear()
        self._batcher.backlogged.discard(self)
