"""Outbound QoS 1 and 2 of one connection: in flight until acknowledged, re-sent on resume.

amqtt gave up on an unacknowledged QoS 1/2 message after 5 s and forgot it when the
connection closed, so nothing was ever re-sent. Here a message stays in the session's
``inflight_out`` until PUBACK (QoS 1) or PUBCOMP (QoS 2), however long that takes and across
reconnects; a resumed session gets each again first, with its original packet id and DUP,
or its PUBREL if PUBREC had come ([MQTT-4.4.0-1], [MQTT-3.3.1-1]). Acknowledgements settle
the state in ``inflight_out`` whether or not a task waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqtt.mqtt.constants import QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import INCOMING, ApplicationMessage, IncomingApplicationMessage, OutgoingApplicationMessage

from bridge.edge.outbox import Outbox
from bridge.errors import ProtocolError

__all__ = ["OutboundQosMixin", "StoredMessage"]

# The handler's logger, whichever part of it logs (levels and rate limits are per logger).
log = logging.getLogger("bridge.edge.handler")


class OutboundQosMixin(BrokerProtocolHandler):
    """The handler's outbound QoS 1/2 flows and the acknowledgements that settle them."""

    __slots__ = ()  # the attributes are MarketProtocolHandler's slots

    outbox: Outbox | None

    if TYPE_CHECKING:

        async def _incoming_qos1(
            self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
        ) -> None: ...

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


def _pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


class StoredMessage(OutgoingApplicationMessage):
    """An outbound message from the user mailbox: ``on_ack`` removes it from the store."""

    __slots__ = ("on_ack", "store_id")

    def __init__(self, *args: Any, store_id: str, on_ack: Callable[[], None] | None = None) -> None:
        super().__init__(*args)
        self.store_id = store_id
        self.on_ack = on_ack
