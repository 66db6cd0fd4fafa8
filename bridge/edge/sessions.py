"""The session registry: adopting, releasing, capping, expiring and restoring sessions.

Whatever way a connection ends, its session is left disconnected (a clean one deleted, a
persistent one saved with its disconnect time). A same-client-id CONNECT takes the live
connection over and waits for it to finish. Persistent sessions are bounded: at most
``limits.max_sessions_per_user`` per user (a new one replaces the longest-disconnected, or
is refused with CONNACK 3 if all are in use), and one disconnected longer than
``broker.session_expiry_s`` is deleted, with its user's offline queue once they have none
left (bridge/core/session_limits.py has the rules). At start the store's sessions and
snapshots are restored before any listener opens.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

from amqtt.adapters import WriterAdapter
from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridge.cluster.link import ClusterLink
from bridge.cluster.sessions import shared_verdict
from bridge.core.connect import CONNACK_SERVER_UNAVAILABLE
from bridge.core.connection import Event, State, advance
from bridge.core.session_limits import SessionRefusal, expired, make_room, trim
from bridge.core.store import SessionRecord, StoreError
from bridge.edge.handler import MarketProtocolHandler
from bridge.edge.session import MarketSession, context_of
from bridge.edge.state import BrokerState, LiveConnection, log
from bridge.errors import ClusterUnavailable
from bridge.limits import Lease
from bridge.logs import STORE, clip

__all__ = ["SessionsMixin"]


class SessionsMixin(BrokerState):
    """Sessions in memory and in the store, by client id and by user."""

    def _init_sessions(self) -> None:
        # user -> client ids of their persistent sessions, and of new ones being connected.
        self._user_sessions: dict[str, set[str]] = {}
        self._expiry_task: asyncio.Task[None] | None = None

    def connection_list(self) -> list[dict[str, Any]]:
        """This node's live connections for the admin API (no credentials)."""
        return [c.describe() for c in self._connections.values()]

    async def cluster_connections(self) -> dict[str, list[dict[str, Any]]] | None:
        """Every node's live connections (node -> list), or None without a cluster; raises
        :class:`ClusterUnavailable` when Redis cannot be reached."""
        if self.cluster is None:
            return None
        return await self.cluster.directory.listing(await self.cluster.registry.live_nodes())

    def create_offline_session(self, client_id: str) -> tuple[BrokerProtocolHandler, Session]:
        session = MarketSession()
        session.client_id = client_id
        handler = MarketProtocolHandler(self.plugins_manager, session)
        session.transitions.disconnect()
        return handler, session

    async def _restore(self) -> None:
        """Persistent sessions (with subscriptions) and market snapshots from the store.

        Sessions that expired while the broker was down are deleted instead, as are those
        past a user's ``limits.max_sessions_per_user`` (longest disconnected first).
        """
        assert self.store is not None
        self._user_sessions.clear()
        now = self._clock()
        records = await self.store.load_sessions()
        # One still connected when a broker stopped without saying counts as disconnected now.
        times = {r.client_id: now if r.disconnected_at is None else r.disconnected_at for r in records}
        gone = set(expired(times, now=now, expiry_s=self.bridge_config.broker.session_expiry_s))
        by_owner: dict[str, dict[str, float]] = {}
        for record in records:
            if record.client_id not in gone:
                by_owner.setdefault(record.owner, {})[record.client_id] = times[record.client_id]
        cap = self.bridge_config.limits.max_sessions_per_user
        over = {client_id for owned in by_owner.values() for client_id in trim(owned, cap)}
        for record in records:
            if record.client_id in gone or record.client_id in over:
                await self.store.delete_session(record.client_id)
                continue
            await self._materialise(record, times[record.client_id])
        unknown = [
            r.client_id for r in records if r.disconnected_at is None and r.client_id in self._sessions
        ]
        if unknown and self.cluster is None:
            # (In a cluster another node may hold them: the expiry sweep asks first.)
            await self.store.set_disconnected(unknown, now)
        self.stats.sessions_expired += len(gone)
        self.stats.sessions_evicted += len(over)
        for owner in {r.owner for r in records if r.client_id in gone} - by_owner.keys():
            self.stats.offline_purged += await self.store.purge_orphaned_queue(owner)
        if gone or over:
            log.info("deleted %d expired and %d over-the-cap persistent sessions", len(gone), len(over))
        snapshots = await self.store.load_snapshots()
        for snapshot in snapshots:
            self._retained_messages[snapshot.topic] = RetainedApplicationMessage(
                None, snapshot.topic, snapshot.payload, QOS_0
            )
        log.info("restored %d sessions and %d snapshots", len(self._sessions), len(self._retained_messages))
        await self._reserve_seq(self.store, {s.topic: s.seq for s in snapshots})

    async def _materialise(self, record: SessionRecord, disconnected_at: float) -> None:
        """A stored persistent session, disconnected, with its subscriptions, in memory."""
        handler, session = self.create_offline_session(record.client_id)
        session.clean_session = False
        context = context_of(session)
        context.user = record.owner
        context.disconnected_at = disconnected_at
        self._sessions[record.client_id] = (session, handler)
        self._user_sessions.setdefault(record.owner, set()).add(record.client_id)
        for topic_filter, qos in record.subscriptions.items():
            # Re-checked against the owner's token when they reconnect.
            await self.add_subscription((topic_filter, qos), session)

    def _owner_of(self, client_id: str) -> str | None:
        live = self._connections.get(client_id)
        if live is not None:
            return live.user
        stored = self._sessions.get(client_id)
        return context_of(stored[0]).user if stored is not None else None

    def connections_by_user(self) -> dict[str, int]:
        return self.limits.per_user()

    async def _adopt_session(self, incoming: Session) -> Session:
        """Take over a live connection, then reuse or replace the stored session."""
        client_id = incoming.client_id
        assert client_id is not None
        live = self._connections.get(client_id)
        if live is not None:
            log.info("client %s connected again: taking over its connection", clip(client_id))
            await self._close_taken_over(live)
        if incoming.clean_session:
            previous = self._sessions.get(client_id)
            await self._delete_session(client_id)
            if previous is not None and not previous[0].clean_session and self.store is not None:
                await self._store_call("delete session", self.store.delete_session(client_id))
            incoming.parent = 0
            return incoming
        stored = self._sessions.get(client_id)
        if stored is None:
            incoming.parent = 0
            return incoming
        session = stored[0]
        # The new CONNECT brings fresh will, keep-alive and credentials.
        session.will_flag = incoming.will_flag
        session.will_message = incoming.will_message
        session.will_topic = incoming.will_topic
        session.will_qos = incoming.will_qos
        session.will_retain = incoming.will_retain
        session.keep_alive = incoming.keep_alive
        session.username = incoming.username
        session.password = incoming.password
        session.remote_address = incoming.remote_address
        session.remote_port = incoming.remote_port
        session.clean_session = False
        session.parent = 1
        context = context_of(session)
        was_disconnected, context.disconnected_at = context.disconnected_at is not None, None
        if was_disconnected and self.store is not None:
            # In use again: a broker that stops without saying must not expire it from then.
            await self._store_call("mark session connected", self.store.set_disconnected([client_id], None))
        return session

    async def _close_taken_over(self, connection: LiveConnection) -> None:
        """Close a connection whose client id connected again (here or on another node) and
        wait for it to end, within ``broker.takeover_timeout_s``; past that it is released."""
        connection.handler.end_reason = connection.handler.end_reason or "taken_over"
        await connection.handler.handle_connection_closed()
        try:
            async with asyncio.timeout(self.bridge_config.broker.takeover_timeout_s):
                await connection.done.wait()
        except TimeoutError:
            log.warning("old connection of %s did not finish in time", clip(connection.client_id))
            await self._release(connection)

    async def _release(self, connection: LiveConnection) -> None:
        """Leave the session disconnected, whatever ended the connection (idempotent)."""
        if connection.state is State.CLOSED:
            return
        if connection.state is not State.DRAINING:
            # Released from outside its own task (a takeover that timed out).
            connection.state, _ = advance(connection.state, Event.CLOSED_BY_BROKER)
        client_id = connection.client_id
        if self._connections.get(client_id) is connection:
            del self._connections[client_id]
            if self.cluster is not None:
                self.cluster.directory.remove(client_id)
        if connection.outbox is not None:
            connection.outbox.close()
        self._fanout.invalidate()
        connection.handler.stop_watchdog()
        if connection.replay is not None:
            connection.replay.cancel()
        await self.hooks.on_release(connection.lease)
        if self.cluster is not None and isinstance(connection.lease, Lease):
            await self.cluster.unclaim(client_id, connection.lease)
        session = connection.session
        registered = self._sessions.get(client_id, (None, None))[1] is connection.handler
        if session.transitions.is_connected() and registered:
            session.transitions.disconnect()
        context = context_of(session)
        left = registered and not session.clean_session and context.disconnected_at is None
        if left:
            context.disconnected_at = self._clock()  # its expiry counts from here
        with suppress(Exception):
            await connection.handler.stop()
        stored = self._sessions.get(client_id)
        if session.clean_session and stored is not None and stored[1] is connection.handler:
            await self._delete_session(client_id)
        elif left and stored is not None and stored[0] is session:
            # Saved with its disconnect time (unless evicted meanwhile), for a restarted broker.
            await self._persist_session(session)
        connection.state, _ = advance(connection.state, Event.RELEASED)
        connection.done.set()

    async def _delete_session(self, client_id: str) -> None:
        stored = self._sessions.get(client_id)
        if stored is not None and not stored[0].clean_session:
            owner = context_of(stored[0]).user
            if owner is not None:
                self._forget_session(owner, client_id)
        await super()._delete_session(client_id)

    async def _claim_session(
        self, writer: WriterAdapter, incoming: Session, user: str, lease: object
    ) -> bool:
        """Count a new persistent session of ``user`` against ``limits.max_sessions_per_user``.

        A clean session, or resuming one of the user's own, never counts. At the cap the
        user's longest-disconnected sessions are deleted to make room; if every one is in
        use the CONNECT is refused (CONNACK 3, ``session_limit``), ``lease`` is given back
        and the result is False. The client id counts from here, before its session exists,
        so two CONNECTs of one user cannot both take the last place.
        """
        client_id = incoming.client_id
        assert client_id is not None
        if incoming.clean_session:
            return True
        held = self._held_sessions(user)
        if self._is_persistent_of(user, client_id):
            held.add(client_id)
            return True
        others = held - {client_id}  # (an id left by a CONNECT of it that failed is not counted twice)
        room = make_room(self._session_times(others), self.bridge_config.limits.max_sessions_per_user)
        if isinstance(room, SessionRefusal):
            live = self._connections.get(client_id)
            if live is not None:
                live.lease = lease  # acquired as its replacement: it stays that connection's
            else:
                await self.hooks.on_release(lease)
            await self._refuse(writer, CONNACK_SERVER_UNAVAILABLE, room.reason, f"{user!r}: {room.detail}")
            return False
        held.add(client_id)
        held.difference_update(room)  # before any await: no other CONNECT picks them as well
        for victim in room:
            log.info(
                "persistent session %s of %s deleted to make room for %s",
                clip(victim),
                clip(user),
                clip(client_id),
            )
            await self._drop_session(victim)
            self.stats.sessions_evicted += 1
        return True

    def _is_persistent_of(self, user: str, client_id: str) -> bool:
        stored = self._sessions.get(client_id)
        return stored is not None and not stored[0].clean_session and context_of(stored[0]).user == user

    def _holds(self, user: str, client_id: str) -> bool:
        """Whether ``client_id`` is a persistent session of ``user``, or is being connected."""
        lock = self._client_locks.get(client_id)
        return (lock is not None and lock.locked()) or self._is_persistent_of(user, client_id)

    def _held_sessions(self, user: str) -> set[str]:
        """``user``'s persistent sessions (and new ones being connected), stale entries dropped.

        A session deleted by a path that does not say so (amqtt's own cleanup), or a CONNECT
        that failed after :meth:`_claim_session`, leaves an id that is dropped here.
        """
        held = self._user_sessions.get(user)
        if held is None:
            held = self._user_sessions[user] = set()
        held.difference_update([client_id for client_id in held if not self._holds(user, client_id)])
        return held

    def _forget_session(self, user: str, client_id: str) -> None:
        held = self._user_sessions.get(user)
        if held is not None:
            held.discard(client_id)
            if not held:
                del self._user_sessions[user]

    def _session_times(self, client_ids: set[str]) -> dict[str, float | None]:
        """client id -> when it disconnected, None for one in use (connected or being connected)."""
        times: dict[str, float | None] = {}
        for client_id in client_ids:
            stored = self._sessions.get(client_id)
            lock = self._client_locks.get(client_id)
            if (
                stored is None
                or stored[0].transitions.is_connected()
                or client_id in self._connections
                or (lock is not None and lock.locked())
            ):
                times[client_id] = None
                continue
            context = context_of(stored[0])
            if context.disconnected_at is None:
                context.disconnected_at = self._clock()
            times[client_id] = context.disconnected_at
        return times

    async def _drop_session(self, client_id: str) -> None:
        """Delete a persistent session and its subscriptions, in memory and in the store."""
        await self._delete_session(client_id)
        if self.store is not None:
            await self._store_call("delete session", self.store.delete_session(client_id))

    async def expire_sessions(self) -> int:
        """Delete the persistent sessions disconnected longer than ``broker.session_expiry_s``.

        In memory and in the store; a user left with none loses their offline queue too (it
        only waits to be replayed to a persistent session). Runs every min(60 s, expiry / 10)
        by itself; callable at any time. Returns the number of sessions deleted.
        """
        now = self._clock()
        expiry_s = self.bridge_config.broker.session_expiry_s
        owners: dict[str, str] = {}
        times: dict[str, float | None] = {}
        for user in list(self._user_sessions):
            for client_id, at in self._session_times(self._held_sessions(user)).items():
                owners[client_id], times[client_id] = user, at
        count = 0
        for client_id in expired(times, now=now, expiry_s=expiry_s):
            user = owners[client_id]
            if self.cluster is not None and not await self._expired_cluster_wide(
                self.cluster, user, client_id, now
            ):
                continue
            # Looked at again: a CONNECT may have resumed it while earlier ones were deleted.
            if not self._holds(user, client_id) or not expired(
                self._session_times({client_id}), now=now, expiry_s=expiry_s
            ):
                continue
            # Free, so taken at once (no await between the check and here); a CONNECT of this
            # client id waits until the session is gone and then starts afresh.
            async with self._client_locks.setdefault(client_id, asyncio.Lock()):
                log.info("persistent session %s of %s expired", clip(client_id), clip(user))
                self._forget_session(user, client_id)
                await self._drop_session(client_id)
            self.stats.sessions_expired += 1
            count += 1
            if not self._held_sessions(user):
                del self._user_sessions[user]
                await self._purge_queue(user)
        return count

    async def _expired_cluster_wide(
        self, cluster: ClusterLink, user: str, client_id: str, now: float
    ) -> bool:
        """Whether the shared store agrees that a session this node's copy calls expired is
        (bridge/cluster/sessions.py); this node's copy is brought in line otherwise."""
        assert self.store is not None
        try:
            record = next((r for r in await self.store.user_sessions(user) if r.client_id == client_id), None)
            alive = (
                record is not None and record.disconnected_at is None and await cluster.held_alive(client_id)
            )
        except (StoreError, ClusterUnavailable) as exc:
            log.warning("session expiry: could not check %s cluster-wide (kept): %s", clip(client_id), exc)
            return False
        verdict = shared_verdict(
            record, holder_alive=alive, now=now, expiry_s=self.bridge_config.broker.session_expiry_s
        )
        if verdict == "expire":
            return True
        async with self._client_locks.setdefault(client_id, asyncio.Lock()):
            held = self._sessions.get(client_id)
            if held is None or client_id in self._connections:
                return False
            if verdict == "gone":  # deleted on another node
                self._forget_session(user, client_id)
                await self._delete_session(client_id)
                return False
            if verdict == "orphaned":  # its node died before saying it disconnected
                await self._store_call(
                    "mark a session disconnected", self.store.set_disconnected([client_id], now)
                )
            at = None if record is None else record.disconnected_at
            context_of(held[0]).disconnected_at = now if at is None else at
        return False

    async def _purge_queue(self, user: str) -> None:
        """``user`` has no persistent session left: nothing will replay their queue."""
        if self.store is None:
            return
        try:
            purged = await self.store.purge_orphaned_queue(user)
        except StoreError as exc:
            self.stats.store_errors += 1
            log.error("store: could not purge the offline queue of %s: %s", clip(user), exc, extra=STORE)
            return
        self.stats.offline_purged += purged
        if purged:
            log.info("purged %d queued message(s) of %s: no persistent session left", purged, user)

    async def _expire_sessions_periodically(self) -> None:
        interval = min(60.0, self.bridge_config.broker.session_expiry_s / 10)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_sessions()
            except Exception:
                log.exception("session expiry sweep failed")

    async def _session_monitor(self) -> None:
        """amqtt's monitor deletes every disconnected anonymous session after ~1 s: with
        ``auth.enabled: false`` persistent sessions vanished ([MQTT-3.1.2-4/5]). Clean
        sessions go in ``_release`` and persistent ones expire by ``broker.session_expiry_s``."""

    async def user_subscriptions(self, user: str) -> dict[str, dict[str, int]]:
        """client id -> {filter: QoS} for ``user``'s persistent sessions (from the store)."""
        assert self.store is not None
        return {record.client_id: record.subscriptions for record in await self.store.user_sessions(user)}
