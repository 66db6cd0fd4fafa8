"""Fan-out: every message to its matching subscribers through the one delivery pipeline.

Filters are looked up in a :class:`~bridge.core.topics.TopicIndex`; a message goes at
min(publish QoS, subscription QoS) to each live connection's outbox, localised once per
zone and encoded once per group (bridge/core/delivery.py). Ticks reach only live
connections (a returning client gets the snapshot); anything else that is not live keeps
it in amqtt's in-memory offline queue, bounded by ``broker.max_offline_messages`` and
sent right after the session's next CONNACK. amqtt's broadcast queue is not used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from functools import partial

from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.constants import QOS_0, QOS_2
from amqtt.session import Session

from bridge.core.connection import State
from bridge.core.delivery import Encoded, Plan, Target, group, push_all
from bridge.core.topics import MARKET_PREFIX, topic_class
from bridge.edge.outbox import Outbox
from bridge.edge.session import context_of
from bridge.edge.state import BrokerState, log
from bridge.logs import CLIENT, clip
from bridge.logs import flush as flush_logs

__all__ = ["FanoutMixin"]


class FanoutMixin(BrokerState):
    """Matching subscribers and live targets; non-tick messages delivered or queued offline."""

    def _matching(self, topic: str) -> Iterator[tuple[Session, int]]:
        subscriptions = self._subscriptions
        for topic_filter in self._index.match(topic):
            yield from subscriptions.get(topic_filter, ())

    def _resolve_target(self, session: Session, sub_qos: int) -> Target | None:
        """Live connections only: market ticks are not queued (a returning client, or one not
        yet live, gets the snapshot)."""
        outbox = self._live_outbox(session)
        return None if outbox is None else Target(outbox, context_of(session).zone, sub_qos)

    def _live_outbox(self, session: Session) -> Outbox | None:
        """The outbox of ``session``'s connection once it is LIVE: CONNACK and the resends of
        unacknowledged messages are out, so nothing new overtakes them ([MQTT-4.6.0-1])."""
        connection = self._connections.get(session.client_id or "")
        if connection is None or connection.session is not session or connection.state is not State.LIVE:
            return None
        return connection.outbox

    def _deliver_message(
        self, topic: str, data: bytes, qos: int, targets: list[tuple[Session, int]], klass: str
    ) -> int:
        """A message that is never conflated (user messages, wills, service notices) to
        ``targets`` at min(``qos``, subscription QoS), through the one pipeline. A session
        not live yet, or a persistent one gone at QoS 1/2, keeps it in its offline queue
        (sent right after its next CONNACK)."""
        live: list[Target] = []
        market = topic.startswith(MARKET_PREFIX)
        for session, sub_qos in targets:
            outbox = self._live_outbox(session)
            if outbox is not None:
                live.append(Target(outbox, context_of(session).zone, sub_qos))
            elif session.transitions.is_connected() or (
                min(qos, sub_qos) > QOS_0 and not session.clean_session and not market
            ):
                self._queue_offline(session, topic, data, min(qos, sub_qos))
        if not live:
            return 0
        variants: dict[str | None, bytes] = {}
        message = Encoded(topic, lambda zone: self._localized(topic, data, zone, variants))
        sent = push_all(group(live), message, qos, conflate=False)
        self.stats.deliveries += sent
        self.stats.messages_out[klass] += sent
        return sent

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """A non-market message (a client's, a will, a service notice) to every matching
        subscription, through the pipeline at once: amqtt's broadcast queue and its task per
        delivery are not used (its loop is not started, see :meth:`_broadcast_loop`)."""
        if topic is None or data is None:
            return
        started = time.perf_counter()
        qos = QOS_2 if force_qos is None else force_qos  # None: each at its subscription's QoS
        self._deliver_message(topic, bytes(data), qos, list(self._matching(topic)), topic_class(topic))
        self.stats.fanout_seconds.observe(time.perf_counter() - started)

    async def _broadcast_loop(self) -> None:
        """amqtt's broadcast loop: nothing goes through its queue (see _broadcast_message)."""

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Replay the offline queue, each message at its QoS, only what the session may receive."""
        outbox = self._live_outbox(session)
        queue = session.retained_messages
        may_receive = self._may_receive(session)
        zone = context_of(session).zone
        while outbox is not None and not queue.empty():
            message = queue.get_nowait()
            if may_receive(message.topic):
                topic, data = message.topic, bytes(message.data)
                target = Plan([((zone, outbox.websocket, QOS_2), [outbox])], 1)
                encoded = Encoded(topic, partial(self._localized, topic, data, memo={}))
                push_all(target, encoded, message.qos or QOS_0, conflate=False)

    def _queue_offline(self, session: Session, topic: str, data: bytes | bytearray, qos: int) -> None:
        queue = session.retained_messages
        limit = self.bridge_config.broker.max_offline_messages
        while queue.qsize() >= limit and not queue.empty():
            queue.get_nowait()
            self.stats.offline_dropped += 1
            log.warning(
                "offline queue of %s full (%d): dropped its oldest message",
                clip(session.client_id),
                limit,
                extra=CLIENT,
            )
        if limit > 0:
            queue.put_nowait(RetainedApplicationMessage(None, topic, data, qos))

    async def _flush_outboxes(self) -> None:
        """Conflated messages go out as soon as a slow client's buffer drains."""
        while True:
            await asyncio.sleep(0.05)
            self._batcher.drain_backlog()
            flush_logs()  # rate-limit summaries come out when a flood stops (cheap: 1/s)
