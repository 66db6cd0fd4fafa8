"""A broker node's link to the cluster: what a node starts when ``cluster.enabled`` is true.

It owns the backbone, the node registry, the cluster-wide connection limits with client-id
ownership and this node's control channel, and the tick bus, in the start order of
:mod:`bridge.cluster` (registry first, so an unreachable Redis fails the start; the bus
subscribed before the shared snapshots are read, so no tick falls between the two: the broker
keeps a snapshot only when nothing newer came on the bus meanwhile)::

    link = ClusterLink(config.cluster, on_tick=deliver, on_takeover=close,  # deliver(topic, seq, BusTick)
                       max_per_user=10, max_total=10_000, on_mail=deliver_here, max_mail_bytes=...)
    snapshots = await link.start()   # [(topic, seq, BusTick)]: the cluster's retained ticks
    link.publish(tick, qos)          # -> Future[int]: the cluster-wide seq
    link.limits                      # AsyncConnectionLimits counted in Redis (the auth plugin's)
    link.anonymous_limits            # the same for anonymous connections (anonymous_max given)
    await link.held_lease(client_id, user)    # the id's lease on another node (a takeover's slot)
    await link.claim(client_id, user, lease)  # None, or the Refused to send (id owned elsewhere)
    await link.unclaim(client_id, lease)
    await link.forward(user, topic, payload, qos, stored=...)  # to the user's other nodes
    link.directory                   # every node's live connections (the admin API's list)
    link.ready                       # Redis reachable and every channel subscribed
    await link.stop()

``on_tick`` gets every tick to deliver on this node, the node's own included (the bus hands
those back once stamped), so the broker delivers nothing locally on publish. Malformed
entries are counted in ``bad_ticks`` and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bridge import redis_keys as keys
from bridge.anonymous import ANONYMOUS_USER
from bridge.cluster import tickwire
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.cluster.bus import Batch, TickBus
from bridge.cluster.control import ControlListener, TakeoverNotice, UserMail, encode_control, send_control
from bridge.cluster.directory import ConnectionDirectory
from bridge.cluster.limits import ClientOwnership, ClusterConnectionLimits
from bridge.cluster.node import NodeRegistry, default_node_id
from bridge.config import ClusterConfig
from bridge.core.connect import CONNACK_NOT_AUTHORIZED, CONNACK_SERVER_UNAVAILABLE
from bridge.core.hooks import Refused
from bridge.core.tick import Tick
from bridge.errors import ClusterUnavailable
from bridge.limits import Lease
from bridge.logs import clip

__all__ = ["ClusterLink", "OnTick"]

log = logging.getLogger(__name__)

# The longest one part of the link may take to stop.
STOP_STEP_S = 3.0

OnTick = Callable[[str, int, tickwire.BusTick], None]


class ClusterLink:
    def __init__(
        self,
        config: ClusterConfig,
        *,
        on_tick: OnTick,
        on_takeover: Callable[[TakeoverNotice], None],
        max_per_user: int,
        max_total: int,
        anonymous_max: int | None = None,
        on_mail: Callable[[UserMail], None] | None = None,
        max_mail_bytes: int = 0,
        backbone: Backbone | None = None,
    ) -> None:
        self.config = config
        self.node_id = default_node_id(config.node_id)
        self.backbone = backbone or Backbone.from_config(config)
        self.registry = NodeRegistry(self.backbone, node_id=self.node_id, lease_ttl_s=config.lease_ttl_s)
        self.limits = ClusterConnectionLimits(
            self.backbone,
            node_id=self.node_id,
            max_per_user=max_per_user,
            max_total=max_total,
            lease_ttl_s=config.lease_ttl_s,
        )
        # Anonymous connections (bridge.anonymous): their own cluster-wide cap.
        self.anonymous_limits = (
            None
            if anonymous_max is None
            else ClusterConnectionLimits(
                self.backbone,
                node_id=self.node_id,
                max_per_user=anonymous_max,
                max_total=anonymous_max,
                lease_ttl_s=config.lease_ttl_s,
                global_key=keys.lease_anonymous(),
            )
        )
        self.owners = ClientOwnership(self.backbone, node_id=self.node_id)
        self.directory = ConnectionDirectory(
            self.backbone, node_id=self.node_id, lease_ttl_s=config.lease_ttl_s
        )
        self.control = ControlListener(
            self.backbone,
            node_id=self.node_id,
            on_close=on_takeover,
            on_mail=on_mail,
            max_payload=max_mail_bytes,
        )
        self.bus = TickBus(
            self.backbone, node_id=self.node_id, partitions=config.partitions, on_batch=self._batch
        )
        self._on_tick = on_tick
        self.bad_ticks = 0
        self.takeovers_sent = 0
        self.mail_forwarded = 0  # user messages sent to other nodes (one per node)
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started and self.registry.ready and self.bus.ready and self.control.ready

    @property
    def unready_reason(self) -> str | None:
        if self.ready:
            return None
        if not self.registry.ready:
            return self.registry.unready_reason
        return "not subscribed to every cluster channel"

    async def start(self) -> list[tuple[str, int, tickwire.BusTick]]:
        """Connect, register, read the shared snapshots, subscribe; raises
        :class:`~bridge.errors.ClusterUnavailable` when Redis cannot be reached."""
        try:
            with unavailable_as("join the cluster"):
                await self.backbone.connect()
                await self.registry.start()
                await self.limits.start()
                if self.anonymous_limits is not None:
                    await self.anonymous_limits.start()
                await self.directory.start()
            await self.control.start()
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
        # Each part stops whatever the others did, each within STOP_STEP_S: a node must stop
        # even when Redis is gone (a subscriber stuck closing a dead shard's connection is
        # left behind rather than holding the whole shutdown).
        limits = [self.limits] if self.anonymous_limits is None else [self.limits, self.anonymous_limits]
        steps = (
            self.bus.stop,
            self.control.stop,
            self.directory.stop,
            *(limit.stop for limit in limits),
            self.registry.stop,
            self.backbone.aclose,
        )
        for step in steps:
            task = asyncio.ensure_future(step())
            done, _ = await asyncio.wait({task}, timeout=STOP_STEP_S)
            if not done:
                task.cancel()
                # Given a moment to unwind, so no task is left pending when the loop closes.
                await asyncio.wait({task}, timeout=STOP_STEP_S)
                log.warning(
                    "cluster node %s: %s did not finish within %g s",
                    self.node_id,
                    step.__qualname__,
                    STOP_STEP_S,
                )
                continue
            exc = task.exception()
            if exc is not None:  # logged; the next part still stops
                log.warning("cluster node %s: %s on stop: %s", self.node_id, type(exc).__name__, exc)

    async def claim(self, client_id: str, user: str, lease: Lease) -> Refused | None:
        """Make this connection the client id's holder cluster-wide; another node holding it
        is told to close its connection. The Refused to send when the id is another user's
        or Redis cannot be reached (fail closed). Anonymous client ids are not recorded: each
        would be remembered for a week, a Redis key per anonymous CONNECT; the same id on two
        nodes is two connections."""
        if user == ANONYMOUS_USER:
            return None
        try:
            claim = await self.owners.claim(client_id, user, lease.id)
            if claim.action == "notify" and claim.previous is not None:
                self.takeovers_sent += 1
                await self.owners.notify_takeover(claim.previous, client_id)
        except ClusterUnavailable as exc:
            return Refused(
                CONNACK_SERVER_UNAVAILABLE, "cluster_unavailable", f"client {clip(client_id)}: {exc}"
            )
        if claim.action == "refused":
            return Refused(
                CONNACK_NOT_AUTHORIZED,
                "client_id_owned",
                f"{clip(user)} may not use client id {clip(client_id)} (another user's, cluster-wide)",
            )
        return None

    async def held_lease(self, client_id: str, user: str) -> Lease | None:
        """The lease of ``client_id``'s live connection on another node, when it is
        ``user``'s: a takeover transfers that slot instead of needing a free one."""
        try:
            holder = await self.owners.holder(client_id)
        except ClusterUnavailable:
            return None
        if holder is None or holder.user != user or holder.lease is None or holder.node == self.node_id:
            return None
        return Lease(holder.lease, user)

    async def held_alive(self, client_id: str) -> bool:
        """Whether a live node holds a connection of ``client_id`` (raises
        :class:`ClusterUnavailable` when Redis cannot be reached)."""
        holder = await self.owners.holder(client_id)
        if holder is None or holder.node is None:
            return False
        return holder.node in await self.registry.live_nodes()

    async def unclaim(self, client_id: str, lease: Lease) -> None:
        """The connection holding ``lease`` ended (a no-op when another took the id over)."""
        if lease.user == ANONYMOUS_USER:
            return
        try:
            await self.owners.release(client_id, lease.id)
        except ClusterUnavailable as exc:
            # The id stays recorded on this node; the next CONNECT with it claims it anyway.
            log.warning("cluster: could not release client id %s: %s", clip(client_id), exc)

    async def forward(self, user: str, topic: str, payload: bytes, qos: int, *, stored: bool) -> int:
        """Hand a user message accepted here to the other nodes holding ``user``'s live
        connections; how many nodes got it. Raises :class:`ClusterUnavailable` when Redis
        cannot be reached (a stored message still reaches persistent sessions at their next
        replay)."""
        nodes = await self.limits.nodes_of(user)
        nodes.discard(self.node_id)
        if not nodes:
            return 0
        message = encode_control(UserMail(user, topic, payload, qos, stored, self.node_id))
        reached = 0
        for node in sorted(nodes):
            reached += await send_control(self.backbone, node, message) > 0
        self.mail_forwarded += reached
        return reached

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
