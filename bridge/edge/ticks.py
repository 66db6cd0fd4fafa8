"""Ticks: sequenced, snapshotted and fanned out without awaiting (the hot path).

Publishes to ``market/...`` are validated ticks; the broker stamps ``seq`` per topic and
keeps the last valid tick per topic as the retained snapshot. ``seq`` never goes backwards
or repeats across restarts, even ``kill -9``: it stays within reservations the store holds
(bridge/core/sequencer.py), written before listeners start and kept ahead in the
background. On a cluster node the bus stamps the seq instead and hands every tick back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from amqtt.broker import RetainedApplicationMessage
from amqtt.mqtt.constants import QOS_0

from bridge.cluster import tickwire
from bridge.core.sequencer import ReservedSequencer
from bridge.core.store import OfflineStore, Snapshot, StoreError
from bridge.core.tick import Tick, TickParts
from bridge.core.timezones import LocalClock
from bridge.edge.state import BrokerState, log
from bridge.errors import ClusterUnavailable
from bridge.offline import SeqReserver

__all__ = ["TicksMixin"]


class TicksMixin(BrokerState):
    """Stamping, snapshotting and fanning out ticks; the seq reservations in the store."""

    def _init_ticks(self, clock: Callable[[], float]) -> None:
        self._sequencer = ReservedSequencer(clock=clock, on_due=self._seq_due)
        self._reserver: SeqReserver | None = None
        self._clock_tz = LocalClock()

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
