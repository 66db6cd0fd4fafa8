"""Direct delivery: pre-encoded bytes batched per connection and written with one ``write``.

amqtt delivers each message to each subscriber in its own task, encoding it again every
time and writing it with its own ``send()``. Here the delivery pipeline
(bridge/core/delivery.py) encodes a PUBLISH (and, for WebSocket, its frame) once per group;
each connection's :class:`Outbox` appends it to a batch, and the :class:`Batcher` writes
every touched connection once per ``broker.flush_interval_ms`` (market data), or at the
end of the event-loop step for what a client waits on (acknowledgements, QoS 1/2
deliveries, snapshots, user messages). A compressed WebSocket's outbox takes bare packets
and frames each write itself.

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
import logging
import socket
from collections import Counter
from collections.abc import Callable

from amqtt.adapters import WriterAdapter
from amqtt.session import OutgoingApplicationMessage, Session

from bridge.core.delivery import AckedPublish
from bridge.core.ratelimit import TopicGate
from bridge.core.wire import ws_binary_frame
from bridge.edge.streams import StreamConnection
from bridge.edge.ws_connection import WsConnection
from bridge.logs import CLIENT, clip

__all__ = ["Batcher", "Outbox"]

log = logging.getLogger(__name__)

# Packet ids are 16-bit: a client this far behind on acknowledgements is not reading.
_MAX_INFLIGHT_IDS = 65_000


# Marks a message as sent once, so amqtt's resend after a reconnect sets DUP.
_SENT = object()


class Batcher:
    """Connections with bytes waiting, written once per event-loop step, or once per
    ``interval_s`` when set: at a few ticks a second per subscriber, one ``send()`` per
    window instead of one per tick, for at most ``interval_s`` of added latency."""

    __slots__ = ("_dirty", "_interval", "_loop", "_scheduled", "_urgent", "backlogged")

    def __init__(self, interval_s: float = 0.0) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._urgent: list[Outbox] = []  # written at the end of this loop step whatever the interval
        self._interval = interval_s
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
            if self._interval:
                self.loop().call_later(self._interval, self.flush)
            else:
                self.loop().call_soon(self.flush)

    def soon(self, outbox: Outbox) -> None:
        """Write ``outbox`` at the end of this loop step, not after the interval: it holds
        what its client waits on (an acknowledgement, a snapshot, a user message)."""
        if not self._interval:
            return  # every batch goes at the end of the step anyway
        if not self._urgent:
            self.loop().call_soon(self._flush_urgent)
        self._urgent.append(outbox)

    def _flush_urgent(self) -> None:
        urgent, self._urgent = self._urgent, []
        for outbox in urgent:
            outbox.flush()

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
        "_hurried",
        "_is_open",
        "_over",
        "_pending",
        "_queued",
        "_send",
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
        send: Callable[[bytes], None] | None = None,
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
        self._hurried = False  # this batch goes at the end of the loop step, not the interval
        self._queued = 0  # the transport's buffer when this batch began
        self._pending: dict[str, bytes | AckedPublish] = {}
        # Writes bytes that still need framing (a compressed WebSocket); None: the transport's.
        self._send = send
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
        """An outbox for amqtt's writer (None: a writer of a kind we do not know)."""
        found = cls._transport_of(writer)
        send = None
        if found is None:
            found, send = _deflating(writer)
            if found is None:
                return None
        transport, websocket, is_open = found
        if send_buffer is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        return cls(
            transport,
            websocket=websocket,
            high_water=high_water,
            is_open=is_open,
            send=send,
            **kwargs,  # type: ignore[arg-type]
        )

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

    def push_acked(self, publish: AckedPublish) -> None:
        """A QoS 1/2 market message: sent with the next packet id, held while the client lags."""
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
        self._send_acked(session, publish)

    def push_message(self, item: bytes | AckedPublish) -> None:
        """A message that is never conflated (user messages, wills, retained snapshots).

        A client so far behind that even these pile up past :attr:`swamped` is not reading:
        its connection is closed (a persistent session keeps QoS 1/2 ones in flight and gets
        them again, with DUP, when it comes back).
        """
        if self.closed:
            return
        if isinstance(item, AckedPublish):
            session = self.session
            if session is None or len(session.inflight_out) >= _MAX_INFLIGHT_IDS:
                self._give_up("acknowledgements")
                return
            self._send_acked(session, item)
        else:
            self._queue(item)
        self._hurry()  # not market data: no reason to wait for the flush interval
        if self.swamped:
            self._give_up("bytes")

    def _give_up(self, behind_on: str) -> None:
        client_id = self.session.client_id if self.session is not None else None
        log.info("client %s too far behind on %s: closing", clip(client_id), behind_on, extra=CLIENT)
        self.abort()

    def push_control(self, packet: bytes) -> None:
        """A protocol packet (PUBACK): never conflated, written with this step's batch."""
        if self.closed:
            return
        self._queue(ws_binary_frame(packet) if self.websocket else packet)
        self._hurry()

    def _send_acked(self, session: Session, publish: AckedPublish) -> None:
        packet_id = session.next_packet_id
        message = OutgoingApplicationMessage(
            packet_id, publish.topic, publish.qos, publish.payload, publish.retain
        )
        message.publish_packet = _SENT  # type: ignore[assignment]
        session.inflight_out[packet_id] = message
        batch = self._batch
        batch.append(publish.head)
        batch.append(packet_id.to_bytes(2, "big"))
        batch.append(publish.tail)
        if not self._batched:
            self._batcher.touch(self)
        self._batched += publish.size
        # Acknowledged deliveries are paced by the client's acks: holding them back for the
        # flush interval only holds back the acks (and measurably costs CPU in the QoS 1 bench).
        self._hurry()

    def _hurry(self) -> None:
        if not self._hurried:
            self._hurried = True
            self._batcher.soon(self)

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

    def _hold(self, topic: str, item: bytes | AckedPublish, *, backlog: bool = True) -> None:
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
            size = item.size if isinstance(item, AckedPublish) else len(item)
            if not self._fits(size):
                continue  # sent by resume() once the client catches up
            if isinstance(item, AckedPublish):
                session = self.session
                if session is None or len(session.inflight_out) >= self.max_inflight:
                    self._batcher.backlogged.add(self)
                    continue
                del self._pending[topic]
                self._send_acked(session, item)
            else:
                del self._pending[topic]
                self._queue(item)
        self._arm(loop)

    # ------------------------------------------------------------------ writing

    def flush(self) -> None:
        self._hurried = False
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batched = 0
        if self.closed or not self._is_open():
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        if self._send is None:
            self._transport.write(data)
        else:
            self._send(data)
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
            qos1 = isinstance(item, AckedPublish)
            if qos1 and (session is None or len(session.inflight_out) >= self.max_inflight):
                return  # the next PUBACK calls acked()
            size = item.size if isinstance(item, AckedPublish) else len(item)
            if not self._fits(size):
                return  # still behind: the next backlog pass tries again
            if gate is not None and not self._gate_admits(topic):
                continue  # the gate's timer sends it
            del pending[topic]
            if isinstance(item, AckedPublish):
                assert session is not None
                self._send_acked(session, item)
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


def _deflating(
    writer: WriterAdapter,
) -> tuple[tuple[asyncio.WriteTransport, bool, Callable[[], bool]] | None, Callable[[bytes], None] | None]:
    """A WebSocket with permessage-deflate: every connection's frames differ (its own deflate
    context), so it takes bare packets and the connection frames each write itself
    (:meth:`WsConnection.write` through websockets' protocol), synchronously."""
    if not (isinstance(writer, WsConnection) and writer.compressed):
        return None, None
    return (writer.transport, False, writer.is_open), writer.write
