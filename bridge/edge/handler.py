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
lets the broker end a connection (token expiry, takeover).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
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
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from amqtt.session import (
    INCOMING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)
from websockets.exceptions import ConnectionClosed

from bridge.config import RateLimitConfig
from bridge.core.framing import PUBACK, PUBLISH, PacketSplitter, check_header, parse_publish, puback
from bridge.core.ratelimit import PublishBucket, publisher_bucket
from bridge.core.topics import MARKET_PREFIX, USER_PREFIX
from bridge.edge.lean import TIMER_CONTEXT, LeanEvent, LeanQueue
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


class MarketProtocolHandler(BrokerProtocolHandler):
    """amqtt's handler with an owned read path, keep-alive, and a way for the broker to end it."""

    # Slots, not instance-dict entries: amqtt's handler already has ~20 attributes, and the
    # broker setting these after __init__ made CPython give each idle connection's handler
    # a full-size dict (~650 bytes more) instead of its compact shared-key values.
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
                    entry = _Owed(publish.packet_id, None)
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

    # ------------------------------------------------------------------ outbound QoS 1 and 2
    #
    # amqtt gave up on an unacknowledged QoS 1/2 message after 5 s and forgot it when the
    # connection closed, so nothing was ever re-sent. Here a message stays in the session's
    # ``inflight_out`` until PUBACK (QoS 1) or PUBCOMP (QoS 2), however long that takes and
    # across reconnects; a resumed session gets each again first, with its original packet
    # id and DUP, or its PUBREL if PUBREC had come ([MQTT-4.4.0-1], [MQTT-3.3.1-1]).
    # Acknowledgements settle the state in ``inflight_out`` whether or not a task waits.

    def _settle_puback(self, packet_id: int) -> None:
        session = self.session
        message = session.inflight_out.pop(packet_id, None) if session is not None else None
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(PubackPacket.build(packet_id))  # the sending task takes it on
        elif message is not None:
            self._acknowledged(message)  # re-sent after a reconnect: no task waits for it
        else:
            log.debug("PUBACK for unknown packet id %d", packet_id)
            return
        if self.outbox is not None:
            self.outbox.acked()

    def _settle_pubrec(self, packet_id: int) -> bytes | None:
        """Record a PUBREC; the PUBREL to send now, unless the waiting task sends it."""
        session = self.session
        message = session.inflight_out.get(packet_id) if session is not None else None
        if message is None or message.qos != QOS_2:
            return _pubrel(packet_id)  # [MQTT-4.3.3]: all the same, so the client can finish
        message.pubrec_packet = PubrecPacket.build(packet_id)
        waiter = self._pubrec_waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.pubrec_packet)
            return None
        return _pubrel(packet_id)  # a resent message: no task waits for it

    def _settle_pubcomp(self, packet_id: int) -> None:
        session = self.session
        message = session.inflight_out.pop(packet_id, None) if session is not None else None
        waiter = self._pubcomp_waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(PubcompPacket.build(packet_id))
        elif message is not None:
            self._acknowledged(message)
        if message is not None and self.outbox is not None:
            self.outbox.acked()  # a QoS 2 delivery's slot is free: held ones may go

    def _acknowledged(self, message: OutgoingApplicationMessage) -> None:
        if isinstance(message, StoredMessage):
            # The mailbox's replay may be about to send it again: it checks this first.
            self.settled_ids.add(message.store_id)
            if message.on_ack is not None:
                on_ack, message.on_ack = message.on_ack, None
                on_ack()

    @property
    def settled_ids(self) -> set[str]:
        """Mailbox messages acknowledged on this connection with no task waiting for them."""
        settled: set[str] | None = self.__dict__.get("_settled_ids")
        if settled is None:
            settled = self.__dict__["_settled_ids"] = set()
        return settled

    async def _send_control(self, packet: bytes) -> None:
        if self.outbox is not None:
            self.outbox.push_control(packet)
        elif self.writer is not None:
            self.writer.write(packet)
            await self.writer.drain()

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction == INCOMING:
            await self._incoming_qos1(app_message)
            return
        await self._outgoing(app_message, self._puback_waiters)

    async def _handle_qos2_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction == INCOMING:
            await super()._handle_qos2_message_flow(app_message)
            return
        if app_message.pubrec_packet is None:
            await self._outgoing(app_message, self._pubrec_waiters)
        assert app_message.packet_id is not None
        await self._send_packet(PubrelPacket.build(app_message.packet_id))
        await self._await_ack(app_message.packet_id, self._pubcomp_waiters)

    async def _outgoing(self, message: ApplicationMessage, waiters: dict[int, asyncio.Future[Any]]) -> None:
        """Send a QoS 1/2 PUBLISH and wait for its first acknowledgement, keeping it in flight."""
        session = self.session
        packet_id = message.packet_id
        if session is None or packet_id is None:
            raise ProtocolError("no_session", "outbound QoS 1/2 without a session or packet id")
        assert isinstance(message, OutgoingApplicationMessage)
        session.inflight_out[packet_id] = message
        packet = message.build_publish_packet(dup=message.publish_packet is not None)
        message.publish_packet = packet
        await self._send_packet(packet)
        await self._await_ack(packet_id, waiters)

    async def await_puback(self, packet_id: int) -> None:
        """Until the PUBACK of a message already in flight (one re-sent after a reconnect)."""
        await self._await_ack(packet_id, self._puback_waiters)

    async def _await_ack(self, packet_id: int, waiters: dict[int, asyncio.Future[Any]]) -> None:
        # No timeout: 3.1.1 re-sends only on reconnect. A closed connection cancels the
        # waiter (amqtt's stop); the message stays in flight for the session's next one.
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[packet_id] = waiter
        try:
            await waiter
        finally:
            if waiters.get(packet_id) is waiter:
                del waiters[packet_id]

    async def _retry_deliveries(self) -> None:
        """[MQTT-4.4.0-1]: every message still in flight, in order, before anything new:
        a PUBLISH with its original packet id and DUP, or the PUBREL of one already received.

        Written into this connection's batch synchronously, so no tick fanned out afterwards
        can overtake them; acknowledgements settle them in ``_dispatch``.
        """
        session = self.session
        if session is None:
            return
        packets = []
        for packet_id, message in list(session.inflight_out.items()):
            if message.qos == QOS_2 and message.pubrec_packet is not None:
                packets.append(_pubrel(packet_id))
            else:
                message.publish_packet = message.build_publish_packet(dup=True)
                packets.append(bytes(message.publish_packet.to_bytes()))
        if packets:
            await self._send_control(b"".join(packets))

    # ------------------------------------------------------------------ keep-alive

    # One timer per connection for both of its deadlines, keep-alive and token expiry (two
    # TimerHandles, each with its own copied Context, cost an idle connection ~300 bytes).

    def expire_at(self, deadline: float) -> None:
        """End the connection as ``token_expired`` (no will) at ``deadline`` (loop time)."""
        self._expires_at = deadline
        self._rearm()

    def _arm_watchdog(self) -> None:
        keepalive = self.session.keep_alive if self.session is not None else 0
        if keepalive and keepalive > 0:
            self._keepalive = float(keepalive)
            self._last_read = self._loop.time()
            self._rearm()

    def _rearm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        due = self._expires_at
        if self._keepalive:
            keepalive_due = self._last_read + self._keepalive
            due = keepalive_due if due is None else min(due, keepalive_due)
        self._watchdog = None if due is None else self._loop.call_at(due, self._check, context=TIMER_CONTEXT)

    def _check(self) -> None:
        self._watchdog = None
        now = self._loop.time()
        if self._expires_at is not None and now >= self._expires_at:
            self._expires_at = None
            if self.session is not None:
                self.session.will_flag = False  # the client did nothing wrong on the network
            self.end("token_expired")
        elif self._keepalive and now - self._last_read >= self._keepalive:
            self.handle_read_timeout()
        else:
            self._rearm()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._expires_at = None
        self._keepalive = 0.0

    # ------------------------------------------------------------------ inbound QoS 1
    #
    # Every inbound QoS 1 PUBLISH owes a PUBACK, and PUBACKs leave in the order the
    # PUBLISHes came ([MQTT-4.6.0-2]) whichever path decided them: ``_owed`` holds them in
    # arrival order and releases the decided ones at its head. A PUBACK is only written once
    # the message is stored or delivered, so a publisher that disconnects never loses an
    # acknowledged message (amqtt acknowledged on queueing). A failed hand-off (store down)
    # gets no PUBACK and ends the connection: the publisher's library sends it again.

    def _owe(self, packet_id: int, accepted: bool | None) -> _Owed:
        entry = _Owed(packet_id, accepted)
        self._append_owed(entry)
        return entry

    def _append_owed(self, entry: _Owed) -> None:
        owed = self.__dict__.get("_owed_acks")
        if owed is None:
            owed = self.__dict__["_owed_acks"] = deque()
        owed.append(entry)

    @property
    def _owed(self) -> deque[_Owed] | None:
        """Inbound QoS 1 PUBLISHes not yet acknowledged, oldest first (None: never any)."""
        owed: deque[_Owed] | None = self.__dict__.get("_owed_acks")
        return owed

    def _settle_owed(self, entry: _Owed, accepted: bool) -> None:
        """Decided; the PUBACKs now due go out once per event-loop step, in one write."""
        entry.accepted = accepted
        if not self._release_due:
            self._release_due = True
            self._loop.call_soon(self._release_owed)

    def _release_owed(self) -> None:
        """Write the PUBACKs now due (with this step's batch); a refused hand-off ends the connection."""
        self._release_due = False
        owed = self._owed
        if not owed:
            return
        due: list[int] = []
        refused = False
        while owed and owed[0].accepted is not None:
            entry = owed.popleft()
            if entry.accepted:
                due.append(entry.packet_id)
            else:
                refused = True
        if due:
            self._push_acks(due)
        if refused:
            self.end("handoff_failed")

    async def _incoming_qos1(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        """amqtt's inbound QoS 1 (topics other than ``market/`` and ``user/``): queued for the
        broker's client loop, acknowledged on its :meth:`hand_off`, not on queueing."""
        if app_message.packet_id is None or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        entry = self._owed_amqtt(app_message.packet_id, claimed=False)
        if entry is None:  # read by amqtt's own reader: owed from now
            entry = self._owe(app_message.packet_id, None)
            entry.via_amqtt = True
        entry.claimed = True
        await self.session.delivered_message_queue.put(app_message)

    def hand_off(self, message: ApplicationMessage, accepted: bool) -> None:
        """The broker is done with an inbound message that came through amqtt's flow."""
        if message.qos != QOS_1 or message.packet_id is None:
            return
        entry = self._owed_amqtt(message.packet_id, claimed=True)
        if entry is not None:
            self._settle_owed(entry, accepted)

    def _owed_amqtt(self, packet_id: int, *, claimed: bool) -> _Owed | None:
        """The oldest undecided entry of amqtt's flow for ``packet_id`` (few: its window)."""
        for entry in self._owed or ():
            if (
                entry.via_amqtt
                and entry.claimed is claimed
                and entry.accepted is None
                and entry.packet_id == packet_id
            ):
                return entry
        return None

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


def _pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


def _ignore(_stored: bool) -> None:
    """QoS 0: nothing is owed to the publisher."""


class _Owed:
    """One inbound QoS 1 PUBLISH's PUBACK: ``accepted`` None until decided."""

    __slots__ = ("accepted", "claimed", "packet_id", "via_amqtt")

    def __init__(self, packet_id: int, accepted: bool | None) -> None:
        self.packet_id = packet_id
        self.accepted = accepted
        self.via_amqtt = False  # decided by the broker's hand_off after amqtt's flow
        self.claimed = False  # amqtt's flow has queued it (so hand_off may decide it)


class StoredMessage(OutgoingApplicationMessage):
    """An outbound message from the user mailbox: ``on_ack`` removes it from the store."""

    __slots__ = ("on_ack", "store_id")

    def __init__(self, *args: Any, store_id: str, on_ack: Callable[[], None] | None = None) -> None:
        super().__init__(*args)
        self.store_id = store_id
        self.on_ack = on_ack


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
