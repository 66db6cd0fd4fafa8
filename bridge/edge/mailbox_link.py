"""The mailbox's view of one connection (:class:`bridge.core.mailbox.MailboxLink`) over our
amqtt protocol handler: stored messages go out as :class:`~bridge.edge.handler.StoredMessage`
with a packet id derived from their store id, and their PUBACKs settle them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from amqtt.mqtt.constants import QOS_0, QOS_2

from bridge.core import wire
from bridge.core.mailbox import mailbox_packet_id
from bridge.core.store import OfflineMessage
from bridge.core.wire import publish_qos0
from bridge.edge.handler import MarketProtocolHandler
from bridge.edge.outbound import StoredMessage
from bridge.errors import ProtocolError

__all__ = ["HandlerLink"]


class HandlerLink:
    """A :class:`~bridge.core.mailbox.MailboxLink` for one live mailbox connection.

    ``qos_for(topic)`` is the best QoS the session's subscriptions grant for a topic and
    ``payload_for(topic, payload)`` the payload in the session's time zone: the broker's.
    """

    __slots__ = ("_handler", "_payload_for", "_qos_for", "_resent", "client_id")

    def __init__(
        self,
        handler: MarketProtocolHandler,
        client_id: str,
        *,
        qos_for: Callable[[str], int],
        payload_for: Callable[[str, bytes], bytes],
    ) -> None:
        self._handler = handler
        self.client_id = client_id
        self._qos_for = qos_for
        self._payload_for = payload_for
        self._resent: dict[str, int] | None = None

    def acknowledged(self, store_id: str) -> bool:
        return store_id in self._handler.settled_ids

    def in_flight(self, store_id: str) -> int | None:
        session = self._handler.session
        if session is None:
            return None
        if self._resent is None:
            # Stored messages in flight when this replay began (resent at reconnect, or sent
            # by an earlier replay of this connection), indexed once rather than per message.
            self._resent = {
                m.store_id: m.packet_id
                for m in session.inflight_out.values()
                if isinstance(m, StoredMessage) and m.packet_id is not None
            }
        packet_id = self._resent.get(store_id)
        if packet_id is None:
            return None
        held = session.inflight_out.get(packet_id)
        return packet_id if isinstance(held, StoredMessage) and held.store_id == store_id else None

    async def await_ack(self, packet_id: int) -> None:
        await self._handler.await_puback(packet_id)

    def publish(
        self, message: OfflineMessage, *, dup: bool, on_ack: Callable[[], None]
    ) -> asyncio.Future[None]:
        handler = self._handler
        session = handler.session
        loop = asyncio.get_running_loop()
        if session is None:
            gone: asyncio.Future[None] = loop.create_future()
            gone.set_exception(ProtocolError("no_session", "the connection has no session any more"))
            return gone
        qos = min(message.qos, self._qos_for(message.topic))
        payload = self._payload_for(message.topic, message.payload)
        outbox = handler.outbox
        if outbox is None or qos == QOS_2:
            # No shared transport (compression), or QoS 2's four-packet flow: amqtt's path.
            return asyncio.ensure_future(self._flow(message, qos, payload, dup=dup, on_ack=on_ack))
        topic = message.topic.encode()
        if qos == QOS_0:
            outbox.push_control(publish_qos0(topic, payload))
            written: asyncio.Future[None] = loop.create_future()
            written.set_result(None)
            return written
        inflight_out, inflight_in = session.inflight_out, session.inflight_in
        packet_id = mailbox_packet_id(
            message.id, lambda pid: pid in inflight_out or pid in inflight_in, lambda: session.next_packet_id
        )
        # In flight like any QoS 1 message: a reconnect resends it (DUP, same packet id) and
        # its PUBACK settles it; the waiter is what the mailbox's replay watches.
        outgoing = StoredMessage(packet_id, message.topic, qos, payload, False, store_id=message.id)
        outgoing.on_ack = on_ack
        inflight_out[packet_id] = outgoing
        waiters = handler._puback_waiters
        acked: asyncio.Future[None] = loop.create_future()
        waiters[packet_id] = acked  # type: ignore[assignment]
        acked.add_done_callback(lambda done: _forget(waiters, packet_id, done))
        outbox.push_control(wire.publish(topic, payload, qos=qos, packet_id=packet_id, dup=dup))
        return acked

    async def _flow(
        self, message: OfflineMessage, qos: int, payload: bytes, *, dup: bool, on_ack: Callable[[], None]
    ) -> None:
        handler = self._handler
        session = handler.session
        if session is None:
            raise ProtocolError("no_session", "the connection has no session any more")
        packet_id = None
        if qos > QOS_0:
            inflight_out, inflight_in = session.inflight_out, session.inflight_in
            packet_id = mailbox_packet_id(
                message.id,
                lambda pid: pid in inflight_out or pid in inflight_in,
                lambda: session.next_packet_id,
            )
        outgoing = StoredMessage(packet_id, message.topic, qos, payload, False, store_id=message.id)
        if dup and qos > QOS_0:
            # A publish_packet already set makes the handler send it with DUP.
            outgoing.publish_packet = outgoing.build_publish_packet()
        outgoing.on_ack = on_ack
        await handler._handle_message_flow(outgoing)


def _forget(waiters: dict[int, Any], packet_id: int, waiter: asyncio.Future[None]) -> None:
    if waiters.get(packet_id) is waiter:
        del waiters[packet_id]
