"""What :class:`~bridge.edge.broker.MarketBroker` holds, declared once for its concept mixins.

The broker is amqtt's ``Broker`` subclass put together from one mixin per concept
(admission, listeners, sessions, subscriptions, snapshots, ticks, fan-out, zones, inbound
publishes; the user messages and the cluster glue are still in broker.py). Each mixin
derives from :class:`BrokerState`, so mypy sees the state every concept shares and the
methods one concept calls on another; the values are set by ``MarketBroker.__init__`` and
the methods are the mixins' own (the stubs exist for the type checker only).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amqtt.adapters import WriterAdapter
from amqtt.broker import Broker
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session

from bridge.auth import Claims
from bridge.cluster.limits import AsyncConnectionLimits
from bridge.cluster.link import ClusterLink
from bridge.config import BridgeConfig
from bridge.core.connection import State
from bridge.core.delivery import Pipeline
from bridge.core.hooks import Hooks
from bridge.core.lookup_batch import BatchedLookup
from bridge.core.mailbox import Mailbox
from bridge.core.origin import OriginPolicy
from bridge.core.sequencer import ReservedSequencer
from bridge.core.store import OfflineStore, SessionRecord
from bridge.core.tick import Tick, TickParts
from bridge.core.timezones import LocalClock
from bridge.core.topics import TopicIndex
from bridge.core.versioned_cache import VersionedCache
from bridge.core.zone_memo import ZoneMemo
from bridge.edge.handler import MarketProtocolHandler, TakeUser
from bridge.edge.lean import LeanEvent
from bridge.edge.outbox import Batcher, Outbox
from bridge.edge.session import context_of
from bridge.offline import SeqReserver, SnapshotWriter
from bridge.stats import BrokerStats
from bridge.store_guard import GuardedStore
from bridge.token_cache import TokenCache
from broker_plugins.auth import AnonymousAccess
from broker_plugins.timezone import TimezonePlugin

__all__ = ["SUBACK_FAILURE", "BrokerState", "LiveConnection", "log"]

# The broker's one logger, whichever concept module logs: the rate limit (bridge/logs.py)
# and operators' levels are per logger name.
log = logging.getLogger("bridge.edge.broker")

SUBACK_FAILURE = 0x80


@dataclass(eq=False, slots=True)
class LiveConnection:
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

    def describe(self) -> dict[str, Any]:
        """For the admin API's connection list (no credentials)."""
        session = self.session
        return {
            "client_id": self.client_id,
            "user": self.user,
            "remote": f"{session.remote_address}:{session.remote_port}",
            "clean_session": bool(session.clean_session),
            "tz": context_of(session).zone,
        }


