"""The market-bridge broker: amqtt 0.12.1's ``Broker`` with the paths it gets wrong owned here.

What this subclass changes (see ../shared/notes/amqtt-0.12.1.md for the defects):

- Listeners are built from :class:`~bridge.config.BridgeConfig`, each on its own (no field
  inherited from a 'default' listener), WebSocket only on its configured path, no semaphore
  that leaves clients hanging, and a taken port fails startup naming the listener.
- A connection is authenticated *before* any session is touched; a failed CONNECT wipes,
  takes over or leaves nothing. A client id belongs to the user (``sub``) whose session it
  holds. Connection limits (per user, global) refuse with CONNACK 3 at once. Takeover waits
  for the old connection to finish. A token's ``exp`` ends its connection.
- Topic permissions (:mod:`bridge.acl`) are computed once per session from the token's
  claims and checked at SUBSCRIBE, PUBLISH and offline replay; no per-message plugin calls.
- Whatever way a connection ends, its session is left disconnected (clean ones deleted).
- Persistent sessions are bounded: at most ``limits.max_sessions_per_user`` per user (a new
  one replaces the longest-disconnected, or is refused with CONNACK 3 if all are in use), and
  one disconnected longer than ``broker.session_expiry_s`` is deleted, with its user's
  offline queue once they have none left (bridge/session_limits.py has the rules).
- Keep-alive is enforced (1.5 x keep-alive, then the will is published) and a socket that
  sends no CONNECT is closed after ``connect_timeout_s``.
- Retained messages go only to the subscriber's own new subscriptions, once per topic.
- Publishes to ``market/...`` are validated ticks; the broker stamps ``seq`` per topic and
  keeps the last valid tick per topic as the retained snapshot. ``seq`` never goes backwards
  or repeats across restarts, even ``kill -9``: it stays within reservations the store holds
  (bridge/core/sequencer.py), written before listeners start and kept ahead in the background.
- Fan-out looks filters up in a :class:`~bridge.core.topics.TopicIndex`, delivers at
  min(publish QoS, subscription QoS), and bounds amqtt's in-memory offline queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import ssl
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action
from amqtt.contexts import ListenerConfig as AmqttListenerConfig
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import (
    ApplicationMessage,
    Session,
)
from amqtt.utils import gen_client_id
from websockets.exceptions import ConnectionClosed

from bridge.acl import ALLOW_ALL, Acl, acl_for, will_refusal
from bridge.auth import AUTH_DECISION, Claims, TokenPolicy
from bridge.config import BridgeConfig, ListenerConfig, TlsConfig, WsListenerConfig
from bridge.core.connect import ConnectRefused, read_connect
from bridge.core.connection import Event, State, advance
from bridge.core.envelope import open_envelope
from bridge.core.ratelimit import subscriber_gate
from bridge.core.sequencer import ReservedSequencer
from bridge.core.session_limits import SessionRefusal, expired, make_room, trim
from bridge.core.store import (
    EnqueueResult,
    NewMessage,
    OfflineMessage,
    OfflineStore,
    Priority,
    SessionRecord,
    Snapshot,
    StoreError,
)
from bridge.core.tick import Tick
from bridge.core.timezones import LocalClock, TopicSwitch, is_valid_zone, rewrite
from bridge.core.topics import (
    MARKET_PREFIX,
    SERVICE_PREFIX,
    USER_PREFIX,
    TopicIndex,
    is_valid_filter,
    is_valid_topic,
    matches,
    topic_class,
)
from bridge.core.wire import publish_qos0, ws_binary_frame
from bridge.edge.client_loop import client_message_loop
from bridge.edge.fanout import FanOut, Target
from bridge.edge.handler import MarketProtocolHandler, StoredMessage
from bridge.edge.lean import LeanEvent
from bridge.edge.outbox import Batcher, Outbox
from bridge.edge.session import MarketSession
from bridge.edge.session import install as install_light_sessions
from bridge.edge.streams import ChunkReader, Listener, StreamConnection, TcpConnection
from bridge.edge.ws_connection import WsListener
from bridge.errors import AuthError, ListenerError, MarketBridgeError, MessageError, ProtocolError, TickError
from bridge.keys import load_keyring
from bridge.limits import (
    ConnectionLimits,
    Lease,
    LimitRefusal,
    LocalConnectionLimits,
    SubscribeRefusal,
    subscribe_refusal,
)
from bridge.logs import CLIENT, STORE, clip
from bridge.logs import flush as flush_logs
from bridge.offline import SeqReserver, SnapshotWriter, open_store, replay
from bridge.stats import BrokerStats
from bridge.store_guard import GuardedStore
from bridge.token_cache import TokenCache

__all__ = ["MarketBroker", "SendResult"]

log = logging.getLogger(__name__)

install_light_sessions()

_SUBACK_FAILURE = 0x80
# Longest a user-addressed message may wait (an envelope may ask for less).
MAX_TTL_S = 30 * 86400.0


@dataclass(eq=False, slots=True)
class _Connection:
    """One live network connection bound to a session and its owner's connection lease."""

    client_id: str
    user: str
    session: Session
    handler: MarketProtocolHandler
    lease: Lease
    expiry: asyncio.TimerHandle | None = None
    replay: asyncio.Task[None] | None = None
    task: asyncio.Task[Any] | None = None  # the one serving this connection
    wake: asyncio.Event | None = None  # set when a message reaches the mailbox mid-replay
    outbox: Outbox | None = None  # direct market writes (None: amqtt's path)
    # Where it is in its life (bridge/core/connection.py). LIVE, and so in fan-out plans, only
    # once CONNACK and the resends of unacknowledged messages are out, so no new tick
    # overtakes them ([MQTT-4.6.0-1]).
    state: State = State.ADMITTED
    done: asyncio.Event = field(default_factory=LeanEvent)  # an asyncio.Event holds a 760-byte deque


# Session attributes the broker keeps per session (decided once at CONNECT).
_OWNER = "market_bridge.owner"
_ACL = "market_bridge.acl"
_CLAIMS = "market_bridge.claims"
_TZ = "market_bridge.tz"
_DISCONNECTED_AT = "market_bridge.disconnected_at"  # persistent sessions only, while disconnected


def session_acl(session: Session) -> Acl:
    """The ACL computed at CONNECT; sessions made inside the broker may do anything."""
    acl = session.attributes.get(_ACL)
    return acl if isinstance(acl, Acl) else ALLOW_ALL


def session_claims(session: Session) -> Claims | None:
    claims = session.attributes.get(_CLAIMS)
    return claims if isinstance(claims, Claims) else None


class _TickParts:
    """A sequenced tick's wire form (``data``) and the pieces every zone's variant shares."""

    __slots__ = ("data", "head", "ms", "second", "tail", "ts")

    def __init__(self, data: bytes, head: bytes, ts: str, tail: bytes, second: int, ms: int) -> None:
        self.data = data
        self.head = head
        self.ts = ts
        self.tail = tail
        self.second = second
        self.ms = ms


