"""One client connection's MQTT protocol handler: amqtt's, with the read path owned here.

amqtt's reader decodes one packet per event-loop iteration (reading the fixed header a
byte at a time) and starts a task for each. A feed writing hundreds of ticks per ``send()``
then costs hundreds of iterations and tasks, and nothing downstream can batch. This
handler reads whatever the socket has, splits it into packets (:mod:`bridge.core.framing`) and:

- hands market PUBLISHes (QoS 0/1) straight to the broker's ``ingest``, synchronously, so
  one chunk's ticks fan out in one step and each subscriber connection is written once;
  their PUBACKs go out after that hand-off, in one write;
- hands PUBLISHes to ``user/...`` (QoS 0/1) to ``take_user`` (the broker's mailbox group
  commit), with no task, future or queue of amqtt's per message; each PUBACK goes out once
  the commit holding its message returns;
- settles PUBACKs for the broker's direct QoS 1 deliveries without a task;
- passes every other packet to amqtt's own handlers, as amqtt would.

It also enforces keep-alive (1.5 x, then the will is published) with one timer instead of a
``wait_for`` per read, gates inbound QoS 1 on the broker's hand-off for the queued path, and
lets the broker end a connection (token expiry, takeover). Those parts are mixins in their
own modules: keepalive.py (the one timer), outbound.py (outbound QoS 1/2 in flight until
acknowledged), inbound_acks.py (PUBACKs owed, released in order).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from amqtt.adapters import ReaderAdapter
from amqtt.errors import MQTTError, ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_dict
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import CONNECT, DISCONNECT, PINGREQ, SUBSCRIBE, UNSUBSCRIBE, MQTTFixedHeader
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from amqtt.session import Session
from websockets.exceptions import ConnectionClosed

from bridge.config import RateLimitConfig
from bridge.core.framing import PUBACK, PUBLISH, PacketSplitter, check_header, parse_publish, puback
from bridge.core.ratelimit import PublishBucket, publisher_bucket
from bridge.core.topics import MARKET_PREFIX, USER_PREFIX
from bridge.edge.inbound_acks import InboundAcksMixin, Owed
from bridge.edge.keepalive import KeepAliveMixin
from bridge.edge.lean import LeanEvent, LeanQueue
from bridge.edge.outbound import OutboundQosMixin
from bridge.edge.outbox import Outbox
from bridge.edge.streams import ChunkReader
from bridge.errors import ProtocolError
from bridge.logs import CLIENT, clip

__all__ = ["Ingest", "MarketProtocolHandler", "TakeUser"]

log = logging.getLogger(__name__)

# (client session, topic, payload, qos) -> keep the connection?
Ingest = Callable[[Any, str, bytes, int], bool]
# (topic, payload, qos, settle) of a PUBLISH to ``user/...`` -> True: done, acknowledge now;
# False: a protocol violation, close; None: ``settle(stored)`` comes once the group commit
# holding it returns: acknowledged if stored, else the connection ends without a PUBACK (the
# publisher sends it again after reconnecting).
TakeUser = Callable[[str, bytes, int, Callable[[bool], None]], "bool | None"]

_DEFAULT_MAX_PACKET = 1024 * 1024

_AMQTT_LOG = logging.LoggerAdapter(logging.getLogger("amqtt.mqtt.protocol.handler"), {"client_id": None})


class MarketProtocolHandler(KeepAliveMixin, OutboundQosMixin, InboundAcksMixin, BrokerProtocolHandler):
    """amqtt's handler with an owned read path, keep-alive, and a way for the broker to end it."""

    # Slots, not instance-dict entries: amqtt's handler already has ~20 attributes, and the
    # broker setting these after __init__ made CPython give each idle connection's handler
    # a full-size dict (~650 bytes more) instead of its compact shared-key values. The
    # mixins' attributes are here too (theirs are empty: one slot layout, no conflict).
    __slots__ = (
        "_bucket",
        "_expires_at",
        "_keepalive",
        "_last_read",
        "_release_due",
        "_watchdog",
        "dropped",
        "end_reason",
        "goodbye",
        "ingest",
        "max_packet",
        "outbox",
        "protocol_errors",
        "publish_limit",
        "take_user",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.end_reason: str | None = None
        self.goodbye = False  # the client sent DISCONNECT (no will)
        self.ingest: Ingest | None = None
        self.take_user: TakeUser | None = None
        self.outbox: Outbox | None = None
        self.max_packet = _DEFAULT_MAX_PACKET
        # Inbound PUBLISH limit: the config, and the bucket made on the first PUBLISH (so
        # subscribers, which never publish, carry none). Refusals counted in ``dropped``.
        self.publish_limit: RateLimitConfig | None = None
        self.dropped: Counter[str] | None = None
        self.protocol_errors: Counter[str] | None = None
        self._bucket: PublishBucket | None = None
        self._watchdog: asyncio.TimerHandle | None = None  # keep-alive and token expiry
        self._keepalive = 0.0  # seconds without a packet that end the connection (0: none)
        self._expires_at: float | None = None  # token expiry (loop time)
        self._last_read = 0.0
        self._release_due = False  # a release of owed PUBACKs is scheduled for this step
        super().__init__(*args, **kwargs)
        # amqtt's two asyncio.Queue objects cost ~3 KB each while empty (bridge/edge/lean.py).
        self._pending_subscriptions: LeanQueue[Subscription] = LeanQueue()
        self._pending_unsubscriptions: LeanQueue[UnSubscription] = LeanQueue()
        self._reader_stopped = LeanEvent()

    async def start(self) -> None:
        # amqtt's start() makes the disconnect waiter only after the reader has started and
        # replaces a completed one: a client that closes right after CONNECT (a phone
        # switching networks) had its end reported to no one and stayed "connected" forever,
        # holding its user's connection slots. The waiter exists before the reader runs.
        if self._disconnect_waiter is None:
            self._disconnect_waiter = asyncio.get_running_loop().create_future()
        # amqtt's start() and every write of its own re-arm a timer for handle_write_timeout,
        # a no-op on the broker side: a TimerHandle and a Context per connection for nothing.
        # Keep-alive is enforced by the watchdog below, from session.keep_alive.
        self.keepalive_timeout = None
        await ProtocolHandler.start(self)
        # amqtt's start() makes two asyncio.Events (a 760-byte deque each) that live as long as
        # the connection. The reader has started: nothing waits for "ready" again. "Stopped"
        # is reached through self by stop(): a lean copy replaces it.
        self._reader_ready = None
        self._reader_stopped = _lean_event(self._reader_stopped)

    def _init_session(self, session: Session) -> None:
        super()._init_session(session)
        # amqtt gives each handler its own LoggerAdapter (and dict) only to tag its debug
        # lines with the client id; ours name the client themselves. One shared adapter.
        self.logger = _AMQTT_LOG

    def end(self, reason: str) -> None:
        """Close the connection as abnormal: the broker's client loop runs its disconnect path."""
        if self.end_reason is None:
            self.end_reason = reason
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_read_timeout(self) -> None:
        # amqtt ignores this; we treat it as a dead client (the will gets published).
        self.end("keepalive")

    # ------------------------------------------------------------------ read path

    async def _reader_loop(self) -> None:
        read = _chunk_reader(self.reader)
        if read is None or self.session is None or self._reader_ready is None:
            await super()._reader_loop()
            return
        self._reader_ready.set()
        self._arm_watchdog()
        splitter = PacketSplitter(self.max_packet)
        # Handler tasks for amqtt's packets (SUBSCRIBE, PINGREQ, ...): a list, not a deque,
        # which would cost an idle connection 760 bytes.
        running: list[asyncio.Task[None]] = []
        try:
            while True:
                data = await read()
                if not data:
                    break
                self._last_read = self._loop.time()
                packets = splitter.feed(data)
                if packets and not await self._dispatch(packets, running):
                    break
                if running:
                    running[:] = [task for task in running if not task.done()]
        except ProtocolError as exc:
            log.info("closing %s: %s", clip(self.session.client_id), clip(exc, 200), extra=CLIENT)
            if self.protocol_errors is not None:
                self.protocol_errors[exc.reason] += 1
            if self.outbox is not None:
                # Nothing owed to a client that broke the protocol: a graceful close would
                # wait, maybe forever, for it to read what is still unsent.
                self.outbox.abort()
            self.end(exc.reason)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # client input must never take the broker down
            log.warning(
                "reader of %s failed: %s", clip(self.session.client_id), clip(repr(exc), 200), extra=CLIENT
            )
        finally:
            self.stop_watchdog()
            for task in running:
                task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _dispatch(self, packets: list[tuple[int, bytes]], running: list[asyncio.Task[None]]) -> bool:
        """Handle one chunk's packets; False closes the connection."""
        session = self.session
        ingest = self.ingest
        acks: list[int] = []
        keep = True
        for first, body in packets:
            kind = first >> 4
            if kind == PUBLISH and ingest is not None:
                publish = parse_publish(first, body)
                if publish.topic.startswith(MARKET_PREFIX) and publish.qos < QOS_2:
                    # Over the feed's rate, a tick is dropped and counted, the connection
                    # kept; QoS 1 still gets its PUBACK (3.1.1 has no way to say "refused").
                    # User-addressed messages are never dropped here: they wait in the store.
                    keep = not self._admit_publish() or ingest(
                        session, publish.topic, publish.payload, publish.qos
                    )
                    if not keep:
                        break
                    if publish.packet_id is not None:
                        if self._owed:
                            self._owe(publish.packet_id, True)  # behind older ones still owed
                        else:
                            acks.append(publish.packet_id)
                    continue
                take = self.take_user
                if take is not None and publish.qos < QOS_2 and publish.topic.startswith(USER_PREFIX):
                    if acks:
                        self._push_acks(acks)  # before any wait: nothing may overtake them
                        acks = []
                    await self._pace_publish()
                    if publish.packet_id is None:
                        if take(publish.topic, publish.payload, publish.qos, _ignore) is False:
                            keep = False
                            break
                        continue
                    entry = Owed(publish.packet_id, None)
                    verdict = take(
                        publish.topic, publish.payload, publish.qos, partial(self._settle_owed, entry)
                    )
                    if verdict is False:
                        keep = False
                        break
                    if verdict and entry.accepted is None:
                        entry.accepted = True
                    owed = self._owed
                    if entry.accepted and not owed:
                        acks.append(entry.packet_id)
                    else:
                        self._append_owed(entry)
                    continue
                if publish.qos == QOS_1:
                    # amqtt's flow: its PUBACK waits for the broker's hand_off, in this order.
                    self._owe(publish.packet_id or 0, None).via_amqtt = True
            elif kind == PINGREQ:
                check_header(first, len(body))
                await self._pong()
                continue
            elif kind in (0, 15):
                raise ProtocolError("reserved_packet", f"reserved packet type {kind}")
            elif kind == CONNECT:
                raise ProtocolError("second_connect", "CONNECT on a connected session")  # [MQTT-3.1.0-2]
            else:
                check_header(first, len(body))
                if kind == PUBACK:
                    self._settle_puback((body[0] << 8) | body[1])
                    continue
                if kind == _PUBREC:
                    pubrel = self._settle_pubrec((body[0] << 8) | body[1])
                    if pubrel is not None:
                        await self._send_control(pubrel)
                    continue
                if kind == _PUBCOMP:
                    self._settle_pubcomp((body[0] << 8) | body[1])
                    continue
            if kind == PUBLISH:
                # Every PUBLISH counts against the connection's rate; past it, reading waits
                # (messages for users are never dropped, the client is slowed instead).
                if acks:
                    self._push_acks(acks)
                    acks = []
                await self._pace_publish()
            task = await self._amqtt_packet(kind, first, body)
            if task is not None:
                running.append(task)
            if kind == DISCONNECT:
                break
        if acks:
            self._push_acks(acks)
        return keep

    def _push_acks(self, packet_ids: list[int]) -> None:
        """PUBACKs, with this step's batch (one write)."""
        packets = puback(packet_ids)
        if self.outbox is not None:
            self.outbox.push_control(packets)
        elif self.writer is not None:
            self.writer.write(packets)  # bounded by the publisher's window of unacknowledged

    async def _amqtt_packet(self, kind: int, first: int, body: bytes) -> asyncio.Task[None] | None:
        """Decode with amqtt's packet classes and start the handler amqtt would."""
        fixed = MQTTFixedHeader(kind, first & 0x0F, len(body))
        try:
            packet = await packet_dict[kind].from_stream(_BodyReader(body), fixed_header=fixed)
        except (MQTTError, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise ProtocolError("malformed_packet", f"packet type {kind}: {exc}") from None
        # [MQTT-3.8.3-3], [MQTT-3.10.3-2]: at least one filter; [MQTT-3-8.3-4]: QoS 0..2.
        if isinstance(packet, SubscribePacket):
            requested = packet.payload.topics if packet.payload is not None else []
            if not requested or any(qos not in (0, 1, 2) for _, qos in requested):
                raise ProtocolError("malformed_packet", "SUBSCRIBE without filters or asking for QoS 3")
            _check_filters(packet.variable_header, [f for f, _ in requested])
        elif isinstance(packet, UnsubscribePacket):
            if not (packet.payload and packet.payload.topics):
                raise ProtocolError("malformed_packet", "UNSUBSCRIBE without filters")
            _check_filters(packet.variable_header, packet.payload.topics)
        await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
        name = _HANDLERS.get(kind)
        if name is None:
            return None
        handle: Callable[[Any], Coroutine[Any, Any, None]] = getattr(self, name)
        task = asyncio.create_task(handle(packet))
        task.add_done_callback(_settled_quietly)
        return task

    def _publish_bucket(self) -> PublishBucket | None:
        bucket = self._bucket
        if bucket is None and self.publish_limit is not None:
            bucket = self._bucket = publisher_bucket(self.publish_limit)
            self.publish_limit = None
        return bucket

    def _admit_publish(self) -> bool:
        bucket = self._publish_bucket()
        if bucket is None or bucket.admit(self._loop.time()):
            return True
        if self.dropped is not None:
            self.dropped["rate_limited"] += 1
        return False

    async def _pace_publish(self) -> None:
        bucket = self._publish_bucket()
        if bucket is None:
            return
        while not bucket.admit(self._loop.time()):
            if self.dropped is not None:
                self.dropped["rate_paced"] += 1
            await asyncio.sleep(bucket.wait_s(self._loop.time()))

    async def _pong(self) -> None:
        """PINGRESP, written with this step's batch. A client that sends pings and never
        reads the answers is closed once its unread bytes pass the outbox's bound."""
        outbox = self.outbox
        if outbox is None:
            await self._send_packet(PingRespPacket.build())  # waits for the client to read
            return
        outbox.push_control(_PINGRESP)
        if outbox.swamped:
            raise ProtocolError("control_flood", "PINGREQs faster than the client reads the answers")

    async def stop(self) -> None:
        if self._owed:
            self._owed.clear()  # not acknowledged: the publisher sends them again
        if self._watchdog is not None:
            self._watchdog.cancel()
        reader = self._reader_task
        if reader is not None and reader is not asyncio.current_task():
            # Python 3.11's wait_for can swallow a cancel that races a finished read; amqtt's
            # stop() then waits for the reader forever (seen at shutdown). Cancel until it ends.
            while not reader.done() and not self._reader_stopped.is_set():
                reader.cancel()
                await asyncio.wait({reader}, timeout=0.5)
        await super().stop()


# amqtt's handler for each packet type (those only a server sends just get logged by it).
_HANDLERS = {
    2: "handle_connack",
    PUBLISH: "handle_publish",
    PUBACK: "handle_puback",
    5: "handle_pubrec",
    6: "handle_pubrel",
    7: "handle_pubcomp",
    SUBSCRIBE: "handle_subscribe",
    9: "handle_suback",
    UNSUBSCRIBE: "handle_unsubscribe",
    11: "handle_unsuback",
    PINGREQ: "handle_pingreq",
    13: "handle_pingresp",
    DISCONNECT: "handle_disconnect",
}


def _settled_quietly(task: asyncio.Task[None]) -> None:
    """amqtt's packet handlers end with an error when their connection goes mid-packet
    ("Packet handling was cancelled"): the client's doing, not ours, so it is noted at debug
    level instead of asyncio's "Task exception was never retrieved" with a traceback."""
    if task.cancelled() or (exc := task.exception()) is None:
        return
    if isinstance(exc, ProtocolHandlerError | ConnectionError | ConnectionClosed):
        log.debug("packet handler ended with its connection: %r", exc)
    else:
        log.error("packet handler failed", exc_info=exc)  # our bug (or amqtt's)


_PINGRESP = b"\xd0\x00"
_PUBREC, _PUBCOMP = 5, 7


def _ignore(_stored: bool) -> None:
    """QoS 0: nothing is owed to the publisher."""


def _check_filters(header: Any, filters: list[str]) -> None:
    """[MQTT-2.3.1-1]: a non-zero packet id; [MQTT-1.5.3-2]: no U+0000 (amqtt accepted both)."""
    if header is None or not header.packet_id:
        raise ProtocolError("malformed_packet", "packet id 0")
    if any("\x00" in topic_filter for topic_filter in filters):
        raise ProtocolError("bad_utf8", "topic filter contains U+0000")


def _lean_event(event: asyncio.Event) -> asyncio.Event:
    """``event`` as a LeanEvent in the same state; kept as it is if something waits on it."""
    if event._waiters:
        return event
    lean = LeanEvent()
    if event.is_set():
        lean.set()
    return lean


class _BodyReader(ReaderAdapter):
    """A packet body already read, served to amqtt's ``from_stream`` decoders."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._body) if n < 0 else min(start + n, len(self._body))
        self._pos = end
        return self._body[start:end]

    def feed_eof(self) -> None:
        pass


def _chunk_reader(reader: ReaderAdapter | None) -> Callable[[], Awaitable[bytes]] | None:
    """Whatever the connection has, as one bytes chunk (b"" at the end); None if unknown."""
    return reader.read_chunk if isinstance(reader, ChunkReader) else None
