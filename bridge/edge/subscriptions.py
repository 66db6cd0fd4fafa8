"""Subscriptions: SUBSCRIBE and UNSUBSCRIBE, the caps, the ACL, and amqtt's table kept cheap.

A filter goes through the caps first (``limits.max_subscriptions_per_connection``,
``limits.max_topic_bytes``: refused before anything is allocated), then the filter syntax
([MQTT-4.7.1]) and the ``on_subscribe`` hook; a refused filter gets 0x80 and the rest of
the SUBSCRIBE goes on. Granted filters are indexed (:class:`~bridge.core.topics.TopicIndex`)
for fan-out and saved before the SUBACK for a persistent session. amqtt's
``_subscriptions`` lists stay the record, but a subscriber's place in each is remembered,
so adding or removing one costs the same however many share the filter.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from amqtt.contexts import Action
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridge.core.topics import TopicIndex, is_valid_filter
from bridge.core.wire import suback
from bridge.edge.session import context_of
from bridge.edge.state import SUBACK_FAILURE, BrokerState, log
from bridge.limits import SubscribeRefusal, subscribe_refusal
from bridge.logs import CLIENT, clip

__all__ = ["SubscriptionsMixin"]


class SubscriptionsMixin(BrokerState):
    """The subscription table (add, replace, remove filters) and the SUBSCRIBE/UNSUBSCRIBE answers."""

    def _init_subscriptions(self) -> None:
        self._index = TopicIndex()
        self._session_filters: dict[str, set[str]] = {}
        # filter -> client id -> its place in amqtt's ``_subscriptions[filter]`` list.
        self._slots: dict[str, dict[str, int]] = {}

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        # Sessions restored from the store and amqtt's plugin API come this way: capped the
        # same as a client's SUBSCRIBE, but with no packet to report against.
        code, refusal = await self._subscribe(subscription, session)
        if refusal is not None:
            log.debug(
                "client %s: subscription %s refused: %s",
                clip(session.client_id),
                clip(subscription[0]),
                refusal,
            )
        return code

    async def _subscribe(
        self, subscription: tuple[str, int], session: Session
    ) -> tuple[int, SubscribeRefusal | None]:
        """One filter through the caps, the ACL and amqtt: the SUBACK code, and why the caps
        refused it (None when they did not)."""
        topic_filter = subscription[0]
        limits = self.bridge_config.limits
        # Checked before anything is allocated: 75,000 filters on one connection cost 56 MB
        # and every other subscriber a fifth of its tick rate.
        refusal = subscribe_refusal(
            topic_filter,
            self._session_filters.get(session.client_id or "", ()),
            max_filters=limits.max_subscriptions_per_connection,
            max_topic_bytes=limits.max_topic_bytes,
        )
        if refusal is not None:
            self.stats.subscribes_capped[refusal] += 1
            return SUBACK_FAILURE, refusal
        if not is_valid_filter(topic_filter):
            return SUBACK_FAILURE, None  # [MQTT-4.7.1]: a bad filter is refused, never granted
        context = context_of(session)
        if (
            context.admitted
            and self.hooks.on_subscribe(context, topic_filter, subscription[1]) == SUBACK_FAILURE
        ):
            # Denied for this filter only; the rest of the SUBSCRIBE goes on.
            self.stats.subscribes_denied += 1
            log.info(
                "client %s may not subscribe to %s", clip(session.client_id), clip(topic_filter), extra=CLIENT
            )
            return SUBACK_FAILURE, None
        if session.client_id is not None and topic_filter not in self._session_filters.get(
            session.client_id, ()
        ):
            granted = await self._add_new_subscription(subscription, session)
        else:
            granted = await super().add_subscription(subscription, session)
            if granted != SUBACK_FAILURE:
                # amqtt keeps a repeated filter's first QoS yet acknowledges the new one; the new
                # subscription replaces the old (MQTT-3.8.4-3), so deliveries follow the SUBACK.
                entries = self._subscriptions[topic_filter]
                for index, (subscriber, qos) in enumerate(entries):
                    if subscriber.client_id == session.client_id and qos != granted:
                        entries[index] = (subscriber, granted)
        self._fanout.invalidate()
        if granted != SUBACK_FAILURE and session.client_id is not None:
            self._index.add(topic_filter)
            self._session_filters.setdefault(session.client_id, set()).add(topic_filter)
        return granted, None

    async def _add_new_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's add_subscription for a filter the session does not hold (``_session_filters``
        says so), without its search for the session among the filter's every subscriber: on
        ``market/#`` with 10,000 subscribers that search (and ours for a repeated filter's QoS)
        was ~70% of the broker's CPU per connection, quadratic in a connect storm."""
        topic_filter, qos = subscription
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        granted = min(qos, max_qos) if isinstance(max_qos, int) else qos
        entries = self._subscriptions.setdefault(topic_filter, [])
        self._slots.setdefault(topic_filter, {})[session.client_id or ""] = len(entries)
        entries.append((session, granted))
        return granted

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        subscriptions = subscribe_waiter.result()
        results = [await self._subscribe(sub, client_session) for sub in subscriptions.topics]
        codes = [code for code, _ in results]
        capped = Counter(refusal for _, refusal in results if refusal is not None)
        if capped:
            # One line per packet: a SUBSCRIBE of 75,000 filters is one event, not 75,000.
            limits = self.bridge_config.limits
            log.info(
                "client %s: SUBSCRIBE of %d filters, %d refused: %d past the cap of %d per connection, "
                "%d longer than %d bytes",
                client_session.client_id,
                len(codes),
                capped.total(),
                capped["too_many_filters"],
                limits.max_subscriptions_per_connection,
                capped["filter_too_long"],
                limits.max_topic_bytes,
            )
        granted = [
            (sub[0], code)
            for sub, code in zip(subscriptions.topics, codes, strict=True)
            if code != SUBACK_FAILURE
        ]
        if granted:
            # Durable before acknowledged: a SUBACK'd subscription survives a crash.
            await self._persist_session(client_session)
        connection = self._connections.get(client_session.client_id or "")
        outbox = (
            connection.outbox if connection is not None and connection.session is client_session else None
        )
        if outbox is not None:
            # Prebuilt bytes in this step's batch, with the QoS 0 snapshots after it: one write.
            outbox.push_control(suback(subscriptions.packet_id, codes))
            if any(code in (QOS_1, QOS_2) for code in codes):
                outbox.flush()  # snapshots at QoS 1/2 are written by amqtt, after the SUBACK
        else:
            await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        for topic_filter, qos in granted:
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=qos,
            )
        await self._send_retained(client_session, handler, granted)
        if outbox is not None:
            outbox.flush()  # before the next packet's answer, which amqtt writes directly

    async def _handle_unsubscription(
        self, client_session: Session, handler: BrokerProtocolHandler, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        await self._persist_session(client_session)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = self._remove_subscriber(a_filter, session)
        self._fanout.invalidate()
        if deleted and session.client_id is not None:
            filters = self._session_filters.get(session.client_id)
            if filters is not None:
                filters.discard(a_filter)
                if not filters:
                    del self._session_filters[session.client_id]
        if not self._subscriptions.get(a_filter, True):
            del self._subscriptions[a_filter]
            self._index.remove(a_filter)
        return deleted

    def _remove_subscriber(self, a_filter: str, session: Session) -> int:
        """amqtt's removal without its search through every subscriber of the filter (a
        disconnect cost that grew with the number of clients on ``market/#``): the slot is
        known, and the last entry moves into it (fan-out does not depend on their order)."""
        entries = self._subscriptions.get(a_filter)
        slots = self._slots.get(a_filter)
        client_id = session.client_id or ""
        index = slots.pop(client_id, None) if slots is not None else None
        if (
            entries is None
            or index is None
            or index >= len(entries)
            or entries[index][0].client_id != client_id
        ):
            # Not placed by _add_new_subscription (or moved under us): amqtt's search.
            deleted = super()._del_subscription(a_filter, session)
            if entries is not None and slots is not None:
                self._slots[a_filter] = {entry[0].client_id or "": i for i, entry in enumerate(entries)}
            return deleted
        last = entries.pop()
        if index < len(entries):
            entries[index] = last
            slots[last[0].client_id or ""] = index  # type: ignore[index]
        if not slots:
            del self._slots[a_filter]
        return 1

    async def _del_all_subscriptions(self, session: Session) -> None:
        # Only this session's filters, not a scan of every filter on the broker.
        for topic_filter in list(self._session_filters.get(session.client_id or "", ())):
            self._del_subscription(topic_filter, session)
