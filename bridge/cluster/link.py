"""A broker node's link to the cluster: what a node starts when ``cluster.enabled`` is true.

It owns the backbone, the node registry and the tick bus, in the start order of
:mod:`bridge.cluster` (registry first, so an unreachable Redis fails the start; the shared
snapshots read before the bus delivers, so no stored snapshot overwrites a newer live tick)::

    link = ClusterLink(config.cluster, on_tick=deliver)   # deliver(topic, seq, BusTick)
    snapshots = await link.start()   # [(topic, seq, BusTick)]: the cluster's retained ticks
    link.publish(tick, qos)          # -> Future[int]: the cluster-wide seq
    link.ready                       # Redis reachable and every partition subscribed
    await link.stop()

``on_tick`` gets every tick to deliver on this node, the node's own included (the bus hands
those back once stamped), so the broker delivers nothing locally on publish. Malformed
entries are counted in ``bad_ticks`` and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bridge.cluster import tickwire
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.cluster.bus import Batch, TickBus
from bridge.cluster.node import NodeRegistry, default_node_id
from bridge.config import ClusterConfig
from bridge.core.tick import Tick

__all__ = ["ClusterLink", "OnTick"]

log = logging.getLogger(__name__)

OnTick = Callable[[str, int, tickwire.BusTick], None]


class ClusterLink:
    def __init__(self, config: ClusterConfig, *, on_tick: OnTick, backbone: Backbone | None = None) -> None:
        self.config = config
        self.node_id = default_node_id(config.node_id)
        self.backbone = backbone or Backbone.from_config(config)
        self.registry = NodeRegistry(self.backbone, node_id=self.node_id, lease_ttl_s=config.lease_ttl_s)
        self.bus = TickBus(
            self.backbone, node_id=self.node_id, partitions=config.partitions, on_batch=self._batch
        )
        self._on_tick = on_tick
        self.bad_ticks = 0
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started and self.registry.ready and self.bus.ready

    @property
    def unready_reason(self) -> str | None:
        if self.ready:
            return None
        if not self.registry.ready:
            return self.registry.unready_reason
        return "not subscribed to every tick partition"

    async def start(self) -> list[tuple[str, int, tickwire.BusTick]]:
        """Connect, register, read the shared snapshots, subscribe; raises
        :class:`~bridge.errors.ClusterUnavailable` when Redis cannot be reached."""
        try:
            with unavailable_as("join the cluster"):
                await self.backbone.connect()
                await self.registry.start()
            await self.bus.start()
            stored = await self.bus.ledger.snapshots(range(self.config.partitions))
        except BaseException:
            await self.stop()
            raise
        self._started = True
        snapshots = []
        for snapshot in stored:
            parts = self._decoded(snapshot.topic, snapshot.payload)
            if parts is not None:
                snapshots.append((snapshot.topic, snapshot.seq, parts))
        log.info(
            "cluster node %s: joined (%d partitions, %d shared snapshots)",
            self.node_id,
            self.config.partitions,
            len(snapshots),
        )
        return snapshots

    async def stop(self) -> None:
        self._started = False
        await self.bus.stop()
        await self.registry.stop()
        await self.backbone.aclose()

    def publish(self, tick: Tick, qos: int) -> asyncio.Future[int]:
        return self.bus.publish(tick.topic, tickwire.encode(tick, qos))

    def _decoded(self, topic: str, payload: bytes) -> tickwire.BusTick | None:
        try:
            return tickwire.decode(payload)
        except tickwire.TickWireError as exc:
            self.bad_ticks += 1
            log.warning("cluster: dropped a tick for %r: %s", topic[:200], exc)
            return None

    def _batch(self, batch: Batch) -> None:
        for entry in batch.entries:
            parts = self._decoded(entry.topic, entry.payload)
            if parts is not None:
                self._on_tick(entry.topic, entry.seq, parts)
