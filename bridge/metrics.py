"""Prometheus exposition of the broker's counters, built on scrape, plus event-loop lag.

A custom collector reads :class:`~bridge.stats.BrokerStats` when ``/metrics`` is fetched,
so nothing is done per message for metrics. Each broker gets its own registry (several
brokers in one process, as in tests, never collide). A node of a cluster labels every sample
with ``node`` (its id) and adds the ``mb_cluster_*`` families; a single node is unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.stats import Histogram

if TYPE_CHECKING:
    from bridge.cluster.link import ClusterLink
    from bridge.edge.broker import MarketBroker

__all__ = ["LoopLagMonitor", "MetricsRegistry"]


class LoopLagMonitor:
    """How late the event loop wakes a timer: the whole broker's responsiveness in one number."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.last_s = 0.0
        self.max_s = 0.0
        self.histogram = Histogram()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - expected)
            self.last_s = lag
            self.max_s = max(self.max_s, lag)
            self.histogram.observe(lag)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.total)


class _BrokerCollector(Collector):
    def __init__(self, broker: MarketBroker, lag: LoopLagMonitor) -> None:
        self._broker = broker
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        stats = self._broker.stats
        yield GaugeMetricFamily("mb_connections", "Open MQTT connections", value=stats.connections)
        per_listener = GaugeMetricFamily(
            "mb_listener_connections", "Open connections per listener", labels=["listener"]
        )
        for name, count in self._broker.listener_connections().items():
            per_listener.add_metric([name], count)
        yield per_listener
        yield CounterMetricFamily("mb_connects", "Accepted CONNECTs", value=stats.connects)
        refusals = CounterMetricFamily("mb_refusals", "Refused CONNECTs by reason", labels=["reason"])
        for reason, count in sorted(stats.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        anonymous = self._broker.anonymous
        yield GaugeMetricFamily(
            "mb_anonymous_connections",
            "Open anonymous (public, read-only) connections",
            value=anonymous.connections if anonymous is not None else 0,
        )
        yield CounterMetricFamily(
            "mb_anonymous_connects",
            "Accepted anonymous CONNECTs",
            value=anonymous.admitted if anonymous is not None else 0,
        )
        yield CounterMetricFamily(
            "mb_token_expiries", "Connections closed at token exp", value=stats.token_expiries
        )
        tokens = self._broker.tokens
        cache = CounterMetricFamily(
            "mb_token_cache",
            "CONNECT tokens decided from the token cache (hit) or verified in full (miss)",
            labels=["outcome"],
        )
        cache.add_metric(["hit"], tokens.hits if tokens is not None else 0)
        cache.add_metric(["miss"], tokens.misses if tokens is not None else 0)
        yield cache
        yield GaugeMetricFamily(
            "mb_token_cache_entries",
            "Verified tokens remembered",
            value=len(tokens) if tokens is not None else 0,
        )
        yield CounterMetricFamily(
            "mb_keepalive_timeouts", "Connections dropped by keep-alive", value=stats.keepalive_timeouts
        )
        yield CounterMetricFamily(
            "mb_wills", "Wills published (then checked as PUBLISHes)", value=stats.wills_published
        )
        errors = CounterMetricFamily(
            "mb_protocol_errors", "Connections closed for a protocol violation, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.protocol_errors.items()):
            errors.add_metric([reason], count)
        yield errors
        for direction, counter in (("in", stats.messages_in), ("out", stats.messages_out)):
            family = CounterMetricFamily(
                f"mb_messages_{direction}", f"Messages {direction} by topic class", labels=["topic_class"]
            )
            for klass, count in sorted(counter.items()):
                family.add_metric([klass], count)
            yield family
        drops = CounterMetricFamily("mb_drops", "Dropped messages by reason", labels=["reason"])
        for reason, count in sorted(stats.ticks_rejected.items()):
            drops.add_metric([f"invalid_tick:{reason}"], count)
        for reason, count in sorted(stats.publishes_dropped.items()):
            drops.add_metric([reason], count)
        drops.add_metric(["subscribe_denied"], stats.subscribes_denied)
        for reason, count in sorted(stats.subscribes_capped.items()):
            drops.add_metric([f"subscribe_capped:{reason}"], count)
        drops.add_metric(["offline_queue_full"], stats.offline_dropped)
        yield drops
        offline = CounterMetricFamily("mb_offline", "Offline messages by outcome", labels=["outcome"])
        for outcome, count in (
            ("stored", stats.offline_stored),
            ("replayed", stats.offline_replayed),
            ("expired", stats.offline_expired),
            ("evicted", stats.offline_evicted),
            ("purged", stats.offline_purged),
        ):
            offline.add_metric([outcome], count)
        yield offline
        sessions = CounterMetricFamily(
            "mb_sessions_deleted", "Persistent sessions deleted by reason", labels=["reason"]
        )
        sessions.add_metric(["evicted"], stats.sessions_evicted)
        sessions.add_metric(["expired"], stats.sessions_expired)
        yield sessions
        yield CounterMetricFamily("mb_store_errors", "Store operations that failed", value=stats.store_errors)
        store = self._broker.store
        calls = CounterMetricFamily(
            "mb_store_call_failures",
            "Store calls past their deadline (timeout) or answered with an error (refused: a full"
            " disk, Redis over maxmemory, a read-only file)",
            labels=["kind"],
        )
        calls.add_metric(["timeout"], store.timeouts if store is not None else 0)
        calls.add_metric(["refused"], store.failures if store is not None else 0)
        yield calls
        yield CounterMetricFamily("mb_ticks_accepted", "Valid ticks accepted", value=stats.ticks_accepted)
        yield CounterMetricFamily(
            "mb_tz_rewrites", "Timestamp rewrites (one per message and zone)", value=stats.tz_rewrites
        )
        yield _histogram(
            "mb_fanout_seconds", "Publish queued to last delivery scheduled", stats.fanout_seconds
        )
        yield _histogram("mb_store_seconds", "Store enqueue latency", stats.store_seconds)
        yield _histogram("mb_event_loop_lag_seconds", "Event-loop timer lateness", self._lag.histogram)
        yield GaugeMetricFamily(
            "mb_event_loop_lag_max_seconds", "Largest event-loop lag seen", value=self._lag.max_s
        )


class _ClusterCollector(Collector):
    """One node of a cluster: its bus, limits and readiness, every sample of the broker's own
    families labelled with the node id (one scrape config for every node)."""

    def __init__(self, broker: MarketBroker, cluster: ClusterLink, inner: Collector) -> None:
        self._broker = broker
        self._cluster = cluster
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        node = self._cluster.node_id
        for family in itertools.chain(self._inner.collect(), self._own()):
            family.samples = [s._replace(labels={**s.labels, "node": node}) for s in family.samples]
            yield family

    def _own(self) -> Iterator[Metric]:
        cluster = self._cluster
        bus = cluster.bus.stats
        yield GaugeMetricFamily(
            "mb_cluster_ready", "Redis reachable and every channel subscribed", value=int(cluster.ready)
        )
        ticks = CounterMetricFamily("mb_cluster_ticks", "Ticks through the cluster bus", labels=["event"])
        ticks.add_metric(["published"], bus.ticks_published)
        ticks.add_metric(["delivered"], bus.entries_delivered)
        ticks.add_metric(["stale_dropped"], bus.stale_dropped)
        ticks.add_metric(["refused_full"], bus.refused_full)
        ticks.add_metric(["malformed"], cluster.bad_ticks)
        yield ticks
        batches = CounterMetricFamily(
            "mb_cluster_batches", "Bus batches (one Redis script each when published)", labels=["event"]
        )
        batches.add_metric(["published"], bus.batches_published)
        batches.add_metric(["received"], bus.batches_received)
        batches.add_metric(["publish_errors"], bus.publish_errors)
        yield batches
        yield CounterMetricFamily(
            "mb_cluster_resubscribes", "Sharded pub/sub resubscriptions", value=cluster.bus.resubscribes
        )
        yield GaugeMetricFamily(
            "mb_cluster_connections",
            "Connections counted cluster-wide (last heartbeat)",
            value=cluster.limits.total,
        )
        yield CounterMetricFamily(
            "mb_cluster_takeovers_sent",
            "Client ids taken over from another node",
            value=cluster.takeovers_sent,
        )


class MetricsRegistry:
    """The broker's metrics: ``render()`` gives Prometheus text for ``/metrics``."""

    def __init__(self, broker: MarketBroker) -> None:
        self.lag = LoopLagMonitor()
        self.registry = CollectorRegistry(auto_describe=False)
        collector: Collector = _BrokerCollector(broker, self.lag)
        if broker.cluster is not None:
            collector = _ClusterCollector(broker, broker.cluster, collector)
        self.registry.register(collector)
        self.started = time.time()

    def render(self) -> bytes:
        return generate_latest(self.registry)
