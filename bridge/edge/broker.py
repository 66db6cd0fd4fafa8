"""The market-bridge broker: amqtt 0.12.1's ``Broker`` with the paths it gets wrong owned here.

What this subclass changes (see ../shared/notes/amqtt-0.12.1.md for the defects):

- Listeners are built from :class:`~bridge.config.BridgeConfig`, each on its own (no field
  inherited from a 'default' listener), WebSocket only on its configured path, no semaphore
  that leaves clients hanging, and a taken port fails startup naming the listener.
- A connection is authenticated *before* any session is touched; a failed CONNECT wipes,
  takes over or leaves nothing. A client id belongs to the user (``sub``) whose session it
  holds. Connection limits (per user, global) refuse with CONNACK 3 at once. Takeover waits
  for the old connection to finish. A token's ``exp`` ends its connection.
- Admission, topic permissions and connection limits are the plugins' on the named hooks
  (:mod:`bridge.core.hooks`, ``broker_plugins/auth.py``), never amqtt's plugin manager: the
  ACL is decided once at CONNECT, kept in the session's context (``context_of``) and checked
  at SUBSCRIBE, PUBLISH and offline replay.
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
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import (
    ApplicationMessage,
    Session,
)
from amqtt.utils import gen_client_id
from websockets.exceptions import ConnectionClosed

from bridge.auth import Claims, TokenPolicy
from bridge.cluster import tickwire
from bridge.cluster.control import TakeoverNotice, UserMail
from bridge.cluster.limits import AsyncConnectionLimits, LocalAsyncLimits
from bridge.cluster.link import ClusterLink
from bridge.cluster.sessions import shared_verdict
from bridge.config import BridgeConfig, ListenerConfig, TlsConfig, WsListenerConfig
from bridge.core.connect import (
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    Connect,
    ConnectRefused,
    read_connect,
)
from bridge.core.connection import Event, State, advance
from bridge.core.context import ConnectionContext
from bridge.core.delivery import Encoded, Pipeline, Plan, Target, group, push_all
from bridge.core.envelope import open_envelope
from bridge.core.hooks import ConnectRequest, Hooks, Refused
from bridge.core.mailbox import Mailbox, eviction_notice, user_topic
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
from bridge.core.tick import Tick, TickParts
from bridge.core.timezones import LocalClock, is_valid_zone
from bridge.core.topics import (
    MARKET_PREFIX,
    SERVICE_PREFIX,
    USER_PREFIX,
    TopicIndex,
    is_valid_filter,
    is_valid_topic,
    matcher,
    matches,
    topic_class,
)
from bridge.core.wire import connack, publish_qos0, suback, ws_binary_frame
from bridge.edge.client_loop import client_message_loop
from bridge.edge.handler import MarketProtocolHandler, TakeUser
from bridge.edge.lean import LeanEvent
from bridge.edge.mailbox_link import HandlerLink
from bridge.edge.outbox import Batcher, Outbox
from bridge.edge.session import MarketSession, context_of
from bridge.edge.session import install as install_light_sessions
from bridge.edge.streams import ChunkReader, Listener, StreamConnection, TcpConnection
from bridge.edge.user_inbound import UserInbound
from bridge.edge.ws_connection import WsListener
from bridge.errors import (
    ClusterUnavailable,
    ListenerError,
    MarketBridgeError,
    MessageError,
    ProtocolError,
    TickError,
)
from bridge.keys import load_keyring
from bridge.limits import ConnectionLimits, Lease, LocalConnectionLimits, SubscribeRefusal, subscribe_refusal
from bridge.logs import CLIENT, STORE, clip
from bridge.logs import flush as flush_logs
from bridge.offline import SeqReserver, SnapshotWriter
from bridge.stats import BrokerStats
from bridge.store_guard import GuardedStore
from bridge.token_cache import TokenCache
from broker_plugins.auth import AllowAll, JwtAuth
from broker_plugins.offline_store import OfflineStorePlugin
from broker_plugins.timezone import TimezonePlugin

__all__ = ["MarketBroker", "SendResult"]

log = logging.getLogger(__name__)

install_light_sessions()

_SUBACK_FAILURE = 0x80
# How long a user's zone override is taken from memory before the store is asked again.
_ZONE_TTL_S = 600.0
# How long a replay the store stopped waits before it tries again.
REPLAY_RETRY_S = 1.0
# Snapshot caches (per filter set; frames also per zone and transport): few entries in
# practice, but filter sets are the clients' choice, so entries and bytes are bounded.
_SNAPSHOT_ENTRIES = 256
_SNAPSHOT_BYTES = 32 << 20
# Longest a user-addressed message may wait (an envelope may ask for less).
MAX_TTL_S = 30 * 86400.0


@dataclass(eq=False, slots=True)
class _Connection:
    """One live network connection bound to a session and its owner's connection lease."""

    client_id: str
    user: str
    session: Session
    handler: MarketProtocolHandler
    lease: object  # from the on_lease hook, given back by on_release
    replay: asyncio.Task[None] | None = None
    task: asyncio.Task[Any] | None = None  # the one serving this connection
    wake: asyncio.Event | None = None  # set when a message reaches the mailbox mid-replay
    outbox: Outbox | None = None  # direct market writes (None: amqtt's path)
    # Where it is in its life (bridge/core/connection.py). LIVE, and so in fan-out plans, only
    # once CONNACK and the resends of unacknowledged messages are out, so no new tick
    # overtakes them ([MQTT-4.6.0-1]).
    state: State = State.ADMITTED
    done: asyncio.Event = field(default_factory=LeanEvent)  # an asyncio.Event holds a 760-byte deque


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
        self.mailbox: Mailbox | None = None  # on the store, once it is open
        self._clock = clock
        auth = config.auth
        # One node of several (issue 15): ticks go through the cluster's bus, which stamps the
        # seq and hands every tick back (own ones too) to _cluster_tick; connections are
        # counted and client ids owned cluster-wide.
        self.cluster: ClusterLink | None = None
        self.limits: AsyncConnectionLimits
        if config.cluster.enabled:
            self.cluster = ClusterLink(
                config.cluster,
                on_tick=self._cluster_tick,
                on_takeover=self._cluster_takeover,
                max_per_user=config.limits.max_connections_per_user,
                max_total=config.limits.max_connections,
                on_mail=self._cluster_mail,
                max_mail_bytes=config.broker.max_packet_bytes,
            )
            self.limits = self.cluster.limits
        else:
            self.limits = LocalAsyncLimits(
                limits
                or LocalConnectionLimits(
                    config.limits.max_connections_per_user, config.limits.max_connections
                )
            )
        # One per broker, bound to its keys and policy: a reconnect verifies a token once.
        # The admin API reads its keys and policy from here (one policy for every door).
        self.tokens: TokenCache | None = None
        auth_plugin: JwtAuth | AllowAll
        if auth.enabled:
            self.tokens = TokenCache(
                load_keyring(auth), TokenPolicy.from_config(auth), max_entries=auth.token_cache_size
            )
            auth_plugin = JwtAuth(self.tokens, self.limits, max_topic_bytes=config.limits.max_topic_bytes)
        else:
            log.warning("auth is disabled: any client may connect and do anything")
            auth_plugin = AllowAll(self.limits, max_topic_bytes=config.limits.max_topic_bytes)
        # Admission and permissions are decided by the plugins on the named hooks, never by
        # amqtt's plugin manager (its auth and topic plugins are not called).
        self.hooks = Hooks([auth_plugin])
        amqtt_config: dict[str, Any] = {
            # amqtt insists on a 'default' listener; ours are started by _start_listeners.
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
            # Always explicit: an absent 'plugins' gives amqtt's anonymous-allowed defaults.
            "plugins": {},
        }
        super().__init__(amqtt_config)
        self.stats = BrokerStats()
        # user -> (their zone override from the store, "" for none; when to ask again), so a
        # reconnect does not wait on the store: bounded, oldest dropped first; set_user_tz
        # keeps it right, and a change made elsewhere (the CLI) is seen within the TTL.
        self._user_zones: dict[str, tuple[str, float]] = {}
        self._zone_writes = 0  # set_user_tz calls: a lookup that overlapped one is not kept
        # Connects since the last summary line (one INFO line per interval, not per connect).
        self._connects_logged = 0
        self._index = TopicIndex()
        self._session_filters: dict[str, set[str]] = {}
        # filter -> client id -> its place in amqtt's ``_subscriptions[filter]`` list.
        self._slots: dict[str, dict[str, int]] = {}
        self._connections: dict[str, _Connection] = {}
        self._client_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # user -> client ids of their persistent sessions, and of new ones being connected.
        self._user_sessions: dict[str, set[str]] = {}
        self._expiry_task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._send_order: dict[str, asyncio.Lock] = {}  # cluster: a user's sends in order
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
        self._timezone = TimezonePlugin(
            fields=tz.fields, rules=[(rule.filter, rule.enabled) for rule in tz.rules], counted=self._count_tz
        )
        self.hooks.register(self._timezone)  # on_deliver: once per (message, zone)
        # Retained snapshots per zone: topic -> (the payload they came from, zone -> variant);
        # a tick's are the ones its live fan-out built, so a snapshot in a zone that had
        # subscribers costs nothing more.
        self._retained_variants: dict[str, tuple[bytes, dict[str | None, bytes]]] = {}
        self._retained_packets: dict[str, tuple[bytes, dict[str | None, bytes]]] = {}
        # The last tick per topic in parts, so its snapshot is localised without parsing JSON.
        self._tick_parts: dict[str, TickParts] = {}
        self._snapshots: SnapshotWriter | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._batcher = Batcher(config.broker.flush_interval_ms / 1000)
        self._fanout = Pipeline(self._matching, self._resolve_target)
        # Retained snapshot frames per (granted filters, zone, transport): valid while
        # _retained_version is what it was when they were built (bumped on every change).
        self._retained_version = 0
        self._snapshot_frames: dict[tuple[Any, ...], tuple[int, bytes]] = {}
        self._snapshot_bytes = 0  # held by _snapshot_frames
        # Which retained topics each set of granted filters selects, at which QoS: valid
        # while _retained_topics (bumped when a topic appears or goes) is unchanged.
        self._retained_topics = 0
        self._snapshot_members: dict[tuple[tuple[str, int], ...], tuple[int, list[tuple[str, int]]]] = {}
        self._clock_tz = LocalClock()
        self._cluster_seq: dict[str, int] = {}  # topic -> last seq delivered from the bus

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
        if self.mailbox is not None:
            await self.mailbox.settle()
        if self.cluster is not None:
            await self.cluster.stop()
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
        """This node's live connections for the admin API (no credentials)."""
        return [_entry(c) for c in self._connections.values()]

    async def cluster_connections(self) -> dict[str, list[dict[str, Any]]] | None:
        """Every node's live connections (node -> list), or None without a cluster; raises
        :class:`ClusterUnavailable` when Redis cannot be reached."""
        if self.cluster is None:
            return None
        return await self.cluster.directory.listing(await self.cluster.registry.live_nodes())

    async def _start_listeners(self) -> None:
        # amqtt's start() has just cleared its state: restore ours before anyone can connect.
        if self.store is None:
            self.store = await OfflineStorePlugin(self.bridge_config.store).open()
        self.mailbox = Mailbox(
            self.store, window=self.bridge_config.store.replay_window, clock=self._clock, stats=self.stats
        )
        await self._restore()
        if self.cluster is not None:
            await self._join_cluster(self.cluster)
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
    ) -> tuple[Connect, Session] | None:
        """The client's CONNECT, and as an amqtt session (not yet authenticated), or None: closed."""
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
            self.cluster.directory.add(client_id, _entry(connection))
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

    async def _zone_for(self, user: str, claims: Claims | None, claimed: str | None) -> str | None:
        """The user's zone, decided once per connection: store override, token claim, default."""
        if not self._tz_enabled:
            return None
        override = None
        if self.store is not None and claims is not None:
            override = await self._zone_override(user)
        return override or claimed or self.bridge_config.auth.default_tz

    async def _zone_override(self, user: str) -> str | None:
        """The store's zone for ``user``, from memory for ``_ZONE_TTL_S`` after a look (a storm
        of reconnects does not queue on the store); set_user_tz here is seen at once."""
        cached = self._user_zones.get(user)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0] or None
        assert self.store is not None
        writes = self._zone_writes
        try:
            override = await self.store.get_user_tz(user)
        except StoreError as exc:
            log.warning(
                "time zone override for %s unavailable (%s): using the token's",
                clip(user),
                exc,
                extra=STORE,
            )
            return None  # not remembered: asked again at the next CONNECT
        if writes != self._zone_writes:
            return override  # may predate the write: used once, not remembered
        self._user_zones.pop(user, None)  # re-inserted last: the dict's order is its age
        if len(self._user_zones) >= self.bridge_config.limits.max_connections:
            del self._user_zones[next(iter(self._user_zones))]  # bounded: the oldest goes
        self._user_zones[user] = (override or "", now + _ZONE_TTL_S)
        return override

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        """Override (None: clear) a user's zone in the store and for their live connections."""
        if tz is not None and not is_valid_zone(tz):
            raise MessageError("bad_tz", f"{tz!r} is not an IANA time zone")
        assert self.store is not None
        self._zone_writes += 1
        self._user_zones.pop(user, None)
        try:
            await self.store.set_user_tz(user, tz)
        finally:
            # A lookup that overlapped the write is not remembered, nor one kept meanwhile.
            self._zone_writes += 1
            self._user_zones.pop(user, None)
        for connection in self._connections.values():
            if connection.user == user:
                context = context_of(connection.session)
                claims = context.claims if isinstance(context.claims, Claims) else None
                context.zone = await self._zone_for(user, claims, claims.tz if claims is not None else None)
        self._fanout.invalidate()

    def _localized(self, topic: str, data: bytes, zone: str | None, memo: dict[str | None, bytes]) -> bytes:
        """``data`` as subscribers in ``zone`` get it: the on_deliver hook (the timezone
        plugin) called once per zone, its result shared via ``memo``."""
        if zone is None:
            return data
        variant = memo.get(zone)
        if variant is None:
            variant = memo[zone] = self.hooks.on_deliver(data, zone, topic)
        return variant

    def _count_tz(self, rewritten: bool) -> None:
        if rewritten:
            self.stats.tz_rewrites += 1
        else:
            self.stats.tz_passthrough += 1

    def _retained_packet(self, topic: str, data: bytes, zone: str | None) -> bytes:
        """The QoS 0 retained PUBLISH of ``topic``'s snapshot in ``zone``, built once per zone."""
        entry = self._retained_packets.get(topic)
        if entry is None or entry[0] is not data:
            entry = self._retained_packets[topic] = (data, {})
        memo = entry[1]
        packet = memo.get(zone)
        if packet is None:
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
        return context_of(stored[0]).user if stored is not None else None

    def _schedule_expiry(self, handler: MarketProtocolHandler, claims: Claims) -> None:
        # The same leeway that admitted the token bounds its life; the handler's one timer
        # (with keep-alive) ends it then, without a will.
        delay = max(0.0, claims.exp + self.bridge_config.auth.leeway_s - self._clock())
        handler.expire_at(asyncio.get_running_loop().time() + delay)

    def _drop_subscriptions_outside(self, session: Session, context: ConnectionContext) -> None:
        """A persistent session resumed with a new token keeps only what that token allows."""
        for topic_filter in list(self._session_filters.get(session.client_id or "", ())):
            if self.hooks.on_subscribe(context, topic_filter, QOS_2) == _SUBACK_FAILURE:
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
        context = context_of(session)
        was_disconnected, context.disconnected_at = context.disconnected_at is not None, None
        if was_disconnected and self.store is not None:
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

    # ------------------------------------------------------------------ session cap and expiry

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

    # ------------------------------------------------------------------ inbound publishes

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

    def _may_receive(self, session: Session) -> Callable[[str], bool]:
        """Whether a stored or queued message on a topic may reach ``session``: the ACL is
        checked at delivery too, so nothing leaks past it (a topic is a filter of itself)."""
        context = context_of(session)
        if not context.admitted:
            return lambda topic: True
        return lambda topic: self.hooks.on_subscribe(context, topic, QOS_0) != _SUBACK_FAILURE

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

    async def _replay_offline(self, connection: _Connection) -> None:
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
        if self.cluster is None:
            return tick.with_seq(self._publish_tick_now(tick, qos))
        try:
            return tick.with_seq(await self._to_cluster(self.cluster, tick, qos))
        except ClusterUnavailable:
            return tick.with_seq(0)  # counted by _to_cluster's callback

    def _remember(self, topic: str, data: bytes, seq: int) -> None:
        self.stats.ticks_accepted += 1
        # The snapshot is kept whatever the publisher's retain flag: a new subscriber
        # always gets the last valid tick per topic.
        if topic not in self._retained_messages:
            self._retained_topics += 1
        self._retained_messages[topic] = RetainedApplicationMessage(None, topic, data, QOS_0)
        self._retained_version += 1
        if self._snapshots is not None:
            self._snapshots.mark(Snapshot(topic, data, seq))

    def _publish_tick_now(self, tick: Tick, qos: int) -> int:
        """The hot path, without awaiting: stamp, snapshot, queue on every subscriber's batch.

        Returns the seq, or 0 when the tick was dropped: no number is safe to give (past its
        reservation faster than bridge.core.sequencer.OVERRUN_PER_S while the store is down).
        """
        if self.cluster is not None:
            self._to_cluster(self.cluster, tick, qos)
            return -1
        started = time.perf_counter()
        topic = tick.topic
        seq = self._sequencer.next(topic)
        if not seq:
            self.stats.publishes_dropped["seq_unreserved"] += 1
            return 0
        second, ms = LocalClock.split(tick.ts)
        self._deliver_stamped(topic, seq, tick.wire_head(), second, ms, qos, started)
        return seq

    def _deliver_stamped(
        self, topic: str, seq: int, head: bytes, second: int, ms: int, qos: int, started: float
    ) -> None:
        """Snapshot and fan out a tick with its seq (this node's, or the cluster's)."""
        ts = self._clock_tz.utc_at(second, ms)
        tail = tickwire.wire_tail(seq)
        data = b"".join((head, b'"ts":"', ts.encode(), tail))
        self._remember(topic, data, seq)
        parts = self._tick_parts[topic] = TickParts(data, head, ts, tail, second, ms)
        variants: dict[str | None, bytes] = {None: data}

        def localize(zone: str | None) -> bytes:
            variant = variants.get(zone)
            if variant is None:
                variant = variants[zone] = self._tick_variant(topic, parts, zone)
            return variant

        sent = self._fanout.deliver(topic, qos, localize)
        self._retained_variants[topic] = (data, variants)
        if not sent:
            return
        self.stats.deliveries += sent
        self.stats.messages_out["market"] += sent
        self.stats.fanout_seconds.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ cluster (issue 15)

    async def _join_cluster(self, cluster: ClusterLink) -> None:
        """Join before the listeners open; the shared snapshots replace the local store's
        (the cluster's are the newest), unless the bus delivered a newer tick meanwhile."""
        for topic, seq, parts in await cluster.start():
            if seq <= self._cluster_seq.get(topic, 0):
                continue
            self._cluster_seq[topic] = seq
            ts = self._clock_tz.utc_at(parts.second, parts.ms)
            tail = tickwire.wire_tail(seq)
            data = b"".join((parts.head, b'"ts":"', ts.encode(), tail))
            if topic not in self._retained_messages:
                self._retained_topics += 1
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, data, QOS_0)
            self._retained_version += 1
            self._tick_parts[topic] = TickParts(data, parts.head, ts, tail, parts.second, parts.ms)

    def _to_cluster(self, cluster: ClusterLink, tick: Tick, qos: int) -> asyncio.Future[int]:
        """Hand an accepted tick to the bus: it comes back stamped through _cluster_tick."""
        future = cluster.publish(tick, qos)
        future.add_done_callback(self._cluster_published)
        return future

    def _cluster_published(self, future: asyncio.Future[int]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.stats.publishes_dropped["cluster_unavailable"] += 1

    def _cluster_takeover(self, notice: TakeoverNotice) -> None:
        """Another node took this client id over: close our connection holding that lease
        (its session is saved on release; the other node resumes it from the shared store)."""
        connection = self._connections.get(notice.client_id)
        lease = None if connection is None else connection.lease
        if connection is None or not isinstance(lease, Lease) or lease.id != notice.lease:
            return  # gone already, or a newer connection of the id: not the one to close
        log.info("client %s connected on node %s: closing it here", clip(notice.client_id), clip(notice.by))
        task = asyncio.create_task(self._hand_over(connection), name="cluster-takeover")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _hand_over(self, connection: _Connection) -> None:
        """Close a connection another node took over and forget its session here: the other
        node resumed it from the shared store, which this node must no longer write to."""
        session = connection.session
        # Marked as left already, so the release does not save it over the new holder's record.
        context_of(session).disconnected_at = self._clock()
        connection.handler.end_reason = connection.handler.end_reason or "taken_over"
        await connection.handler.handle_connection_closed()
        try:
            await asyncio.wait_for(connection.done.wait(), self.bridge_config.broker.takeover_timeout_s)
        except TimeoutError:
            await self._release(connection)
        stored = self._sessions.get(connection.client_id)
        if stored is not None and stored[0] is session and not session.clean_session:
            await self._delete_session(connection.client_id)

    async def _load_shared_session(self, user: str, client_id: str) -> None:
        """A persistent session another node may have held (the store is shared): resumed here
        with its subscriptions as the store has them, its offline queue being the shared
        store's already. This node's own copy stays when the store has nothing newer (it
        holds what the store does not: messages in flight)."""
        assert self.store is not None
        try:
            records = await self.store.user_sessions(user)
        except StoreError as exc:
            self.stats.store_errors += 1
            log.error("store: could not load the sessions of %s: %s", clip(user), exc, extra=STORE)
            return
        record = next((r for r in records if r.client_id == client_id), None)
        held = self._sessions.get(client_id)
        if held is not None and (
            record is None or record.disconnected_at != context_of(held[0]).disconnected_at
        ):
            # Resumed, changed or deleted on another node since this copy was saved.
            await self._delete_session(client_id)
            held = None
        if record is not None and held is None:
            await self._materialise(record, record.disconnected_at or self._clock())

    def _cluster_tick(self, topic: str, seq: int, parts: tickwire.BusTick) -> None:
        """Every tick of the cluster to deliver here, in seq order per topic (bridge.cluster.bus)."""
        self._cluster_seq[topic] = seq
        self._deliver_stamped(topic, seq, parts.head, parts.second, parts.ms, parts.qos, time.perf_counter())

    def _tick_variant(self, topic: str, parts: TickParts, zone: str | None) -> bytes:
        """A tick's wire form with ``ts`` in ``zone``: the timezone plugin's fast path, from
        its parts instead of re-parsing JSON (tests hold it byte-for-byte equal to rewrite())."""
        return self.hooks.on_deliver_tick(parts, zone, topic)

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
        context = context_of(session)
        if (
            context.admitted
            and self.hooks.on_subscribe(context, topic_filter, subscription[1]) == _SUBACK_FAILURE
        ):
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
            if code != _SUBACK_FAILURE
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

    async def _send_retained(
        self, session: Session, handler: BrokerProtocolHandler, granted: list[tuple[str, int]]
    ) -> None:
        """Each retained topic matching this SUBSCRIBE's granted filters, once, at the best QoS.

        One WebSocket frame may carry many MQTT packets (MQTT 3.1.1 section 6), so the QoS 0
        snapshots (every tick's) are one frame, one append to the outbox and one write; that
        frame is cached per (filters, zone, transport) until a snapshot changes.
        """
        connection = self._connections.get(session.client_id or "")
        outbox = connection.outbox if connection is not None and connection.session is session else None
        if not granted or outbox is None:
            return
        zone = context_of(session).zone
        filters = tuple(granted)
        key = (filters, zone, outbox.websocket)
        cached = self._snapshot_frames.get(key)
        if cached is not None and cached[0] == self._retained_version:
            outbox.push_message(cached[1])
            return
        packets, acked = self._snapshot_packets(self._snapshot_topics(filters), zone)
        frame = b"".join(packets)
        if frame and outbox.websocket:
            frame = ws_binary_frame(frame)
        if not acked:
            stale = self._snapshot_frames.get(key)
            held = self._snapshot_bytes + len(frame) - (len(stale[1]) if stale is not None else 0)
            if len(self._snapshot_frames) >= _SNAPSHOT_ENTRIES or held > _SNAPSHOT_BYTES:
                self._snapshot_frames.clear()  # rebuilt on the next SUBSCRIBE
                held = len(frame)
            self._snapshot_bytes = held
            self._snapshot_frames[key] = (self._retained_version, frame)
        if frame:
            outbox.push_message(frame)
        target = Plan([((zone, outbox.websocket, QOS_2), [outbox])], 1)
        for topic, data, qos in acked:
            message = Encoded(topic, partial(self._retained_localized, topic, data), retain=True)
            push_all(target, message, qos, conflate=False)

    def _snapshot_packets(
        self, chosen: list[tuple[str, int]], zone: str | None
    ) -> tuple[list[bytes], list[tuple[str, bytes, int]]]:
        """The QoS 0 retained PUBLISHes of ``chosen`` in ``zone`` (each built once per zone and
        kept), and the (topic, payload, QoS) of those sent at QoS 1/2.

        One pass: the packets a zone already has are looked up, the ticks it lacks are
        localised together (the on_deliver_ticks hook) and encoded in a second loop, so a
        cold 500-topic snapshot is not 500 trips through the per-message call chain."""
        retained_messages = self._retained_messages
        cache = self._retained_packets
        packets: list[bytes] = []
        acked: list[tuple[str, bytes, int]] = []
        missing: list[tuple[int, str, bytes]] = []  # (where in packets, topic, payload)
        for topic, granted_qos in chosen:
            retained = retained_messages.get(topic)
            if retained is None:
                continue
            data = bytes(retained.data)
            if granted_qos and retained.qos:
                acked.append((topic, data, min(granted_qos, retained.qos)))
                continue
            entry = cache.get(topic)
            packet = entry[1].get(zone) if entry is not None and entry[0] is data else None
            if packet is None:
                missing.append((len(packets), topic, data))
                packet = b""
            packets.append(packet)
        if missing:
            self._build_retained_packets(missing, zone, packets)
        return packets, acked

    def _build_retained_packets(
        self, missing: list[tuple[int, str, bytes]], zone: str | None, packets: list[bytes]
    ) -> None:
        """Fill ``packets`` at the places ``missing`` names; what :meth:`_retained_packet` does
        for one topic, for many: variants the live fan-out made are reused, the ticks without
        one localised in one hook call."""
        cache = self._retained_packets
        variants = self._retained_variants
        tick_parts = self._tick_parts
        payloads: list[bytes | None] = []
        batch: list[tuple[str, TickParts]] = []
        batched: list[int] = []  # indexes in payloads the batch fills
        for _, topic, data in missing:
            payload = None
            parts = tick_parts.get(topic)
            if zone is None or parts is None or parts.data is not data:
                payload = self._retained_localized(topic, data, zone)
            else:
                known = variants.get(topic)
                if known is not None and known[0] is data:
                    payload = known[1].get(zone)
                if payload is None:
                    batched.append(len(payloads))
                    batch.append((topic, parts))
            payloads.append(payload)
        if batch:
            assert zone is not None
            for index, (topic, parts), variant in zip(
                batched, batch, self.hooks.on_deliver_ticks(batch, zone), strict=True
            ):
                payloads[index] = variant
                known = variants.get(topic)
                if known is None or known[0] is not parts.data:
                    known = variants[topic] = (parts.data, {})
                known[1][zone] = variant
        for (at, topic, data), payload in zip(missing, payloads, strict=True):
            assert payload is not None
            name = topic.encode()
            size = 2 + len(name) + len(payload)
            # publish_qos0(name, payload, retain=True), inline: the usual 2-byte remaining length.
            if 128 <= size < 16384:
                head = bytes((0x31, size & 0x7F | 0x80, size >> 7, len(name) >> 8, len(name) & 0xFF))
                packet = b"".join((head, name, payload))
            else:
                packet = publish_qos0(name, payload, retain=True)
            entry = cache.get(topic)
            if entry is None or entry[0] is not data:
                entry = cache[topic] = (data, {})
            entry[1][zone] = packet
            packets[at] = packet

    def _snapshot_topics(self, filters: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
        """The retained topics ``filters`` select, each once at the best granted QoS."""
        known = self._snapshot_members.get(filters)
        if known is not None and known[0] == self._retained_topics:
            return known[1]
        chosen = []
        if len(filters) == 1:  # the usual SUBSCRIBE: one filter, compared as a string
            ((topic_filter, qos),) = filters
            selects = matcher(topic_filter)
            chosen = [(topic, qos) for topic in self._retained_messages if selects(topic)]
        else:
            tests = [(matcher(f), q) for f, q in filters]
            for topic in self._retained_messages:
                best = max((q for selects, q in tests if selects(topic)), default=None)
                if best is not None:
                    chosen.append((topic, best))
        if len(self._snapshot_members) >= _SNAPSHOT_ENTRIES:
            self._snapshot_members.clear()  # bounded; rebuilt on the next SUBSCRIBE
        self._snapshot_members[filters] = (self._retained_topics, chosen)
        return chosen

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

    # ------------------------------------------------------------------ fan-out

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

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        self._retained_version += 1  # cached snapshot frames are stale
        self._retained_topics += 1  # and maybe which topics there are

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


# How a connection ended, from its handler: what the broker ended itself owes no will.
_BROKER_ENDS = frozenset({"token_expired", "taken_over", "shutdown"})


def _succeeded(done: asyncio.Future[Any]) -> bool:
    return not done.cancelled() and done.exception() is None


def _end_event(handler: MarketProtocolHandler) -> Event:
    reason = handler.end_reason
    if reason is None or reason == "closed_before_connack":
        return Event.DISCONNECT_PACKET if handler.goodbye else Event.SOCKET_CLOSED
    if reason == "keepalive":
        return Event.TIMEOUT
    if reason in _BROKER_ENDS:
        return Event.CLOSED_BY_BROKER
    return Event.PROTOCOL_ERROR  # a ProtocolError's reason, or a failed hand-off


def _expected_startup_failure(record: logging.LogRecord) -> bool:
    """Filter for amqtt's broker logger: drop its "Broker startup failed" traceback when the
    cause is one of ours, which says in one line what failed (the CLI prints it)."""
    return not (record.exc_info and isinstance(record.exc_info[1], MarketBridgeError))


def _entry(connection: _Connection) -> dict[str, Any]:
    session = connection.session
    return {
        "client_id": connection.client_id,
        "user": connection.user,
        "remote": f"{session.remote_address}:{session.remote_port}",
        "clean_session": bool(session.clean_session),
        "tz": context_of(session).zone,
    }


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


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tls.cafile) if tls.cafile else None
    )
    context.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    return context
