"""Messages addressed to a user (``user/<u>/...``): a service's PUBLISH, a will, the admin
API and ``send_to_user`` go through one send path (:meth:`UserMessagesMixin._send`). A message
for a user with a persistent session that takes its topic goes into the user's mailbox first
(bridge/core/mailbox.py: stored durably, replayed, removed on PUBACK); clean sessions get it
directly. In a cluster the user's persistent sessions are also known from the shared store
and their connections may be on other nodes, which get it over their control channel
(bridge/cluster/control.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.session import ApplicationMessage, Session

from bridge.cluster.control import UserMail
from bridge.cluster.link import ClusterLink
from bridge.core.connection import State
from bridge.core.envelope import open_envelope
from bridge.core.mailbox import eviction_notice, user_topic
from bridge.core.store import (
    EnqueueResult,
    NewMessage,
    OfflineMessage,
    Priority,
    SessionRecord,
    StoreError,
)
from bridge.core.topics import SERVICE_PREFIX, USER_PREFIX, is_valid_topic, matches, topic_class
from bridge.edge.handler import MarketProtocolHandler, TakeUser
from bridge.edge.lean import LeanEvent
from bridge.edge.mailbox_link import HandlerLink
from bridge.edge.session import context_of
from bridge.edge.state import BrokerState, LiveConnection, log
from bridge.edge.user_inbound import UserInbound
from bridge.errors import ClusterUnavailable, MessageError
from bridge.logs import CLIENT, STORE, clip

__all__ = ["SendResult", "UserMessagesMixin"]

# How long a replay the store stopped waits before it tries again.
REPLAY_RETRY_S = 1.0
# Longest a user-addressed message may wait (an envelope may ask for less).
MAX_TTL_S = 30 * 86400.0


@dataclass(frozen=True)
class SendResult:
    """What became of a user-addressed message."""

    delivered: int  # connected sessions it was sent to at once
    stored: OfflineMessage | None  # queued for the user's offline persistent session
    evicted: tuple[OfflineMessage, ...] = ()  # what the queue dropped to make room (maybe this one)


class UserMessagesMixin(BrokerState):
    def _take_user_publish(
        self, sender: Session, handler: MarketProtocolHandler, message: ApplicationMessage, topic: str
    ) -> bool:
        """A client's PUBLISH to ``user/...``: routed now, acknowledged (QoS 1) once the group
        commit holding it returns, so the client loop goes on to the next PUBLISH meanwhile and
        a window of them is stored in one write. Store down: no PUBACK, the connection ends
        (the publisher's library sends it again after reconnecting)."""
        self.stats.messages_in[topic_class(topic)] += 1
        if not self._publish_allowed(sender, topic):
            handler.hand_off(message, True)
            return True
        sent = self._send_user_publish(sender, topic, bytes(message.data or b""), message.qos or QOS_0)
        if sent is None:
            handler.hand_off(message, True)
        else:
            sent.add_done_callback(lambda done: handler.hand_off(message, _succeeded(done)))
        return True

    def _user_inbound(self, session: Session) -> TakeUser:
        """What the handler's read path calls for each of this connection's PUBLISHes to ``user/...``."""
        context = context_of(session)

        def may_publish(topic: str) -> bool:
            return not context.admitted or self.hooks.on_publish(context, topic)

        return UserInbound(
            session.client_id or "",
            max_topic=self._max_topic,
            may_publish=may_publish,
            send=partial(self._take_user_message, session),
            dropped=self.stats.publishes_dropped,
            received=self.stats.messages_in,
        ).take

    def _send_user_publish(
        self, sender: Session, topic: str, data: bytes, qos: int
    ) -> asyncio.Future[SendResult] | None:
        sent = self._user_publish(sender, topic, data, qos)
        if sent is not None:
            sent.add_done_callback(partial(self._user_publish_done, sender, topic))
        return sent

    def _user_publish_done(self, sender: Session, topic: str, sent: asyncio.Future[SendResult]) -> None:
        exc = None if sent.cancelled() else sent.exception()
        self._user_publish_settled(sender, topic, None if exc or sent.cancelled() else sent.result(), exc)

    def _user_publish_settled(
        self, sender: Session, topic: str, result: SendResult | None, exc: BaseException | None
    ) -> bool:
        """Count and log a message the store did not take, or notify what its queue evicted; whether it was taken."""
        if result is None:
            self.stats.publishes_dropped["store_unavailable"] += 1
            log.error(
                "could not take %s's message on %s: %s",
                clip(sender.client_id),
                clip(topic),
                exc or "cancelled",
                extra=STORE,
            )
            return False
        self._evictions_of(sender, topic, result)
        return True

    def _take_user_message(
        self, sender: Session, topic: str, data: bytes, qos: int, settle: Callable[[bool], None]
    ) -> bool:
        """The read path's PUBLISH to ``user/...`` (checked): True when done now, False when
        ``settle`` will say, once the group commit returns, whether it was stored."""
        cfg = self.bridge_config.store
        try:
            envelope = open_envelope(data, default_ttl_s=cfg.default_ttl_s, max_ttl_s=MAX_TTL_S)
            user = topic.split("/", 2)[1]
            full = user_topic(user, topic)
        except MessageError as exc:
            self._dropped_message(sender, topic, exc)
            return True

        def then(result: SendResult | None, exc: BaseException | None) -> None:
            settle(self._user_publish_settled(sender, topic, result, exc))

        now = self._send(
            user,
            full,
            envelope.payload,
            priority=envelope.priority,
            ttl_s=envelope.ttl_s,
            qos=max(qos, QOS_1),
            then=then,
        )
        return now is not None

    def _dropped_message(self, sender: Session, topic: str, exc: MessageError) -> None:
        self.stats.publishes_dropped[exc.reason] += 1
        log.warning(
            "dropped message from %s on %s: %s",
            clip(sender.client_id),
            clip(topic),
            clip(exc, 200),
            extra=CLIENT,
        )

    async def _route_user_publish(self, sender: Session, topic: str, data: bytes, qos: int) -> None:
        """A will (or other awaited publish) to ``user/...``: done once it is stored."""
        sent = self._user_publish(sender, topic, data, qos)
        if sent is not None:
            self._evictions_of(sender, topic, await sent)

    def _user_publish(
        self, sender: Session, topic: str, data: bytes, qos: int
    ) -> asyncio.Future[SendResult] | None:
        """Open the envelope and start sending; None when the message is dropped (logged)."""
        cfg = self.bridge_config.store
        try:
            envelope = open_envelope(data, default_ttl_s=cfg.default_ttl_s, max_ttl_s=MAX_TTL_S)
            user = topic.split("/", 2)[1]
            return self._start_send(
                user,
                user_topic(user, topic),
                envelope.payload,
                priority=envelope.priority,
                ttl_s=envelope.ttl_s,
                qos=max(qos, QOS_1),
            )
        except MessageError as exc:
            self._dropped_message(sender, topic, exc)
            return None

    def _evictions_of(self, sender: Session, topic: str, result: SendResult) -> None:
        owner = context_of(sender).user
        if result.evicted and isinstance(owner, str):
            user = topic.split("/", 2)[1]
            task = asyncio.create_task(self._notify_evictions(owner, user, result.evicted))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _notify_evictions(self, service: str, user: str, evicted: tuple[OfflineMessage, ...]) -> None:
        """Tell the sending service what a full queue dropped, on service/<sub>/evictions."""
        payload = eviction_notice(user, evicted)
        await self._broadcast_message(None, f"{SERVICE_PREFIX}{service}/evictions", payload, QOS_1)

    async def send_to_user(
        self,
        user: str,
        topic: str,
        payload: bytes,
        *,
        priority: Priority = Priority.NORMAL,
        ttl_s: float | None = None,
        qos: int = QOS_1,
    ) -> SendResult:
        """Deliver to ``user``'s connected sessions now, or queue it for their persistent session.

        ``topic`` is ``user/<user>/...`` (or just the part after ``user/<user>/``). Raises
        :class:`MessageError` for a bad address and :class:`StoreUnavailable` when the message
        had to be stored and could not be: nothing is reported as stored that was not.
        """
        full = user_topic(user, topic)
        return await self._start_send(user, full, payload, priority=priority, ttl_s=ttl_s, qos=qos)

    def _start_send(
        self, user: str, full: str, payload: bytes, *, priority: Priority, ttl_s: float | None, qos: int
    ) -> asyncio.Future[SendResult]:
        """:meth:`send_to_user` without waiting: its future completes once the message is
        stored (in the mailbox's next group commit) and delivered to whoever is live."""
        done: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()

        def then(result: SendResult | None, exc: BaseException | None) -> None:
            if done.done():
                return
            if isinstance(exc, asyncio.CancelledError):
                done.cancel()
            elif exc is not None:
                done.set_exception(exc)
            else:
                assert result is not None
                done.set_result(result)

        now = self._send(user, full, payload, priority=priority, ttl_s=ttl_s, qos=qos, then=then)
        if now is not None:
            done.set_result(now)
        return done

    def _send(
        self,
        user: str,
        full: str,
        payload: bytes,
        *,
        priority: Priority,
        ttl_s: float | None,
        qos: int,
        then: Callable[[SendResult | None, BaseException | None], None],
    ) -> SendResult | None:
        """Deliver or store: the result at once when nothing has to be stored, else None and
        ``then`` is called once the group commit holding the message returns."""
        ttl = self.bridge_config.store.default_ttl_s if ttl_s is None else ttl_s
        if self.cluster is not None:
            message = NewMessage(full, payload, priority, ttl, min(qos, QOS_2))
            task = asyncio.create_task(
                self._send_clustered(self.cluster, user, message, qos, then), name="cluster-send"
            )
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
            return None
        live, mailboxes = self._user_targets(user, full)
        if not mailboxes:
            if not live:
                self.stats.publishes_dropped["no_subscriber"] += 1
                return SendResult(0, None)
            self._deliver_live(live, full, payload, qos)
            return SendResult(len(live), None)
        # The user keeps a persistent session for this topic: the message goes into their
        # mailbox first, durably, and leaves it only on their PUBACK. Whether the phone is
        # offline, online but not yet acknowledging, or the broker is killed meanwhile,
        # what the sender was told is stored stays stored until delivered.
        assert self.mailbox is not None

        def committed(result: EnqueueResult | None, exc: BaseException | None) -> None:
            if exc is not None or result is None:
                then(None, exc)
                return
            if live:
                self._deliver_live([t for t in live if not self._is_mailbox(t[0], user)], full, payload, qos)
                for session, _ in live:
                    if self._is_mailbox(session, user):
                        self._pump(session)
            then(SendResult(len(live), result.stored, result.evicted), None)

        self.mailbox.submit_then(user, NewMessage(full, payload, priority, ttl, min(qos, QOS_2)), committed)
        return None

    async def _send_clustered(
        self,
        cluster: ClusterLink,
        user: str,
        message: NewMessage,
        qos: int,
        then: Callable[[SendResult | None, BaseException | None], None],
    ) -> None:
        """:meth:`_send` on a node of a cluster: the user's persistent sessions are known to
        the shared store (not only to this node's memory) and their connections may be on
        other nodes, which get the message over their control channel."""
        try:
            # One user's sends keep their order: the lookups below wait for Redis.
            async with self._send_order.setdefault(user, asyncio.Lock()):
                stored: asyncio.Future[EnqueueResult] | None = None
                reached = 0
                _, mailboxes = self._user_targets(user, message.topic)
                if not mailboxes and self.store is not None:
                    records = await self.store.user_sessions(user)
                    mailboxes = any(
                        matches(message.topic, f) for record in records for f in record.subscriptions
                    )
                if mailboxes:
                    assert self.mailbox is not None
                    stored = self.mailbox.submit(user, message)
                else:
                    reached = await self._forward(cluster, user, message, qos, stored=False)
            if stored is None:
                # Clean sessions only, anywhere: delivered now or nowhere.
                here = self._deliver_here(user, message.topic, message.payload, qos, stored=False)
                if not here and not reached:
                    self.stats.publishes_dropped["no_subscriber"] += 1
                then(SendResult(here + reached, None), None)
                return
            result = await stored
            here = self._deliver_here(user, message.topic, message.payload, qos, stored=True)
            reached = await self._forward(cluster, user, message, qos, stored=True)
            then(SendResult(here + reached, result.stored, result.evicted), None)
        except BaseException as exc:
            then(None, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            lock = self._send_order.get(user)
            if lock is not None and not lock.locked():
                del self._send_order[user]

    async def _forward(
        self, cluster: ClusterLink, user: str, message: NewMessage, qos: int, *, stored: bool
    ) -> int:
        """To the user's other nodes; how many got it (0 when Redis cannot be reached: a
        stored message waits for the sessions' next replay there)."""
        try:
            return await cluster.forward(user, message.topic, message.payload, qos, stored=stored)
        except ClusterUnavailable as exc:
            self.stats.publishes_dropped["cluster_unavailable"] += not stored
            log.warning("cluster: could not hand %s's message to their other nodes: %s", clip(user), exc)
            return 0

    def _deliver_here(self, user: str, topic: str, payload: bytes, qos: int, *, stored: bool) -> int:
        """This node's part of a user message: the connected sessions; a stored message goes
        to the user's mailbox sessions through their replay (it leaves the store on PUBACK)."""
        live, _ = self._user_targets(user, topic)
        if not stored:
            self._deliver_live(live, topic, payload, qos)
            return len(live)
        self._deliver_live([t for t in live if not self._is_mailbox(t[0], user)], topic, payload, qos)
        for session, _ in live:
            if self._is_mailbox(session, user):
                self._pump(session)
        return len(live)

    def _cluster_mail(self, mail: UserMail) -> None:
        """A user message another node accepted, for the user's connections here."""
        if not mail.topic.startswith(f"{USER_PREFIX}{mail.user}/") or not is_valid_topic(mail.topic):
            self.stats.publishes_dropped["bad_cluster_mail"] += 1
            log.warning("cluster: dropped mail from %s for %r", clip(mail.by), clip(mail.topic))
            return
        self._deliver_here(mail.user, mail.topic, mail.payload, mail.qos, stored=mail.stored)

    @staticmethod
    def _is_mailbox(session: Session, user: str) -> bool:
        """A session that takes ``user``'s messages from their mailbox (the store)."""
        return not session.clean_session and context_of(session).user == user

    def _pump(self, session: Session) -> None:
        """Make a live mailbox session's replay deliver what was just stored."""
        connection = self._connections.get(session.client_id or "")
        if connection is None or connection.session is not session or connection.state is not State.LIVE:
            return  # not yet live: its replay starts once it is
        if connection.replay is None or connection.replay.done():
            connection.replay = asyncio.create_task(
                self._replay_offline(connection), name=f"replay:{connection.client_id}"
            )
        elif connection.wake is not None:
            connection.wake.set()  # the running replay sends it without waiting for acks

    def _user_targets(self, user: str, topic: str) -> tuple[list[tuple[Session, int]], bool]:
        """Connected sessions subscribed to ``topic`` (best QoS each), and whether the user
        has a persistent session (connected or not) subscribed to it."""
        live, mailboxes = [], False
        # The subscribers are remembered per topic until subscriptions or connections change
        # (a burst to one user does not search the topic tree per message).
        for session, sub_qos in self._fanout.best_per_session(topic):
            if session.transitions.is_connected():
                live.append((session, sub_qos))
            mailboxes = mailboxes or self._is_mailbox(session, user)
        return live, mailboxes

    def _deliver_live(self, targets: list[tuple[Session, int]], topic: str, payload: bytes, qos: int) -> None:
        """To sessions that are not the user's mailbox (clean ones, other users'): once, at
        min(publish QoS, subscription QoS); a persistent one keeps it in flight until acked."""
        self._deliver_message(topic, payload, qos, targets, "user")

    async def _replay_offline(self, connection: LiveConnection) -> None:
        """Glue: the mailbox replays the user's queue over this connection (bridge/core/mailbox.py)."""
        assert self.mailbox is not None
        session = connection.session
        may_receive = self._may_receive(session)

        def accepts(topic: str) -> bool:
            return may_receive(topic) and any(
                matches(topic, f) for f in self._session_filters.get(connection.client_id, ())
            )

        link = HandlerLink(
            connection.handler,
            connection.client_id,
            qos_for=partial(self._best_qos, session),
            payload_for=lambda topic, payload: self._localized(topic, payload, context_of(session).zone, {}),
        )
        if connection.wake is None:
            connection.wake = LeanEvent()
        while (await self.mailbox.replay(connection.user, link, accepts, connection.wake)).store_down:
            # The store is back soon or the connection ends (and cancels this).
            await asyncio.sleep(REPLAY_RETRY_S)
            if connection.state is not State.LIVE:
                return

    def _best_qos(self, session: Session, topic: str) -> int:
        qos = QOS_0
        for topic_filter in self._session_filters.get(session.client_id or "", ()):
            if matches(topic, topic_filter):
                for subscriber, sub_qos in self._subscriptions.get(topic_filter, ()):
                    if subscriber is session:
                        qos = max(qos, sub_qos)
        return qos

    def _granted_filters(self, session: Session) -> list[tuple[str, int]]:
        granted = []
        for topic_filter in self._session_filters.get(session.client_id or "", ()):
            for subscriber, sub_qos in self._subscriptions.get(topic_filter, ()):
                if subscriber is session:
                    granted.append((topic_filter, sub_qos))
        return granted

    async def _persist_session(self, session: Session) -> None:
        """Save a persistent session's subscriptions so a restarted broker has them."""
        context = context_of(session)
        owner = context.user
        if self.store is None or session.clean_session or owner is None or not session.client_id:
            return
        record = SessionRecord(
            session.client_id,
            owner,
            dict(self._granted_filters(session)),
            disconnected_at=context.disconnected_at,
        )
        await self._store_call("save session", self.store.save_session(record))

    async def _store_call(self, what: str, call: Awaitable[None]) -> None:
        """Session bookkeeping must not end a connection when the store is down."""
        try:
            await call
        except StoreError as exc:
            self.stats.store_errors += 1
            log.error("store: could not %s: %s", what, exc, extra=STORE)


def _succeeded(done: asyncio.Future[Any]) -> bool:
    return not done.cancelled() and done.exception() is None
