"""Admission: from an accepted socket to a LIVE connection, and its end.

A connection is authenticated *before* any session is touched: the CONNECT is read and
answered by our code on both transports (bridge/core/connect.py), the ``on_connect`` hook
decides, and a refused CONNECT (CONNACK at once, never a hanging client) wipes, takes over
or leaves nothing. A client id belongs to the user (``sub``) whose session it holds;
connection limits (per user, global) refuse with CONNACK 3 at once (the ``on_lease``
hook). A socket that sends no CONNECT is closed after ``broker.connect_timeout_s``, and a
token's ``exp`` ends its connection. Whatever way a connection ends, it is released
(bridge/edge/sessions.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Coroutine
from contextlib import suppress
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id
from websockets.exceptions import ConnectionClosed

from bridge.auth import Claims, TokenPolicy
from bridge.cluster.limits import AsyncConnectionLimits, LocalAsyncLimits
from bridge.config import BridgeConfig
from bridge.core.connect import CONNACK_NOT_AUTHORIZED, Connect, ConnectRefused, read_connect
from bridge.core.connection import Event, advance
from bridge.core.context import ConnectionContext
from bridge.core.hooks import ConnectRequest, Refused
from bridge.core.ratelimit import subscriber_gate
from bridge.core.wire import connack
from bridge.edge.client_loop import client_message_loop
from bridge.edge.handler import MarketProtocolHandler
from bridge.edge.outbox import Outbox
from bridge.edge.session import MarketSession, context_of
from bridge.edge.state import SUBACK_FAILURE, BrokerState, LiveConnection, log
from bridge.edge.streams import ChunkReader, StreamConnection
from bridge.errors import ProtocolError
from bridge.keys import load_keyring
from bridge.limits import Lease, LocalConnectionLimits
from bridge.logs import CLIENT, clip
from bridge.token_cache import TokenCache
from broker_plugins.auth import AllowAll, AnonymousAccess, JwtAuth

__all__ = ["AdmissionMixin"]

# How a connection ended, from its handler: what the broker ended itself owes no will.
_BROKER_ENDS = frozenset({"token_expired", "taken_over", "shutdown"})


class AdmissionMixin(BrokerState):
    """The amqtt overrides for accepting and serving a client connection."""

    def _init_admission(self, config: BridgeConfig) -> None:
        self._connections: dict[str, LiveConnection] = {}
        self._client_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._client_tasks: set[asyncio.Task[Any]] = set()  # one per open socket
        # What a client may send before its CONNECT is accepted: the CONNECT, whose size is
        # a few KB of fixed fields and will plus the largest token and topic.
        self._max_topic = config.limits.max_topic_bytes
        self._connect_budget = 4096 + config.auth.max_token_bytes + config.limits.max_topic_bytes

    def _admission_plugins(self, config: BridgeConfig) -> list[AnonymousAccess | JwtAuth | AllowAll]:
        """The plugins deciding CONNECT, SUBSCRIBE and PUBLISH (and the connection limits), in
        the order they are asked: public read-only access first, when configured."""
        auth = config.auth
        # One per broker, bound to its keys and policy: a reconnect verifies a token once.
        # The admin API reads its keys and policy from here (one policy for every door).
        self.tokens = None
        self.anonymous = None
        if not auth.enabled:
            log.warning("auth is disabled: any client may connect and do anything")
            return [AllowAll(self.limits, max_topic_bytes=config.limits.max_topic_bytes)]
        self.tokens = TokenCache(
            load_keyring(auth), TokenPolicy.from_config(auth), max_entries=auth.token_cache_size
        )
        jwt = JwtAuth(self.tokens, self.limits, max_topic_bytes=config.limits.max_topic_bytes)
        if not auth.anonymous.enabled:
            return [jwt]
        # Public read-only access (bridge/anonymous.py): its own cap, cluster-wide in a cluster.
        most = auth.anonymous.max_connections
        shared = self.cluster.anonymous_limits if self.cluster is not None else None
        cap: AsyncConnectionLimits = shared or LocalAsyncLimits(LocalConnectionLimits(most, most))
        self.anonymous = AnonymousAccess.from_config(
            auth.anonymous, cap, max_topic_bytes=config.limits.max_topic_bytes
        )
        return [self.anonymous, jwt]

    async def _end_client_tasks(self, live: set[asyncio.Task[None]]) -> None:
        """Every connection's task ends before the store closes and the loop stops: a task
        left pending is destroyed mid-``finally`` (its session never saved)."""
        for task in self._client_tasks - live:
            task.cancel()  # still waiting for a CONNECT: nothing to finish
        if live:
            # amqtt's shutdown has ended their handlers; each is releasing its session.
            _, stuck = await asyncio.wait(live, timeout=self.bridge_config.broker.takeover_timeout_s)
            for task in stuck:
                task.cancel()
        await asyncio.gather(*self._client_tasks, return_exceptions=True)

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            await _close_quietly(writer)
            return
        server.conn_count += 1
        task = asyncio.current_task()
        if task is not None:
            self._client_tasks.add(task)
        try:
            await self._serve(listener_name, reader, writer)
        except (ConnectionError, ConnectionClosed, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not _writer_closed(writer):
                log.exception("connection on %s failed", listener_name)
                return
            log.info(
                "connection on %s lost: %s", listener_name, clip(exc or type(exc).__name__, 200), extra=CLIENT
            )
        except Exception:
            # Client input must never take the broker down; log with the stack and move on.
            log.exception("connection on %s failed", listener_name)
        finally:
            server.conn_count -= 1
            if task is not None:
                self._client_tasks.discard(task)
            await _close_quietly(writer)

    async def _serve(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        peer = writer.get_peer_info()
        assert isinstance(reader, ChunkReader)
        read = await self._read_connect(listener_name, peer, reader, writer)
        if read is None:
            return
        connect, incoming = read
        handler = MarketProtocolHandler(self.plugins_manager)
        # [MQTT-3.1.2-24]: no packet within 1.5 x keep-alive means the client is gone.
        incoming.keep_alive = math.ceil(incoming.keep_alive * 1.5)
        client_id = incoming.client_id
        assert client_id is not None

        # Admission first (the on_connect hook): a refused CONNECT must not touch any session.
        request = ConnectRequest(
            client_id,
            connect.username,
            connect.password,
            connect.clean_session,
            listener_name,
            str(peer),
            self._clock(),
            connect.will,
        )
        admitted = self.hooks.on_connect(request)
        if admitted is None:
            admitted = Refused(CONNACK_NOT_AUTHORIZED, "not_authorized", "no plugin admitted it")
        if isinstance(admitted, Refused):
            detail = admitted.detail
            if admitted.reason != "will_refused":
                detail = f"client {clip(client_id)} from {peer}: {detail}"
            await self._refuse(writer, admitted.code, admitted.reason, detail)
            return
        user = admitted.user
        claims = admitted.claims if isinstance(admitted.claims, Claims) else None
        if admitted.client_id is not None:  # e.g. anonymous clients' own namespace
            client_id = incoming.client_id = admitted.client_id

        lock = self._client_locks.get(client_id) or self._client_locks.setdefault(client_id, asyncio.Lock())
        async with lock:
            owner = self._owner_of(client_id)
            if owner is not None and owner != user:
                await self._refuse(
                    writer,
                    CONNACK_NOT_AUTHORIZED,
                    "client_id_owned",
                    f"{clip(user)} may not use client id {clip(client_id)}",
                )
                return
            if self.cluster is not None and not incoming.clean_session and client_id not in self._connections:
                await self._load_shared_session(user, client_id)
            live = self._connections.get(client_id)
            lease = await self.hooks.on_lease(user, live.lease if live is not None else None)
            if live is None and self.cluster is not None and isinstance(lease, Refused):
                # At a limit, a takeover from another node moves that connection's slot here.
                held = await self.cluster.held_lease(client_id, user)
                if held is not None:
                    lease = await self.hooks.on_lease(user, held)
            if self.cluster is not None and isinstance(lease, Lease):
                refused = await self.cluster.claim(client_id, user, lease)
                if refused is not None:
                    await self.hooks.on_release(lease)
                    lease = refused
            if isinstance(lease, Refused):
                await self._refuse(writer, lease.code, lease.reason, lease.detail)
                return
            if not await self._claim_session(writer, incoming, user, lease):
                return
            session = await self._adopt_session(incoming)
            context = context_of(session)
            context.admit(admitted)
            context.zone = await self._zone_for(user, claims, admitted.zone)
            if session.parent:
                self._drop_subscriptions_outside(session, context)
            handler.attach(session, reader, writer)
            session.transitions.connect()
            self._sessions[client_id] = (session, handler)
            connection = LiveConnection(client_id, user, session, handler, lease, task=asyncio.current_task())
            settings = self.bridge_config.broker
            connection.outbox = Outbox.for_writer(
                writer,
                settings.max_outbound_bytes,
                settings.socket_send_buffer_bytes,
                batcher=self._batcher,
                conflated=self.stats.publishes_dropped,
                session=session,
                max_inflight=settings.max_inflight_messages,
                gate=subscriber_gate(claims, self.bridge_config.limits.rate),
            )
            handler.outbox = connection.outbox
            handler.ingest = self._ingest
            handler.take_user = self._user_inbound(session)
            handler.max_packet = settings.max_packet_bytes
            handler.publish_limit = self.bridge_config.limits.rate
            handler.dropped = self.stats.publishes_dropped
            handler.protocol_errors = self.stats.protocol_errors
            if claims is not None:
                self._schedule_expiry(handler, claims)
            self._connections[client_id] = connection
            self._fanout.invalidate()
        # This frame lives as long as the connection: let go of what only admission needed (the
        # CONNECT and its token, the request, the session made for it, the client id's lock).
        del read, connect, incoming, request, admitted, lock
        # Logged in: full-size WebSocket messages; unread output may now reach the outbox's
        # bound (market data), plus room for a retained snapshot and amqtt's own writes.
        reader.logged_in(4 * settings.max_outbound_bytes + (1 << 20))
        self.stats.connections += 1
        self.stats.connects += 1
        _log_connected(client_id, user, peer, listener_name)
        if self.cluster is not None:
            self.cluster.directory.add(client_id, connection.describe())
        connected_at = time.monotonic()
        try:
            try:
                outbox = connection.outbox
                if outbox is not None:
                    # Prebuilt bytes, written now: nothing amqtt writes directly overtakes it.
                    outbox.push_control(connack(0, session_present=bool(session.parent)))
                    outbox.flush()
                    if _writer_closed(writer):
                        raise ConnectionError("closed before CONNACK")
                else:
                    await handler.mqtt_connack_authorize(True)
            except (ConnectionError, ConnectionClosed, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and not _writer_closed(writer):
                    raise  # not uvloop's "handler is closed": our bug
                # Gone between CONNECT and CONNACK (a phone switching networks): still an
                # accepted session that ended without DISCONNECT, so its will is published.
                handler.end_reason = "closed_before_connack"
                if session.will_flag:
                    session.will_flag = False
                    await self._publish_will(session)
                return
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
            )
            await handler.start()
            connection.state, _ = advance(connection.state, Event.CONNACK_SENT)
            self._fanout.invalidate()
            await self._publish_session_retained_messages(session)
            if session.parent:
                # A resumed session missed ticks: give it the snapshots of what it follows.
                await self._send_retained(session, handler, self._granted_filters(session))
            if not session.clean_session and claims is not None:
                connection.replay = asyncio.create_task(
                    self._replay_offline(connection), name=f"replay:{client_id}"
                )
            await self._client_message_loop(session, handler)
        finally:
            self.stats.connections -= 1
            if handler.end_reason == "keepalive":
                self.stats.keepalive_timeouts += 1
            elif handler.end_reason == "token_expired":
                self.stats.token_expiries += 1
            # One INFO line per connection, at its end: who, from where, how long, why.
            log.info(
                "disconnected %s (user %s) from %s on %s after %.0fs: %s",
                clip(client_id),
                clip(user),
                peer,
                listener_name,
                time.monotonic() - connected_at,
                handler.end_reason or "closed",
            )
            connection.state, _ = advance(connection.state, _end_event(handler))
            await self._release(connection)

    async def _read_connect(
        self, listener_name: str, peer: object, reader: ChunkReader, writer: WriterAdapter
    ) -> tuple[Connect, Session] | None:
        """The client's CONNECT, and as an amqtt session (not yet authenticated), or None: closed."""
        timeout = self.bridge_config.broker.connect_timeout_s
        try:
            # asyncio.timeout, not wait_for: no task per CONNECT, and Python 3.11's wait_for
            # can swallow a cancellation (a shutdown) that lands as the read completes.
            async with asyncio.timeout(timeout):
                read = await read_connect(reader.read_chunk, self._connect_budget)
        except TimeoutError:
            self.stats.connect_timeouts += 1
            log.info("no CONNECT from %s within %.1fs: closing", peer, timeout, extra=CLIENT)
            return None
        except ConnectRefused as exc:
            await self._refuse(writer, exc.code, exc.reason, f"CONNECT from {peer}: {exc.detail}")
            return None
        except ProtocolError as exc:
            # Malformed CONNECT, bad UTF-8, not a CONNECT at all: close ([MQTT-4.8.0-1]).
            self.stats.refusals[exc.reason] += 1
            log.info(
                "bad CONNECT from %s on %s: %s", peer, listener_name, clip(exc.detail, 200), extra=CLIENT
            )
            return None
        if read is None:
            return None
        connect, rest = read
        reader.unread(rest)
        session = MarketSession()
        session.client_id = connect.client_id or gen_client_id()
        session.clean_session = connect.clean_session
        session.keep_alive = connect.keep_alive
        session.username = connect.username  # the password (token) is never kept on the session
        if connect.will is not None:
            will = connect.will
            session.will_flag = True
            session.will_topic = will.topic
            session.will_message = will.payload
            session.will_qos = will.qos
            session.will_retain = will.retain
        if isinstance(peer, tuple):
            session.remote_address, session.remote_port = peer[0], peer[1]
        session.ssl_object = writer.get_ssl_info()
        return connect, session

    def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> Coroutine[Any, Any, None]:
        # One parked future per idle connection instead of amqtt's four tasks (bridge/edge/client_loop.py);
        # the coroutine is returned, not awaited here: one frame less per connection.
        return client_message_loop(self, client_session, handler)

    async def _refuse(self, writer: WriterAdapter, code: int, reason: str, detail: str) -> None:
        """CONNACK with a refusal code at once (never a hanging client), counted and logged."""
        self.stats.refusals[reason] += 1
        log.info("refused (%s): %s", reason, detail, extra=CLIENT)
        with suppress(Exception):
            writer.write(connack(code))
            await writer.drain()

    def _schedule_expiry(self, handler: MarketProtocolHandler, claims: Claims) -> None:
        # The same leeway that admitted the token bounds its life; the handler's one timer
        # (with keep-alive) ends it then, without a will.
        delay = max(0.0, claims.exp + self.bridge_config.auth.leeway_s - self._clock())
        handler.expire_at(asyncio.get_running_loop().time() + delay)

    def _drop_subscriptions_outside(self, session: Session, context: ConnectionContext) -> None:
        """A persistent session resumed with a new token keeps only what that token allows."""
        for topic_filter in list(self._session_filters.get(session.client_id or "", ())):
            if self.hooks.on_subscribe(context, topic_filter, QOS_2) == SUBACK_FAILURE:
                log.info(
                    "dropping %s's subscription %s: not allowed by the new token",
                    clip(session.client_id),
                    clip(topic_filter),
                )
                self._del_subscription(topic_filter, session)


