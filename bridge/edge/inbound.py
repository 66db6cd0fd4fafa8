"""Inbound publishes: what a client (or its will) publishes, authorised, validated and routed.

A PUBLISH to an invalid topic ends the connection ([MQTT-3.3.2-2], [MQTT-4.7.2-1]); one
over ``limits.max_topic_bytes`` or refused by the ``on_publish`` hook is dropped and
counted, the client kept. ``market/...`` payloads must be valid ticks (then sequenced like
any), ``user/...`` ones go to the user's mailbox, anything else is fanned out (and retained
if asked). A will goes through the same checks, published only when a connection ends
without DISCONNECT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session

from bridge.core.store import StoreError
from bridge.core.tick import Tick
from bridge.core.topics import MARKET_PREFIX, USER_PREFIX, is_valid_topic, topic_class
from bridge.edge.handler import MarketProtocolHandler
from bridge.edge.session import context_of
from bridge.edge.state import SUBACK_FAILURE, BrokerState, log
from bridge.errors import MessageError, TickError
from bridge.logs import CLIENT, STORE, clip

__all__ = ["InboundMixin"]


class InboundMixin(BrokerState):
    """The amqtt overrides for inbound PUBLISH and DISCONNECT, and the read path's market ingest."""

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message: ApplicationMessage | None = wait_deliver.result()
        if message is None:
            return True
        topic = message.topic or ""
        if (
            topic.startswith(USER_PREFIX)
            and is_valid_topic(topic)
            and isinstance(handler, MarketProtocolHandler)
        ):
            return self._take_user_publish(client_session, handler, message, topic)
        accepted = True
        try:
            return await self._route_inbound(client_session, message)
        except StoreError as exc:
            accepted = False
            self.stats.publishes_dropped["store_unavailable"] += 1
            log.error(
                "could not take %s's message on %s: %s",
                clip(client_session.client_id),
                clip(message.topic),
                exc,
                extra=STORE,
            )
            return True
        finally:
            if isinstance(handler, MarketProtocolHandler):
                handler.hand_off(message, accepted)

    async def _route_inbound(self, client_session: Session, message: ApplicationMessage) -> bool:
        retain = message.publish_packet is not None and bool(message.publish_packet.retain_flag)
        return await self._route_publish(
            client_session, message.topic or "", bytes(message.data or b""), message.qos or QOS_0, retain
        )

    async def _route_publish(
        self, client_session: Session, topic: str, data: bytes, qos: int, retain: bool
    ) -> bool:
        """One PUBLISH (or will) from ``client_session``: authorised, validated, routed.
        False: a protocol violation, the connection ends."""
        self.stats.messages_in[topic_class(topic)] += 1
        if not topic or not is_valid_topic(topic) or topic.startswith("$"):
            # [MQTT-3.3.2-2] / [MQTT-4.7.2-1]: a protocol violation ends the connection.
            return self._invalid_topic(client_session, topic)
        if not self._publish_allowed(client_session, topic):
            return True
        if topic.startswith(MARKET_PREFIX):
            tick = self._decoded_tick(client_session, topic, data)
            if tick is None:
                return True
            # Sequenced and snapshotted like any tick, whatever the retain flag said.
            await self.publish_tick(tick, qos=qos)
            return True
        if topic.startswith(USER_PREFIX):
            await self._route_user_publish(client_session, topic, data, qos)
            return True
        await self._broadcast_message(client_session, topic, data, qos)
        if retain:
            await self.retain_message(client_session, topic, data, qos)
        return True

    def _may_receive(self, session: Session) -> Callable[[str], bool]:
        """Whether a stored or queued message on a topic may reach ``session``: the ACL is
        checked at delivery too, so nothing leaks past it (a topic is a filter of itself)."""
        context = context_of(session)
        if not context.admitted:
            return lambda topic: True
        return lambda topic: self.hooks.on_subscribe(context, topic, QOS_0) != SUBACK_FAILURE

    def _publish_allowed(self, session: Session, topic: str) -> bool:
        """Topic length and ACL: a refused PUBLISH is dropped and counted, the client kept."""
        if len(topic) > self._max_topic and len(topic.encode()) > self._max_topic:
            self.stats.publishes_dropped["topic_too_long"] += 1
            log.info(
                "client %s published to a topic over %d bytes",
                clip(session.client_id),
                self._max_topic,
                extra=CLIENT,
            )
            return False
        context = context_of(session)
        if context.admitted and not self.hooks.on_publish(context, topic):
            self.stats.publishes_dropped["acl"] += 1
            log.info("client %s may not publish to %s", clip(session.client_id), clip(topic), extra=CLIENT)
            return False
        return True

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        # The will goes through the same checks and routing as any PUBLISH of this client
        # (amqtt broadcast it unchecked, raw, and retained it on any topic).
        abnormal = not (
            disconnect_waiter.done()
            and not disconnect_waiter.cancelled()
            and isinstance(disconnect_waiter.result(), DisconnectPacket)
        )
        will = client_session.will_flag and abnormal
        if not abnormal and isinstance(handler, MarketProtocolHandler):
            handler.goodbye = True
        client_session.will_flag = False
        if will:
            await self._publish_will(client_session)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _publish_will(self, session: Session) -> None:
        self.stats.wills_published += 1
        topic = session.will_topic or ""
        payload = bytes(session.will_message or b"")
        try:
            await self._route_publish(
                session, topic, payload, session.will_qos or QOS_0, bool(session.will_retain)
            )
        except (StoreError, MessageError) as exc:
            log.warning(
                "will of %s on %s not delivered: %s", clip(session.client_id), clip(topic), clip(exc, 200)
            )

    def _ingest(self, session: Session, topic: str, payload: bytes, qos: int) -> bool:
        """A market PUBLISH from a client's read chunk: validate and fan out now (False: close)."""
        self.stats.messages_in["market"] += 1
        if not is_valid_topic(topic):
            return self._invalid_topic(session, topic)
        if not self._publish_allowed(session, topic):
            return True
        tick = self._decoded_tick(session, topic, payload)
        if tick is not None:
            self._publish_tick_now(tick, qos)
        return True

    def _invalid_topic(self, sender: Session, topic: str) -> bool:
        """A PUBLISH to a topic no PUBLISH may name: counted, logged (escaped); False: close."""
        log.info(
            "client %s published to invalid topic %s: closing",
            clip(sender.client_id),
            clip(topic),
            extra=CLIENT,
        )
        self.stats.publishes_dropped["invalid_topic"] += 1
        return False

    def _decoded_tick(self, sender: Session, topic: str, data: bytes) -> Tick | None:
        """A client's tick, or None when it is not one (counted and logged, escaped)."""
        try:
            return Tick.decode(data, topic=topic)
        except TickError as exc:
            self.stats.ticks_rejected[exc.reason] += 1
            log.warning(
                "dropped tick from %s on %s: %s",
                clip(sender.client_id),
                clip(topic),
                clip(exc, 200),
                extra=CLIENT,
            )
            return None
