"""The broker's side of the cluster (issue 15, bridge/cluster/): joining before the
listeners open (the shared snapshots), handing accepted ticks to the bus and delivering what
it hands back, closing a connection another node took over, and resuming a persistent session
from the shared store.
"""

from __future__ import annotations

import asyncio
import time

from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.constants import QOS_0

from bridge.cluster import tickwire
from bridge.cluster.control import TakeoverNotice
from bridge.cluster.link import ClusterLink
from bridge.core.store import (
    StoreError,
)
from bridge.core.tick import Tick, TickParts
from bridge.edge.session import context_of
from bridge.edge.state import BrokerState, LiveConnection, log
from bridge.limits import Lease
from bridge.logs import STORE, clip

__all__ = ["ClusterGlueMixin"]


class ClusterGlueMixin(BrokerState):
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

    async def _hand_over(self, connection: LiveConnection) -> None:
        """Close a connection another node took over and forget its session here: the other
        node resumed it from the shared store, which this node must no longer write to."""
        session = connection.session
        # Marked as left already, so the release does not save it over the new holder's record.
        context_of(session).disconnected_at = self._clock()
        await self._close_taken_over(connection)
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