def _end_event(handler: MarketProtocolHandler) -> Event:
    reason = handler.end_reason
    if reason is None or reason == "closed_before_connack":
        return Event.DISCONNECT_PACKET if handler.goodbye else Event.SOCKET_CLOSED
    if reason == "keepalive":
        return Event.TIMEOUT
    if reason in _BROKER_ENDS:
        return Event.CLOSED_BY_BROKER
    return Event.PROTOCOL_ERROR  # a ProtocolError's reason, or a failed hand-off


def _log_connected(client_id: str, user: str, peer: object, listener_name: str) -> None:
    # Not inlined in _serve: logging materializes its caller's frame object, and for a
    # coroutine that then waits out the whole connection that object lives as long (~270 B).
    # DEBUG: the INFO line is the disconnect's, which says all this too (a connect storm
    # spent ~0.1 ms per connection on a second line).
    if log.isEnabledFor(logging.DEBUG):
        log.debug("connected %s (user %s) from %s on %s", clip(client_id), clip(user), peer, listener_name)


def _writer_closed(writer: WriterAdapter) -> bool:
    """The peer's transport is gone (uvloop raises RuntimeError writing to one, asyncio does not)."""
    if isinstance(writer, StreamConnection):
        return writer.transport.is_closing()
    return False


async def _close_quietly(writer: WriterAdapter) -> None:
    with suppress(Exception):
        await writer.close()