@dataclass(frozen=True)
class SendResult:
    """What became of a user-addressed message."""

    delivered: int  # connected sessions it was sent to at once
    stored: OfflineMessage | None  # queued for the user's offline persistent session
    evicted: tuple[OfflineMessage, ...] = ()  # what the queue dropped to make room (maybe this one)


class MarketBroker(Broker):
    """Embedded amqtt broker serving ``market/<exchange>/<pair>`` (see module docstring)."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        clock: Callable[[], float] = time.time,
        limits: ConnectionLimits | None = None,
        store: OfflineStore | None = None,
    ) -> None:
        self.bridge_config = config
        # Opened at start from config.store unless given (then the caller owns it); every
        # call with a deadline either way (bridge/store_guard.py).
        self.store: GuardedStore | None = None if store is None else self._guarded(store)
        self._owns_store = store is None
        self._clock = clock
        auth = config.auth
        # One per broker, bound to its keys and policy: a reconnect verifies a token once.
        self.tokens: TokenCache | None = None
        if auth.enabled:
            self.tokens = TokenCache(
                load_keyring(auth), TokenPolicy.from_config(auth), max_entries=auth.token_cache_size
            )
            plugins: dict[str, Any] = {
                "broker_plugins.jwt_auth.JwtAuthPlugin": {"tokens": self.tokens, "clock": clock}
            }
        else:
            log.warning("auth is disabled: any client may connect and do anything")
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        amqtt_config: dict[str, Any] = {
            # amqtt insists on a 'default' listener; ours are started by _start_listeners.
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
            # Always explicit: an absent 'plugins' gives amqtt's anonymous-allowed defaults,
            # and no topic plugin: ACLs are decided once per session, not per message.
            "plugins": plugins,
        }
        super().__init__(amqtt_config)
        self.stats = BrokerStats()
        self.limits: ConnectionLimits = limits or LocalConnectionLimits(
            config.limits.max_connections_per_user, config.limits.max_connections
        )
        self._index = TopicIndex()
        self._session_filters: dict[str, set[str]] = {}
        self._connections: dict[str, _Connection] = {}
        self._client_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # user -> client ids of their persistent sessions, and of new ones being connected.
        self._user_sessions: dict[str, set[str]] = {}
        self._expiry_task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._client_tasks: set[asyncio.Task[Any]] = set()  # one per open socket
        self._sequencer = ReservedSequencer(clock=clock, on_due=self._seq_due)
        self._reserver: SeqReserver | None = None
        self._reserver_task: asyncio.Task[None] | None = None
        self.draining = False
        # What a client may send before its CONNECT is accepted: the CONNECT, whose size is
        # a few KB of fixed fields and will plus the largest token and topic.
        self._max_topic = config.limits.max_topic_bytes
        self._connect_budget = 4096 + auth.max_token_bytes + config.limits.max_topic_bytes
        tz = config.timezones
        self._tz_enabled = tz.enabled
        self._tz_fields = frozenset(tz.fields)
        self._tz_switch = TopicSwitch([(rule.filter, rule.enabled) for rule in tz.rules])
        # Retained snapshots per zone: topic -> (the payload they came from, zone -> variant).
        self._retained_variants: dict[str, tuple[bytes, dict[str, bytes]]] = {}
        self._retained_packets: dict[str, tuple[bytes, dict[str | None, bytes]]] = {}
        # The last tick per topic in parts, so its snapshot is localised without parsing JSON.
        self._tick_parts: dict[str, _TickParts] = {}
        self._snapshots: SnapshotWriter | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._batcher = Batcher()
        self._fanout = FanOut(self._matching, self._resolve_target)
        self._clock_tz = LocalClock()
        # Ticks are localised from their parts when the only tick key rewrite() would
        # touch is ``ts`` (the default); other field sets take the generic rewrite().
        tick_fields = self._tz_fields & set(Tick.model_fields)
        self._tick_fast_tz = tick_fields <= {"ts"}
        self._tick_ts_field = "ts" in tick_fields

    def _guarded(self, store: OfflineStore) -> GuardedStore:
        if isinstance(store, GuardedStore):
            return store
        cfg = self.bridge_config.store
        return GuardedStore(store, call_timeout_s=cfg.call_timeout_s, quick_timeout_s=cfg.quick_timeout_s)

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MarketBroker]:
        """``async with broker.running():`` start, and always shut down."""
        await self.start()
        try:
            yield self
        finally:
            await self.shutdown()

    async def start(self) -> None:
        """Start, or raise what stopped it: a :class:`MarketBridgeError` (a taken port, a store
        that cannot be opened) says what failed in one line, so amqtt's "Broker startup failed"
        record with its traceback is not logged for one."""
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_expected_startup_failure)
        try:
            await super().start()
        except BrokerError as exc:
            await self._close_servers()
            await self._close_store()
            cause = exc.__cause__
            if isinstance(cause, MarketBridgeError):
                raise cause from None
            raise
        finally:
            amqtt_log.removeFilter(_expected_startup_failure)

    async def shutdown(self) -> None:
        for connection in list(self._connections.values()):
            # Clean close: no will for clients we are closing ourselves.
            connection.session.will_flag = False
            connection.handler.end_reason = connection.handler.end_reason or "shutdown"
        persistent = [c.client_id for c in self._connections.values() if not c.session.clean_session]
        if persistent and self.store is not None:
            # Their connections end here: a restarted broker counts their expiry from now.
            await self._store_call(
                "mark sessions disconnected", self.store.set_disconnected(persistent, self._clock())
            )
        live = {c.task for c in self._connections.values() if c.task is not None}
        await super().shutdown()
        await self._end_client_tasks(live)
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self._close_store()
        flush_logs(force=True)  # what the rate limit suppressed so far, before the process ends

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

    async def drain(self, timeout_s: float) -> None:
        """First half of a graceful stop: refuse new clients, let in-flight deliveries finish.

        Readiness reports 503 from here on. Listeners close (WebSocket clients get a clean
        1001 close), QoS 1 deliveries get up to ``timeout_s`` to be acknowledged (those that
        are not go back to the store), snapshots are flushed. ``shutdown()`` then closes the
        remaining sessions.
        """
        self.draining = True
        log.info("draining: closing listeners, %d deliveries in flight", len(self._deliveries))
        await self._close_servers()
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=timeout_s)
        if self._snapshots is not None:
            await self._snapshots.flush()

    async def _close_store(self) -> None:
        """Stop the background tasks, flush snapshots a last time, save the exact last seq
        per topic (so a clean restart continues without a gap), close a store we opened."""
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
            self._expiry_task = None
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)
            self._flush_task = None
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            await asyncio.gather(self._snapshot_task, return_exceptions=True)
            self._snapshot_task = None
        if self._snapshots is not None:
            await self._snapshots.flush()
            self._snapshots = None
        if self._reserver_task is not None:
            self._reserver_task.cancel()
            await asyncio.gather(self._reserver_task, return_exceptions=True)
            self._reserver_task = None
        if self.store is not None:
            await self._release_seq(self.store)
        if self.store is not None and self._owns_store:
            store, self.store = self.store, None
            await self._store_call("close the store", store.close())

    async def _session_monitor(self) -> None:
        """amqtt's monitor deletes every disconnected anonymous session after ~1 s: with
        ``auth.enabled: false`` persistent sessions vanished ([MQTT-3.1.2-4/5]). Clean
        sessions go in ``_release`` and persistent ones expire by ``broker.session_expiry_s``."""

    async def _close_servers(self) -> None:
        for server in self._servers.values():
            with suppress(Exception):
                await server.close_instance()
        self._servers.clear()

    def bound_port(self, listener: str) -> int:
        """The port a listener actually bound (useful with ``port: 0``)."""
        instance = self._servers[listener].instance
        sock = next(iter(instance.sockets), None) if instance is not None else None
        if sock is None:
            raise KeyError(listener)
        return int(sock.getsockname()[1])

    def listener_names(self) -> list[str]:
        return list(self._servers)

    def listener_connections(self) -> dict[str, int]:
        return {name: server.conn_count for name, server in self._servers.items()}

    def connection_list(self) -> list[dict[str, Any]]:
        """Live connections for the admin API (no credentials)."""
        return [
            {
                "client_id": c.client_id,
                "user": c.user,
                "remote": f"{c.session.remote_address}:{c.session.remote_port}",
                "clean_session": bool(c.session.clean_session),
                "tz": c.session.attributes.get(_TZ),
            }
            for c in self._connections.values()
        ]

    async def _start_listeners(self) -> None:
        # amqtt's start() has just cleared its state: restore ours before anyone can connect.
        if self.store is None:
            self.store = await open_store(self.bridge_config.store)
        await self._restore()
        self._snapshots = SnapshotWriter(self.store, self.bridge_config.store.snapshot_flush_s)
        self._snapshot_task = asyncio.create_task(self._snapshots.run(), name="snapshot-writer")
        self._reserver = SeqReserver(self.store, self._sequencer, clock=self._clock)
        self._reserver_task = asyncio.create_task(self._reserver.run(), name="seq-reserver")
        self._flush_task = asyncio.create_task(self._flush_outboxes(), name="outbox-flusher")
        self._expiry_task = asyncio.create_task(self._expire_sessions_periodically(), name="session-expiry")
        listeners = self.bridge_config.listeners
        for name, listener in (("ws", listeners.ws), ("tcp", listeners.tcp)):
            if not listener.enabled:
                continue
            instance = await self._bind(name, listener)
            # max_connections=0: no semaphore (amqtt's makes extra clients hang without CONNACK).
            self._servers[name] = Server(name, instance, 0)
            log.info("listener %s bound to %s:%s", name, listener.host, self.bound_port(name))

    async def _flush_outboxes(self) -> None:
        """Conflated messages go out as soon as a slow client's buffer drains."""
        while True:
            await asyncio.sleep(0.05)
            self._batcher.drain_backlog()
            flush_logs()  # rate-limit summaries come out when a flood stops (cheap: 1/s)

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
            handler, session = self.create_offline_session(record.client_id)
            session.clean_session = False
            session.attributes[_OWNER] = record.owner
            session.attributes[_DISCONNECTED_AT] = times[record.client_id]
            self._sessions[record.client_id] = (session, handler)
            self._user_sessions.setdefault(record.owner, set()).add(record.client_id)
            for topic_filter, qos in record.subscriptions.items():
                # Re-checked against the owner's token when they reconnect.
                await self.add_subscription((topic_filter, qos), session)
        unknown = [
            r.client_id for r in records if r.disconnected_at is None and r.client_id in self._sessions
        ]
        if unknown:
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

    async def _reserve_seq(self, store: OfflineStore, snapshots: dict[str, int]) -> None:
        """Continue each topic's seq after anything an earlier run may have sent, and reserve
        the next block in the store, before anyone can publish (a failure fails the start)."""
        startup = self._sequencer.start(await store.load_seq_reservations(), snapshots, self._clock())
        await store.reserve_seq(startup)
        self._sequencer.confirmed(startup)
        if self._sequencer.resumed_unclean:
            log.warning(
                "seq: %d of %d topics skip ahead (the last stop was not clean): subscribers see a gap",
                self._sequencer.resumed_unclean,
                len(self._sequencer),
            )
        else:
            log.info("seq: %d topics continue where they were", len(self._sequencer))

    async def _release_seq(self, store: OfflineStore) -> None:
        """No more numbers after this; the exact last per topic, written as clean."""
        last = self._sequencer.release(self._clock())
        if not last:
            return
        try:
            await store.release_seq(last)
        except StoreError as exc:
            self.stats.store_errors += 1
            log.warning(
                "could not save the last seq of %d topics (the next start skips ahead): %s", len(last), exc
            )

    def _seq_due(self) -> None:
        if self._reserver is not None:
            self._reserver.wake()

    async def _bind(self, name: str, listener: ListenerConfig) -> Any:
        try:
            ssl_context = _ssl_context(listener.tls) if listener.tls else None
        except (OSError, ValueError) as exc:
            raise ListenerError(name, listener.host, listener.port, f"TLS certificate or key: {exc}") from exc
        serve = partial(self._client_connected, name)
        try:
            # Our own protocols, one object per socket (bridge/edge/streams.py, ws_connection.py).
            if isinstance(listener, WsListenerConfig):
                ws = WsListener(
                    name,
                    serve,
                    path=listener.path,
                    connect_budget=self._connect_budget,
                    max_size=listener.max_message_bytes,
                    compression=listener.compression,
                    ping_interval=listener.ping_interval_s,
                    log=log,
                )
                ws.server = await asyncio.get_running_loop().create_server(
                    ws.connection, listener.host, listener.port, ssl=ssl_context, reuse_address=True
                )
                return ws
            tcp = Listener(name, serve)
            return await asyncio.get_running_loop().create_server(
                partial(TcpConnection, tcp), listener.host, listener.port, ssl=ssl_context, reuse_address=True
            )
        except OSError as exc:
            # asyncio's strerror repeats the address: "error while attempting to bind on ...".
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenerError(name, listener.host, listener.port, reason) from exc

    # ------------------------------------------------------------------ connections

    async def _read_connect(
        self, listener_name: str, peer: object, reader: ChunkReader, writer: WriterAdapter
    ) -> Session | None:
        """The client's CONNECT as an amqtt session (not yet authenticated), or None: closed."""
        timeout = self.bridge_config.broker.connect_timeout_s
        try:
            read = await asyncio.wait_for(read_connect(reader.read_chunk, self._connect_budget), timeout)
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
        session.username = connect.username
        # amqtt's auth plugin interface takes the password as text; a token is ASCII.
        session.password = (
            connect.password.decode("utf-8", "replace") if connect.password is not None else None
        )
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
        return session

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
        incoming = await self._read_connect(listener_name, peer, reader, writer)
        if incoming is None:
            return
        handler = MarketProtocolHandler(self.plugins_manager)
        # [MQTT-3.1.2-24]: no packet within 1.5 x keep-alive means the client is gone.
        incoming.keep_alive = math.ceil(incoming.keep_alive * 1.5)
        client_id = incoming.client_id
        assert client_id is not None

        # Authenticate first: a refused CONNECT must not touch any session.
        authenticated = await self._authenticate(incoming, AmqttListenerConfig())
        decision = incoming.attributes.pop(AUTH_DECISION, None)
        incoming.password = None  # the token is not kept past this point
        if not authenticated:
            reason = decision.reason if isinstance(decision, AuthError) else "not_authorized"
            detail = decision.detail if isinstance(decision, AuthError) else "refused by auth plugin"
            code = BAD_USERNAME_PASSWORD if reason == "missing_token" else NOT_AUTHORIZED
            await self._refuse(writer, code, reason, f"client {clip(client_id)} from {peer}: {detail}")
            return
        claims = decision if isinstance(decision, Claims) else None
        user = claims.sub if claims is not None else (incoming.username or client_id)
        acl = acl_for(claims) if claims is not None else ALLOW_ALL
        if incoming.will_flag and (
            problem := will_refusal(
                acl,
                incoming.will_topic or "",
                bytes(incoming.will_message or b""),
                max_topic_bytes=self._max_topic,
            )
        ):
            # Refused now rather than dropped later: the client learns at once that its will
            # would never be published, and nothing it may not publish ever is.
            await self._refuse(writer, NOT_AUTHORIZED, "will_refused", f"client {client_id!r}: {problem}")
            return

        lock = self._client_locks.setdefault(client_id, asyncio.Lock())
        async with lock:
            owner = self._owner_of(client_id)
            if owner is not None and owner != user:
                await self._refuse(
                    writer,
                    NOT_AUTHORIZED,
                    "client_id_owned",
                    f"{clip(user)} may not use client id {clip(client_id)}",
                )
                return
            live = self._connections.get(client_id)
            lease = self.limits.acquire(user, replacing=live.lease if live is not None else None)
            if isinstance(lease, LimitRefusal):
                await self._refuse(writer, SERVER_UNAVAILABLE, lease.reason, f"{clip(user)}: {lease.detail}")
                return
            if not await self._claim_session(writer, incoming, user, lease):
                return
            session = await self._adopt_session(incoming)
            zone = await self._zone_for(user, claims)
            session.attributes.update({_OWNER: user, _ACL: acl, _CLAIMS: claims, _TZ: zone})
            if session.parent:
                self._drop_subscriptions_outside(session, acl)
            handler.attach(session, reader, writer)
            session.transitions.connect()
            self._sessions[client_id] = (session, handler)
            connection = _Connection(client_id, user, session, handler, lease, task=asyncio.current_task())
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
            handler.max_packet = settings.max_packet_bytes
            handler.publish_limit = self.bridge_config.limits.rate
            handler.dropped = self.stats.publishes_dropped
            handler.protocol_errors = self.stats.protocol_errors
            if claims is not None:
                connection.expiry = self._schedule_expiry(handler, claims)
            self._connections[client_id] = connection
            self._fanout.invalidate()
        # Logged in: full-size WebSocket messages; unread output may now reach the outbox's
        # bound (market data), plus room for a retained snapshot and amqtt's own writes.
        reader.logged_in(4 * settings.max_outbound_bytes + (1 << 20))
        self.stats.connections += 1
        self.stats.connects += 1
        _log_connected(client_id, user, peer, listener_name)
        try:
            try:
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
            log.info(
                "disconnected %s (user %s): %s", clip(client_id), clip(user), handler.end_reason or "closed"
            )
            connection.state, _ = advance(connection.state, _end_event(handler))
            await self._release(connection)

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
            await ConnackPacket.build(0, code).to_stream(writer)

    async def _zone_for(self, user: str, claims: Claims | None) -> str | None:
        """The user's zone, decided once per connection: store override, token claim, default."""
        if not self._tz_enabled:
            return None
        override = None
        if self.store is not None and claims is not None:
            try:
                override = await self.store.get_user_tz(user)
            except StoreError as exc:
                log.warning(
                    "time zone override for %s unavailable (%s): using the token's",
                    clip(user),
                    exc,
                    extra=STORE,
                )
        return override or (claims.tz if claims is not None else None) or self.bridge_config.auth.default_tz

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        """Override (None: clear) a user's zone in the store and for their live connections."""
        if tz is not None and not is_valid_zone(tz):
            raise MessageError("bad_tz", f"{tz!r} is not an IANA time zone")
        assert self.store is not None
        await self.store.set_user_tz(user, tz)
        for connection in self._connections.values():
            if connection.user == user:
                claims = session_claims(connection.session)
                connection.session.attributes[_TZ] = await self._zone_for(user, claims)
        self._fanout.invalidate()

    def _localized(self, topic: str, data: bytes, zone: str | None, memo: dict[str, bytes]) -> bytes:
        """``data`` with timestamps in ``zone``: rewritten once per zone, shared via ``memo``."""
        if zone is None or not self._tz_switch.enabled(topic):
            return data
        variant = memo.get(zone)
        if variant is None:
            result = rewrite(data, zone, fields=self._tz_fields)
            variant = memo[zone] = result.payload
            if result.rewritten:
                self.stats.tz_rewrites += 1
            else:
                self.stats.tz_passthrough += 1
        return variant

    def _retained_packet(self, topic: str, data: bytes, zone: str | None) -> bytes:
        """The QoS 0 retained PUBLISH of ``topic``'s snapshot in ``zone``, built once per zone."""
        entry = self._retained_packets.get(topic)
        if entry is None or entry[0] is not data:
            entry = self._retained_packets[topic] = (data, {})
        memo = entry[1]
        packet = memo.get(zone)
        if packet is None:
            parts = self._tick_parts.get(topic)
            if parts is not None and parts.data is data:
                payload = self._tick_variant(topic, parts, zone)
            else:
                payload = self._retained_localized(topic, data, zone)
            packet = memo[zone] = publish_qos0(topic.encode(), payload, retain=True)
        return packet

    def _retained_localized(self, topic: str, data: bytes, zone: str | None) -> bytes:
        source, memo = self._retained_variants.get(topic, (None, {}))
        if source is not data:
            memo = {}
            self._retained_variants[topic] = (data, memo)
        parts = self._tick_parts.get(topic)
        if zone is None or parts is None or parts.data is not data:
            return self._localized(topic, data, zone, memo)
        variant = memo.get(zone)
        if variant is None:
            variant = memo[zone] = self._tick_variant(topic, parts, zone)
        return variant

    def _owner_of(self, client_id: str) -> str | None:
        live = self._connections.get(client_id)
        if live is not None:
            return live.user
        stored = self._sessions.get(client_id)
        owner = stored[0].attributes.get(_OWNER) if stored is not None else None
        return owner if isinstance(owner, str) else None

    def _schedule_expiry(self, handler: MarketProtocolHandler, claims: Claims) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        # The same leeway that admitted the token bounds its life.
        delay = max(0.0, claims.exp + self.bridge_config.auth.leeway_s - self._clock())
        # No will on expiry: the client did nothing wrong on the network.
        return loop.call_later(delay, self._expire, handler)

    def _expire(self, handler: MarketProtocolHandler) -> None:
        if handler.session is not None:
            handler.session.will_flag = False
        handler.end("token_expired")

    def _drop_subscriptions_outside(self, session: Session, acl: Acl) -> None:
        """A persistent session resumed with a new token keeps only what that token allows."""
        for topic_filter in list(self._session_filters.get(session.client_id or "", ())):
            if not acl.may_subscribe(topic_filter):
                log.info(
                    "dropping %s's subscription %s: not allowed by the new token",
                    clip(session.client_id),
                    clip(topic_filter),
                )
                self._del_subscription(topic_filter, session)

    def connections_by_user(self) -> dict[str, int]:
        return self.limits.per_user()

    async def _adopt_session(self, incoming: Session) -> Session:
        """Take over a live connection, then reuse or replace the stored session."""
        client_id = incoming.client_id
        assert client_id is not None
        live = self._connections.get(client_id)
        if live is not None:
            log.info("client %s connected again: taking over its connection", clip(client_id))
            live.handler.end_reason = live.handler.end_reason or "taken_over"
            await live.handler.handle_connection_closed()
            try:
                await asyncio.wait_for(live.done.wait(), self.bridge_config.broker.takeover_timeout_s)
            except TimeoutError:
                log.warning("old connection of %s did not finish in time", clip(client_id))
                await self._release(live)
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
        if session.attributes.pop(_DISCONNECTED_AT, None) is not None and self.store is not None:
            # In use again: a broker that stops without saying must not expire it from then.
            await self._store_call("mark session connected", self.store.set_disconnected([client_id], None))
        return session

    async def _release(self, connection: _Connection) -> None:
        """Leave the session disconnected, whatever ended the connection (idempotent)."""
        if connection.state is State.CLOSED:
            return
        if connection.state is not State.DRAINING:
            # Released from outside its own task (a takeover that timed out).
            connection.state, _ = advance(connection.state, Event.CLOSED_BY_BROKER)
        client_id = connection.client_id
        if self._connections.get(client_id) is connection:
            del self._connections[client_id]
        if connection.outbox is not None:
            connection.outbox.close()
        self._fanout.invalidate()
        if connection.expiry is not None:
            connection.expiry.cancel()
        if connection.replay is not None:
            connection.replay.cancel()
        self.limits.release(connection.lease)
        session = connection.session
        registered = self._sessions.get(client_id, (None, None))[1] is connection.handler
        if session.transitions.is_connected() and registered:
            session.transitions.disconnect()
        left = registered and not session.clean_session and _DISCONNECTED_AT not in session.attributes
        if left:
            session.attributes[_DISCONNECTED_AT] = self._clock()  # its expiry counts from here
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
            owner = stored[0].attributes.get(_OWNER)
            if isinstance(owner, str):
                self._forget_session(owner, client_id)
        await super()._delete_session(client_id)

    # ------------------------------------------------------------------ session cap and expiry

    async def _claim_session(self, writer: WriterAdapter, incoming: Session, user: str, lease: Lease) -> bool:
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
                self.limits.release(lease)
            await self._refuse(writer, SERVER_UNAVAILABLE, room.reason, f"{user!r}: {room.detail}")
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
        return stored is not None and not stored[0].clean_session and stored[0].attributes.get(_OWNER) == user

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
            at = stored[0].attributes.get(_DISCONNECTED_AT)
            if not isinstance(at, int | float):
                at = stored[0].attributes[_DISCONNECTED_AT] = self._clock()
            times[client_id] = at
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

    # ------------------------------------------------------------------ inbound publishes

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message: ApplicationMessage | None = wait_deliver.result()
        if message is None:
            return True
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
            log.info(
                "client %s published to invalid topic %s: closing",
                clip(client_session.client_id),
                clip(topic),
                extra=CLIENT,
            )
            self.stats.publishes_dropped["invalid_topic"] += 1
            return False
        if not self._publish_allowed(client_session, topic):
            return True
        if topic.startswith(MARKET_PREFIX):
            try:
                tick = Tick.decode(data, topic=topic)
            except TickError as exc:
                self.stats.ticks_rejected[exc.reason] += 1
                log.warning(
                    "dropped tick from %s on %s: %s",
                    clip(client_session.client_id),
                    clip(topic),
                    clip(exc, 200),
                    extra=CLIENT,
                )
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
        if not session_acl(session).may_publish(topic):
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

    async def _route_user_publish(self, sender: Session, topic: str, data: bytes, qos: int) -> None:
        cfg = self.bridge_config.store
        try:
            envelope = open_envelope(data, default_ttl_s=cfg.default_ttl_s, max_ttl_s=MAX_TTL_S)
        except MessageError as exc:
            self.stats.publishes_dropped[exc.reason] += 1
            log.warning(
                "dropped message from %s on %s: %s",
                clip(sender.client_id),
                clip(topic),
                clip(exc, 200),
                extra=CLIENT,
            )
            return
        user = topic.split("/", 2)[1]
        result = await self.send_to_user(
            user,
            topic,
            envelope.payload,
            priority=envelope.priority,
            ttl_s=envelope.ttl_s,
            qos=max(qos, QOS_1),
        )
        owner = sender.attributes.get(_OWNER)
        if result.evicted and isinstance(owner, str):
            await self._notify_evictions(owner, user, result.evicted)

    async def _notify_evictions(self, service: str, user: str, evicted: tuple[OfflineMessage, ...]) -> None:
        """Tell the sending service what a full queue dropped, on service/<sub>/evictions."""
        notice = {
            "user": user,
            "reason": "queue_full",
            "evicted": [
                {"topic": m.topic, "priority": m.priority.name, "created_at": m.created_at, "new": m.id == ""}
                for m in evicted
            ],
        }
        payload = json.dumps(notice, separators=(",", ":")).encode()
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
        own = f"{USER_PREFIX}{user}/"
        full = topic if topic.startswith(USER_PREFIX) else own + topic
        if (
            not user
            or "/" in user
            or not full.startswith(own)
            or not is_valid_topic(full)
            or full.endswith("/")
        ):
            raise MessageError("bad_address", f"cannot address {full!r} to user {user!r}")
        ttl = self.bridge_config.store.default_ttl_s if ttl_s is None else ttl_s
        live, mailboxes = self._user_targets(user, full)
        if mailboxes:
            # The user keeps a persistent session for this topic: the message goes into their
            # mailbox first, durably, and leaves it only on their PUBACK. Whether the phone is
            # offline, online but not yet acknowledging, or the broker is killed meanwhile,
            # what the sender was told is stored stays stored until delivered.
            result = await self._enqueue(user, NewMessage(full, payload, priority, ttl, min(qos, QOS_2)))
            others = [t for t in live if not self._is_mailbox(t[0], user)]
            self._deliver_live(others, full, payload, qos)
            for session, _ in live:
                if self._is_mailbox(session, user):
                    self._pump(session)
            return SendResult(len(live), result.stored, result.evicted)
        if not live:
            self.stats.publishes_dropped["no_subscriber"] += 1
            return SendResult(0, None)
        self._deliver_live(live, full, payload, qos)
        return SendResult(len(live), None)

    async def _enqueue(self, user: str, message: NewMessage) -> EnqueueResult:
        assert self.store is not None
        started = time.perf_counter()
        try:
            result = await self.store.enqueue(user, message, now=self._clock())
        except StoreError:
            self.stats.store_errors += 1
            raise
        self.stats.store_seconds.observe(time.perf_counter() - started)
        self.stats.offline_stored += result.stored is not None
        self.stats.offline_evicted += len(result.evicted)
        if result.evicted:
            log.warning(
                "queue of %s full: evicted %d message(s)", clip(user), len(result.evicted), extra=CLIENT
            )
        return result

    @staticmethod
    def _is_mailbox(session: Session, user: str) -> bool:
        """A session that takes ``user``'s messages from their mailbox (the store)."""
        return not session.clean_session and session.attributes.get(_OWNER) == user

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
        best: dict[str, tuple[Session, int]] = {}
        for topic_filter in self._index.match(topic):
            for session, sub_qos in self._subscriptions.get(topic_filter, ()):
                key = session.client_id or ""
                if key not in best or best[key][1] < sub_qos:
                    best[key] = (session, sub_qos)
        live, mailboxes = [], False
        for session, sub_qos in best.values():
            if session.transitions.is_connected():
                live.append((session, sub_qos))
            mailboxes = mailboxes or self._is_mailbox(session, user)
        return live, mailboxes

    def _deliver_live(self, targets: list[tuple[Session, int]], topic: str, payload: bytes, qos: int) -> None:
        """To sessions that are not the user's mailbox (clean ones, other users'): once, at
        min(publish QoS, subscription QoS); a persistent one keeps it in flight until acked."""
        variants: dict[str, bytes] = {}
        for session, sub_qos in targets:
            handler = self._get_handler(session)
            if handler is None:
                continue
            localized = self._localized(topic, payload, session.attributes.get(_TZ), variants)
            task = asyncio.create_task(self._deliver_one(handler, topic, localized, min(qos, sub_qos)))
            self.stats.messages_out["user"] += 1
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _deliver_one(
        self, handler: BrokerProtocolHandler, topic: str, payload: bytes, qos: int
    ) -> None:
        try:
            await handler.mqtt_publish(topic, payload, qos, retain=False)
            self.stats.deliveries += 1
        except asyncio.CancelledError:
            # The connection closed first; a persistent session has it in flight for next time.
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise
        except Exception as exc:
            log.info("delivery on %s failed: %s", clip(topic), clip(exc, 200), extra=CLIENT)

    async def _replay_offline(self, connection: _Connection) -> None:
        assert self.store is not None
        session, handler = connection.session, connection.handler
        acl = session_acl(session)
        started = self._clock()

        def accepts(topic: str) -> bool:
            return acl.may_receive(topic) and any(
                matches(topic, f) for f in self._session_filters.get(connection.client_id, ())
            )

        if connection.wake is None:
            connection.wake = LeanEvent()
        try:
            result = await replay(
                self.store,
                connection.user,
                send=partial(self._send_stored, handler),
                accepts=accepts,
                window=self.bridge_config.store.replay_window,
                clock=self._clock,
                wake=connection.wake,
            )
        except StoreError as exc:
            log.warning("offline replay for %s stopped: %s", clip(connection.user), exc, extra=STORE)
            return
        self.stats.offline_replayed += result.replayed
        self.stats.offline_expired += result.expired
        if result.replayed or result.expired:
            log.info(
                "replayed %d offline message(s) to %s in %.3fs (%d expired, %d store bookkeeping failures)",
                result.replayed,
                clip(connection.client_id),
                self._clock() - started,
                result.expired,
                result.bookkeeping_failures,
            )

    async def _send_stored(self, handler: BrokerProtocolHandler, message: OfflineMessage) -> bool:
        """Send one stored message; True once acknowledged (QoS 1) or written (QoS 0)."""
        session = handler.session
        if session is None:
            return False
        assert isinstance(handler, MarketProtocolHandler)
        if message.id in handler.settled_ids:
            return True  # acknowledged after a reconnect re-sent it, before this replay got here
        qos = min(message.qos, self._best_qos(session, message.topic))
        in_flight = next(
            (
                m
                for m in session.inflight_out.values()
                if isinstance(m, StoredMessage) and m.store_id == message.id
            ),
            None,
        )
        try:
            if in_flight is not None and in_flight.packet_id is not None:
                # Re-sent at reconnect with its original packet id: wait for that one's ack.
                await handler.await_puback(in_flight.packet_id)
                return True
            packet_id = _mailbox_packet_id(session, message.id) if qos > QOS_0 else None
            payload = self._localized(message.topic, message.payload, session.attributes.get(_TZ), {})
            outgoing = StoredMessage(packet_id, message.topic, qos, payload, False, store_id=message.id)
            if message.sent > 0 and qos > QOS_0:
                # Delivered before without an ack (maybe before a restart): DUP ([MQTT-3.3.1-1]).
                outgoing.publish_packet = outgoing.build_publish_packet()
            outgoing.on_ack = partial(self._ack_later, handler, message)
            await handler._handle_message_flow(outgoing)
        except Exception as exc:
            log.info(
                "offline message to %s not acknowledged: %s",
                clip(session.client_id),
                clip(exc, 200),
                extra=CLIENT,
            )
            return False
        return True

    def _ack_later(self, handler: BrokerProtocolHandler, message: OfflineMessage) -> None:
        """The PUBACK of a stored message whose sending task was gone (it came after a
        reconnect re-sent it): remove it from the store now."""
        if self.store is None or handler.session is None:
            return
        user = handler.session.attributes.get(_OWNER)
        if isinstance(user, str):
            task = asyncio.create_task(
                self._store_call("remove an acknowledged message", self._ack(user, message))
            )
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _ack(self, user: str, message: OfflineMessage) -> None:
        assert self.store is not None
        await self.store.ack(user, message.id)

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
        owner = session.attributes.get(_OWNER)
        if self.store is None or session.clean_session or not isinstance(owner, str) or not session.client_id:
            return
        at = session.attributes.get(_DISCONNECTED_AT)
        record = SessionRecord(
            session.client_id,
            owner,
            dict(self._granted_filters(session)),
            disconnected_at=float(at) if isinstance(at, int | float) else None,
        )
        await self._store_call("save session", self.store.save_session(record))

    async def _store_call(self, what: str, call: Awaitable[None]) -> None:
        """Session bookkeeping must not end a connection when the store is down."""
        try:
            await call
        except StoreError as exc:
            self.stats.store_errors += 1
            log.error("store: could not %s: %s", what, exc, extra=STORE)

    async def user_subscriptions(self, user: str) -> dict[str, dict[str, int]]:
        """client id -> {filter: QoS} for ``user``'s persistent sessions (from the store)."""
        assert self.store is not None
        return {record.client_id: record.subscriptions for record in await self.store.user_sessions(user)}

    async def publish(self, tick: Tick) -> None:
        """TickSink: in-process feeds publish straight into the broker, skipping the network."""
        await self.publish_tick(tick)

    async def publish_tick(self, tick: Tick, *, qos: int = QOS_0) -> Tick:
        """Sequence, snapshot and fan out a validated tick; returns it as sent (``seq`` 0: dropped,
        no number could be given safely)."""
        if qos > QOS_1:
            seq = self._sequencer.next(tick.topic)
            if not seq:
                self.stats.publishes_dropped["seq_unreserved"] += 1
                return tick.with_seq(0)
            data = tick.encode(seq)
            self._remember(tick.topic, data, seq)
            await self._broadcast_message(None, tick.topic, data, qos)
            return tick.with_seq(seq)
        return tick.with_seq(self._publish_tick_now(tick, qos))

    def _remember(self, topic: str, data: bytes, seq: int) -> None:
        self.stats.ticks_accepted += 1
        # The snapshot is kept whatever the publisher's retain flag: a new subscriber
        # always gets the last valid tick per topic.
        self._retained_messages[topic] = RetainedApplicationMessage(None, topic, data, QOS_0)
        if self._snapshots is not None:
            self._snapshots.mark(Snapshot(topic, data, seq))

    def _publish_tick_now(self, tick: Tick, qos: int) -> int:
        """The hot path, without awaiting: stamp, snapshot, queue on every subscriber's batch.

        Returns the seq, or 0 when the tick was dropped: no number is safe to give (past its
        reservation faster than bridge.core.sequencer.OVERRUN_PER_S while the store is down).
        """
        started = time.perf_counter()
        topic = tick.topic
        seq = self._sequencer.next(topic)
        if not seq:
            self.stats.publishes_dropped["seq_unreserved"] += 1
            return 0
        head = tick.wire_head()
        second, ms = LocalClock.split(tick.ts)
        ts = self._clock_tz.utc_at(second, ms)
        tail = tick.wire_tail(seq)
        data = b"".join((head, b'"ts":"', ts.encode(), tail))
        self._remember(topic, data, seq)
        parts = self._tick_parts[topic] = _TickParts(data, head, ts, tail, second, ms)
        plan = self._fanout.plan(topic)
        if not plan.subscribers:
            return seq
        variants: dict[str | None, bytes] = {None: data}

        def localize(zone: str | None) -> bytes:
            variant = variants.get(zone)
            if variant is None:
                variant = variants[zone] = self._tick_variant(topic, parts, zone)
            return variant

        sent = self._fanout.deliver(plan, topic, qos, localize)
        for session, sub_qos in plan.slow:
            self._deliver_via_amqtt(session, topic, localize(session.attributes.get(_TZ)), min(qos, sub_qos))
        self.stats.deliveries += sent
        self.stats.messages_out["market"] += sent
        self.stats.fanout_seconds.observe(time.perf_counter() - started)
        return seq

    def _tick_variant(self, topic: str, parts: _TickParts, zone: str | None) -> bytes:
        """A tick's wire form with ``ts`` in ``zone``: what rewrite() gives, built from its parts
        instead of re-parsing JSON (tests hold them byte-for-byte equal)."""
        if zone is None:
            return parts.data
        if not self._tick_fast_tz or not self._tz_switch.enabled(topic):
            return self._localized(topic, parts.data, zone, {})
        local = self._clock_tz.local_at(parts.second, parts.ms, zone) if self._tick_ts_field else None
        self.stats.tz_rewrites += 1
        return b"".join(
            (
                parts.head,
                b'"ts":"',
                (local or parts.ts).encode(),
                parts.tail[:-1],
                b',"tz":"',
                zone.encode(),
                b'"}',
            )
        )

    def _deliver_via_amqtt(self, session: Session, topic: str, payload: bytes, qos: int) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        task = asyncio.ensure_future(handler.mqtt_publish(topic, payload, qos, retain=False))
        self._deliveries.add(task)
        task.add_done_callback(self._delivery_done)
        self.stats.messages_out[topic_class(topic)] += 1

    def _ingest(self, session: Session, topic: str, payload: bytes, qos: int) -> bool:
        """A market PUBLISH from a client's read chunk: validate and fan out now (False: close)."""
        self.stats.messages_in["market"] += 1
        if not is_valid_topic(topic):
            log.info(
                "client %s published to invalid topic %s: closing",
                clip(session.client_id),
                clip(topic),
                extra=CLIENT,
            )
            self.stats.publishes_dropped["invalid_topic"] += 1
            return False
        if not self._publish_allowed(session, topic):
            return True
        try:
            tick = Tick.decode(payload, topic=topic)
        except TickError as exc:
            self.stats.ticks_rejected[exc.reason] += 1
            log.warning(
                "dropped tick from %s on %s: %s",
                clip(session.client_id),
                clip(topic),
                clip(exc, 200),
                extra=CLIENT,
            )
            return True
        self._publish_tick_now(tick, qos)
        return True

    def _matching(self, topic: str) -> Iterator[tuple[Session, int]]:
        subscriptions = self._subscriptions
        for topic_filter in self._index.match(topic):
            yield from subscriptions.get(topic_filter, ())

    def _resolve_target(self, session: Session, sub_qos: int) -> Target | None:
        """Connected sessions only: market ticks are not queued (a returning client gets the snapshot)."""
        if not session.transitions.is_connected():
            return None
        connection = self._connections.get(session.client_id or "")
        if connection is None or connection.session is not session:
            return Target(None, session.attributes.get(_TZ), sub_qos)  # amqtt's path
        if connection.state is not State.LIVE:
            return None  # a resumed session gets the snapshots right after
        return Target(connection.outbox, session.attributes.get(_TZ), sub_qos)

    # ------------------------------------------------------------------ subscriptions

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
            return _SUBACK_FAILURE, refusal
        if not is_valid_filter(topic_filter):
            return _SUBACK_FAILURE, None  # [MQTT-4.7.1]: a bad filter is refused, never granted
        if not session_acl(session).may_subscribe(topic_filter):
            # Denied for this filter only; the rest of the SUBSCRIBE goes on.
            self.stats.subscribes_denied += 1
            log.info(
                "client %s may not subscribe to %s", clip(session.client_id), clip(topic_filter), extra=CLIENT
            )
            return _SUBACK_FAILURE, None
        if session.client_id is not None and topic_filter not in self._session_filters.get(
            session.client_id, ()
        ):
            granted = await self._add_new_subscription(subscription, session)
        else:
            granted = await super().add_subscription(subscription, session)
            if granted != _SUBACK_FAILURE:
                # amqtt keeps a repeated filter's first QoS yet acknowledges the new one; the new
                # subscription replaces the old (MQTT-3.8.4-3), so deliveries follow the SUBACK.
                entries = self._subscriptions[topic_filter]
                for index, (subscriber, qos) in enumerate(entries):
                    if subscriber.client_id == session.client_id and qos != granted:
                        entries[index] = (subscriber, granted)
        self._fanout.invalidate()
        if granted != _SUBACK_FAILURE and session.client_id is not None:
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
            return _SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        granted = min(qos, max_qos) if isinstance(max_qos, int) else qos
        self._subscriptions.setdefault(topic_filter, []).append((session, granted))
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
            if code != _SUBACK_FAILURE
        ]
        if granted:
            # Durable before acknowledged: a SUBACK'd subscription survives a crash.
            await self._persist_session(client_session)
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        for topic_filter, qos in granted:
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=qos,
            )
        await self._send_retained(client_session, handler, granted)

    async def _handle_unsubscription(
        self, client_session: Session, handler: BrokerProtocolHandler, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        await self._persist_session(client_session)

    async def _send_retained(
        self, session: Session, handler: BrokerProtocolHandler, granted: list[tuple[str, int]]
    ) -> None:
        """Each retained topic matching this SUBSCRIBE's granted filters, once, at the best QoS."""
        if not granted:
            return
        # QoS 0 snapshots (every tick's) go straight into the connection's batch, in one write.
        # One WebSocket frame may carry many MQTT packets (MQTT 3.1.1 section 6), so the
        # whole snapshot is one frame and one write.
        connection = self._connections.get(session.client_id or "")
        outbox = connection.outbox if connection is not None and connection.session is session else None
        zone = session.attributes.get(_TZ)
        packets: list[bytes] = []
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            qos = max((q for f, q in granted if matches(topic, f)), default=None)
            if qos is None:
                continue
            data = bytes(retained.data)
            qos = min(qos, retained.qos or QOS_0)
            if qos == QOS_0 and outbox is not None:
                packets.append(self._retained_packet(topic, data, zone))
                continue
            sends.append(
                handler.mqtt_publish(topic, self._retained_localized(topic, data, zone), qos, retain=True)
            )
        if packets and outbox is not None:
            outbox.push_control(b"".join(packets))
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.info(
                    "retained delivery to %s failed: %s",
                    clip(session.client_id),
                    clip(result, 200),
                    extra=CLIENT,
                )

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
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

    async def _del_all_subscriptions(self, session: Session) -> None:
        # Only this session's filters, not a scan of every filter on the broker.
        for topic_filter in list(self._session_filters.get(session.client_id or "", ())):
            self._del_subscription(topic_filter, session)

    # ------------------------------------------------------------------ fan-out

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        broadcast: dict[str, Any] = {
            "session": session,
            "topic": topic,
            "data": data,
            "queued": time.perf_counter(),
        }
        if force_qos is not None:
            broadcast["qos"] = force_qos
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data = broadcast["data"]
        if topic is None or data is None:
            return
        publish_qos: int | None = broadcast.get("qos")
        market = topic.startswith(MARKET_PREFIX)
        klass = topic_class(topic)
        variants: dict[str, bytes] = {}
        encoded: dict[tuple[str | None, bool], bytes] = {}
        topic_bytes = topic.encode()
        for topic_filter in self._index.match(topic):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                qos = sub_qos if publish_qos is None else min(publish_qos, sub_qos)
                if not target.transitions.is_connected():
                    # Market ticks are not queued: a reconnecting client gets the snapshot.
                    if qos in (QOS_1, QOS_2) and not target.clean_session and not market:
                        self._queue_offline(target, topic, data, qos)
                    continue
                zone = target.attributes.get(_TZ)
                connection = self._connections.get(target.client_id or "")
                outbox = (
                    connection.outbox if connection is not None and connection.session is target else None
                )
                if qos == QOS_0 and outbox is not None:
                    # Encoded once per (zone, transport kind), written without a task.
                    key = (zone, outbox.websocket)
                    frame = encoded.get(key)
                    if frame is None:
                        packet = encoded.get((zone, False))
                        if packet is None:
                            packet = encoded[(zone, False)] = publish_qos0(
                                topic_bytes, self._localized(topic, data, zone, variants)
                            )
                        frame = encoded[key] = ws_binary_frame(packet) if outbox.websocket else packet
                    outbox.push(topic, frame)
                    self.stats.deliveries += 1
                    self.stats.messages_out[klass] += 1
                    continue
                handler = self._get_handler(target)
                if handler is None:
                    continue
                payload = self._localized(topic, data, zone, variants)
                task = asyncio.ensure_future(handler.mqtt_publish(topic, payload, qos, retain=False))
                self._deliveries.add(task)
                task.add_done_callback(self._delivery_done)
                self.stats.messages_out[klass] += 1
        if "queued" in broadcast:
            self.stats.fanout_seconds.observe(time.perf_counter() - broadcast["queued"])

    def _delivery_done(self, task: asyncio.Task[Any]) -> None:
        self._deliveries.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.stats.deliveries += 1
        else:
            log.debug("delivery failed: %s", exc)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Replay the offline queue, each message at its QoS, only what the session may receive."""
        handler = self._get_handler(session)
        queue = session.retained_messages
        acl = session_acl(session)
        sends = []
        while handler is not None and not queue.empty():
            message = queue.get_nowait()
            if acl.may_receive(message.topic):
                data = self._localized(message.topic, bytes(message.data), session.attributes.get(_TZ), {})
                sends.append(handler.mqtt_publish(message.topic, data, message.qos, retain=False))
        for result in await asyncio.gather(*sends, return_exceptions=True):
            if isinstance(result, BaseException):
                log.info(
                    "offline replay to %s failed: %s",
                    clip(session.client_id),
                    clip(result, 200),
                    extra=CLIENT,
                )

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


# How a connection ended, from its handler: what the broker ended itself owes no will.
_BROKER_ENDS = frozenset({"token_expired", "taken_over", "shutdown"})


def _end_event(handler: MarketProtocolHandler) -> Event:
    reason = handler.end_reason
    if reason is None or reason == "closed_before_connack":
        return Event.DISCONNECT_PACKET if handler.goodbye else Event.SOCKET_CLOSED
    if reason == "keepalive":
        return Event.TIMEOUT
    if reason in _BROKER_ENDS:
        return Event.CLOSED_BY_BROKER
    return Event.PROTOCOL_ERROR  # a ProtocolError's reason, or a failed hand-off


def _mailbox_packet_id(session: Session, store_id: str) -> int:
    """A stored message's packet id, derived from its store id: the same on every delivery,
    after a reconnect or a restart ([MQTT-4.4.0-1]), unless another message in flight holds
    it (then a fresh one; the message still carries DUP)."""
    try:
        preferred = int(store_id) % 65535 + 1
    except ValueError:
        return session.next_packet_id
    if preferred in session.inflight_out or preferred in session.inflight_in:
        return session.next_packet_id
    return preferred


def _expected_startup_failure(record: logging.LogRecord) -> bool:
    """Filter for amqtt's broker logger: drop its "Broker startup failed" traceback when the
    cause is one of ours, which says in one line what failed (the CLI prints it)."""
    return not (record.exc_info and isinstance(record.exc_info[1], MarketBridgeError))


def _log_connected(client_id: str, user: str, peer: object, listener_name: str) -> None:
    # Not inlined in _serve: logging materializes its caller's frame object, and for a
    # coroutine that then waits out the whole connection that object lives as long (~270 B).
    log.info("connected %s (user %s) from %s on %s", clip(client_id), clip(user), peer, listener_name)


def _writer_closed(writer: WriterAdapter) -> bool:
    """The peer's transport is gone (uvloop raises RuntimeError writing to one, asyncio does not)."""
    if isinstance(writer, StreamConnection):
        return writer.transport.is_closing()
    return False


async def _close_quietly(writer: WriterAdapter) -> None:
    with suppress(Exception):
        await writer.close()


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tls.cafile) if tls.cafile else None
    )
    context.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    return context