class BrokerState(Broker):
    """The broker's state, by the concept that owns it (see ``MarketBroker.__init__``)."""

    # construction and lifecycle (broker.py)
    bridge_config: BridgeConfig
    store: GuardedStore | None
    mailbox: Mailbox | None
    cluster: ClusterLink | None
    limits: AsyncConnectionLimits
    tokens: TokenCache | None
    anonymous: AnonymousAccess | None
    ws_origins: OriginPolicy | None
    hooks: Hooks
    stats: BrokerStats
    draining: bool
    _clock: Callable[[], float]
    _deliveries: set[asyncio.Task[Any]]
    _batcher: Batcher
    # admission
    _connections: dict[str, LiveConnection]
    _client_locks: weakref.WeakValueDictionary[str, asyncio.Lock]
    _client_tasks: set[asyncio.Task[Any]]
    _connect_budget: int
    _max_topic: int
    # zones
    _zone_memo: ZoneMemo
    _zone_lookups: BatchedLookup[str, str]
    _zone_listing: asyncio.Task[None] | None
    _tz_enabled: bool
    _timezone: TimezonePlugin
    # sessions
    _user_sessions: dict[str, set[str]]
    # subscriptions and fan-out
    _index: TopicIndex
    _session_filters: dict[str, set[str]]
    _slots: dict[str, dict[str, int]]
    _fanout: Pipeline
    # ticks and snapshots
    _sequencer: ReservedSequencer
    _reserver: SeqReserver | None
    _snapshots: SnapshotWriter | None
    _clock_tz: LocalClock
    _tick_parts: dict[str, TickParts]
    _retained_variants: dict[str, tuple[bytes, dict[str | None, bytes]]]
    _retained_packets: dict[str, tuple[bytes, dict[str | None, bytes]]]
    _retained_version: int
    _snapshot_frames: VersionedCache[tuple[Any, ...], bytes]
    _retained_topics: int
    _snapshot_members: VersionedCache[tuple[tuple[str, int], ...], list[tuple[str, int]]]
    # user messages and the cluster glue
    _send_order: dict[str, asyncio.Lock]
    _cluster_seq: dict[str, int]

    if TYPE_CHECKING:
        # What one concept calls on another, by the module that defines it (for mypy only).
        # admission.py
        async def _refuse(self, writer: WriterAdapter, code: int, reason: str, detail: str) -> None: ...
        # sessions.py
        def _owner_of(self, client_id: str) -> str | None: ...
        async def _claim_session(
            self, writer: WriterAdapter, incoming: Session, user: str, lease: object
        ) -> bool: ...
        async def _adopt_session(self, incoming: Session) -> Session: ...
        async def _release(self, connection: LiveConnection) -> None: ...
        async def _close_taken_over(self, connection: LiveConnection) -> None: ...
        async def _materialise(self, record: SessionRecord, disconnected_at: float) -> None: ...
        # subscriptions.py
        def _del_subscription(self, a_filter: str, session: Session) -> int: ...
        # snapshots.py
        async def _send_retained(
            self, session: Session, handler: BrokerProtocolHandler, granted: list[tuple[str, int]]
        ) -> None: ...
        # zones.py
        async def _zone_for(self, user: str, claims: Claims | None, claimed: str | None) -> str | None: ...
        def _localized(
            self, topic: str, data: bytes, zone: str | None, memo: dict[str | None, bytes]
        ) -> bytes: ...
        def _tick_variant(self, topic: str, parts: TickParts, zone: str | None) -> bytes: ...
        # fanout.py
        def _deliver_message(
            self, topic: str, data: bytes, qos: int, targets: list[tuple[Session, int]], klass: str
        ) -> int: ...
        # ticks.py
        def _deliver_stamped(
            self, topic: str, seq: int, head: bytes, second: int, ms: int, qos: int, started: float
        ) -> None: ...
        async def publish_tick(self, tick: Tick, *, qos: int = QOS_0) -> Tick: ...
        def _publish_tick_now(self, tick: Tick, qos: int) -> int: ...
        async def _reserve_seq(self, store: OfflineStore, snapshots: dict[str, int]) -> None: ...
        # inbound.py
        def _ingest(self, session: Session, topic: str, payload: bytes, qos: int) -> bool: ...
        def _may_receive(self, session: Session) -> Callable[[str], bool]: ...
        def _publish_allowed(self, session: Session, topic: str) -> bool: ...
        async def _publish_will(self, session: Session) -> None: ...
        # user_messages.py
        def _take_user_publish(
            self, sender: Session, handler: MarketProtocolHandler, message: ApplicationMessage, topic: str
        ) -> bool: ...
        async def _route_user_publish(self, sender: Session, topic: str, data: bytes, qos: int) -> None: ...
        def _user_inbound(self, session: Session) -> TakeUser: ...
        async def _replay_offline(self, connection: LiveConnection) -> None: ...
        def _granted_filters(self, session: Session) -> list[tuple[str, int]]: ...
        async def _persist_session(self, session: Session) -> None: ...
        async def _store_call(self, what: str, call: Awaitable[None]) -> None: ...
        # cluster_glue.py
        def _to_cluster(self, cluster: ClusterLink, tick: Tick, qos: int) -> asyncio.Future[int]: ...
        async def _load_shared_session(self, user: str, client_id: str) -> None: ...
