"""The mailbox's view of one connection (:class:`bridge.core.mailbox.MailboxLink`) over our
amqtt protocol handler: stored messages go out as :class:`~bridge.edge.handler.StoredMessage`
with a packet id derived from their store id, and their PUBACKs settle them."""

from __future__ import annotations

from collections.abc import Callable

from amqtt.mqtt.constants import QOS_0

from bridge.core.mailbox import mailbox_packet_id
from bridge.core.store import OfflineMessage
from bridge.edge.handler import MarketProtocolHandler, StoredMessage
from bridge.errors import ProtocolError

__all__ = ["HandlerLink"]


class HandlerLink:
    """A :class:`~bridge.core.mailbox.MailboxLink` for one live mailbox connection.

    ``qos_for(topic)`` is the best QoS the session's subscriptions grant for a topic and
    ``payload_for(topic, payload)`` the payload in the session's time zone: the broker's.
    """

    __slots__ = ("_handler", "_payload_for", "_qos_for", "client_id")

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

    def acknowledged(self, store_id: str) -> bool:
        return store_id in self._handler.settled_ids

    def in_flight(self, store_id: str) -> int | None:
        session = self._handler.session
        if session is None:
            return None
        for message in session.inflight_out.values():
            if isinstance(message, StoredMessage) and message.store_id == store_id:
                return message.packet_id
        return None

    async def await_ack(self, packet_id: int) -> None:
        await self._handler.await_puback(packet_id)

    async def send(self, message: OfflineMessage, *, dup: bool, on_ack: Callable[[], None]) -> None:
        handler = self._handler
        session = handler.session
        if session is None:
            raise ProtocolError("no_session", "the connection has no session any more")
        qos = min(message.qos, self._qos_for(message.topic))
        packet_id = None
        if qos > QOS_0:
            inflight_out, inflight_in = session.inflight_out, session.inflight_in
            packet_id = mailbox_packet_id(
                message.id,
                lambda pid: pid in inflight_out or pid in inflight_in,
                lambda: session.next_packet_id,
            )
        payload = self._payload_for(message.topic, message.payload)
        outgoing = StoredMessage(packet_id, message.topic, qos, payload, False, store_id=message.id)
        if dup and qos > QOS_0:
            # A publish_packet already set makes the handler send it with DUP.
            outgoing.publish_packet = outgoing.build_publish_packet()
        outgoing.on_ack = on_ack
        await handler._handle_message_flow(outgoing)
