"""The market-bridge broker: amqtt 0.12.1's ``Broker`` with the paths it gets wrong owned here.

``MarketBroker`` is its construction, lifecycle (start, drain, shutdown) and one mixin per
concept, each in its own module with what it changes in its docstring (see
../shared/notes/amqtt-0.12.1.md for amqtt's defects): admission.py (CONNECT to LIVE),
listeners.py, sessions.py (the registry, caps, expiry, restore), subscriptions.py,
snapshots.py (retained), ticks.py (seq, the hot path), fanout.py, inbound.py (client
publishes and wills), zones.py, user_messages.py (the mailbox glue and the one send path for
user-addressed messages), cluster_glue.py (issue 15); state.py declares what they share. Admission, topic
permissions and connection limits are the plugins' on the named hooks
(:mod:`bridge.core.hooks`, ``broker_plugins/auth.py``), never amqtt's plugin manager.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from amqtt.errors import BrokerError

from bridge.cluster.limits import AsyncConnectionLimits, LocalAsyncLimits
from bridge.cluster.link import ClusterLink
from bridge.config import BridgeConfig
from bridge.core.delivery import Pipeline
from bridge.core.hooks import Hooks
from bridge.core.mailbox import Mailbox
from bridge.core.store import (
    OfflineStore,
)
from bridge.edge.admission import AdmissionMixin
from bridge.edge.cluster_glue import ClusterGlueMixin
from bridge.edge.fanout import FanoutMixin
from bridge.edge.inbound import InboundMixin
from bridge.edge.listeners import ListenersMixin
from bridge.edge.outbox import Batcher
from bridge.edge.session import install as install_light_sessions
from bridge.edge.sessions import SessionsMixin
from bridge.edge.snapshots import SnapshotsMixin
from bridge.edge.state import BrokerState
from bridge.edge.subscriptions import SubscriptionsMixin
from bridge.edge.ticks import TicksMixin
from bridge.edge.user_messages import SendResult, UserMessagesMixin
from bridge.edge.ws_connection import origin_policy
from bridge.edge.zones import ZonesMixin
from bridge.errors import MarketBridgeError
from bridge.limits import ConnectionLimits, LocalConnectionLimits
from bridge.logs import flush as flush_logs
from bridge.offline import SeqReserver, SnapshotWriter
from bridge.stats import BrokerStats
from bridge.store_guard import GuardedStore
from bridge.tasks import stop_task
from broker_plugins.offline_store import OfflineStorePlugin

__all__ = ["MarketBroker", "SendResult"]


log = logging.getLogger(__name__)

install_light_sessions()


class MarketBroker(
    UserMessagesMixin,
    ClusterGlueMixin,
    ListenersMixin,
    ZonesMixin,
    SnapshotsMixin,
    SubscriptionsMixin,
    SessionsMixin,
    TicksMixin,
    FanoutMixin,
    InboundMixin,
    AdmissionMixin,
    BrokerState,
):
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
                anonymous_max=(
                    config.auth.anonymous.max_connections if config.auth.anonymous.enabled else None
                ),
                on_mail=self._cluster_mail,
                max_mail_bytes=config.broker.max_packet_bytes,
            )
            self.limits = self.cluster.limits
        else:
            caps = config.limits
            local = limits or LocalConnectionLimits(caps.max_connections_per_user, caps.max_connections)
            self.limits = LocalAsyncLimits(local)
        # Admission and permissions are decided by the plugins on the named hooks, never by
        # amqtt's plugin manager (its auth and topic plugins are not called).
        # The WebSocket listener's Origin allowlist (None: any), the dashboard's origins in it.
        self.ws_origins = origin_policy(config.listeners.ws, config.http)
        self.hooks = Hooks(self._admission_plugins(config))
        amqtt_config: dict[str, Any] = {
            # amqtt insists on a 'default' listener; ours are started by _start_listeners.
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
            # Always explicit: an absent 'plugins' gives amqtt's anonymous-allowed defaults.
            "plugins": {},
        }
        super().__init__(amqtt_config)
        self.stats = BrokerStats()
        self._init_admission(config)
        self._init_zones(config)
        self._init_subscriptions()
        self._init_sessions()
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._send_order: dict[str, asyncio.Lock] = {}  # cluster: a user's sends in order
        self._init_ticks(clock)
        self._reserver_task: asyncio.Task[None] | None = None
        self.draining = False
        self._init_snapshots()
        self._snapshots: SnapshotWriter | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._batcher = Batcher(config.broker.flush_interval_ms / 1000)
        self._fanout = Pipeline(self._matching, self._resolve_target)
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
        await self._zone_lookups.aclose()
        await stop_task(self._zone_listing)
        for task in (self._expiry_task, self._flush_task, self._snapshot_task):
            await stop_task(task)
        self._expiry_task = self._flush_task = self._snapshot_task = None
        if self._snapshots is not None:
            await self._snapshots.flush()
            self._snapshots = None
        await stop_task(self._reserver_task)
        self._reserver_task = None
        if self.store is not None:
            await self._release_seq(self.store)
        if self.store is not None and self._owns_store:
            store, self.store = self.store, None
            await self._store_call("close the store", store.close())

    async def _start_listeners(self) -> None:
        # amqtt's start() has just cleared its state: restore ours before anyone can connect.
        if self.store is None:
            self.store = await OfflineStorePlugin(self.bridge_config.store).open()
        self.mailbox = Mailbox(
            self.store, window=self.bridge_config.store.replay_window, clock=self._clock, stats=self.stats
        )
        await self._restore()
        if self._tz_enabled:
            await self._list_zones()  # before anyone connects: first CONNECTs need no lookup
        if self.cluster is not None:
            await self._join_cluster(self.cluster)
        self._snapshots = SnapshotWriter(self.store, self.bridge_config.store.snapshot_flush_s)
        self._snapshot_task = asyncio.create_task(self._snapshots.run(), name="snapshot-writer")
        self._reserver = SeqReserver(self.store, self._sequencer, clock=self._clock)
        self._reserver_task = asyncio.create_task(self._reserver.run(), name="seq-reserver")
        self._flush_task = asyncio.create_task(self._flush_outboxes(), name="outbox-flusher")
        self._expiry_task = asyncio.create_task(self._expire_sessions_periodically(), name="session-expiry")
        await self._open_listeners()


def _expected_startup_failure(record: logging.LogRecord) -> bool:
    """Filter for amqtt's broker logger: drop its "Broker startup failed" traceback when the
    cause is one of ours, which says in one line what failed (the CLI prints it)."""
    return not (record.exc_info and isinstance(record.exc_info[1], MarketBridgeError))
