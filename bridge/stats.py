"""What the broker counts: plain counters and fixed-bucket histograms, read by /metrics.

Counting is an attribute increment on the hot path; turning it into Prometheus text happens
only when scraped (bridge/metrics.py), so metrics cost nothing per delivery.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["BrokerStats", "Histogram"]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


@dataclass
class Histogram:
    """Cumulative-on-read histogram with fixed upper bounds (seconds); bounded memory."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count at or below it) pairs, ending with +Inf, as Prometheus wants."""
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class BrokerStats:
    """Counters the broker keeps; metrics and tests read them."""

    connections: int = 0
    connects: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    ticks_accepted: int = 0
    ticks_rejected: Counter[str] = field(default_factory=Counter)
    publishes_dropped: Counter[str] = field(default_factory=Counter)
    subscribes_denied: int = 0
    # Filters refused by limits.max_subscriptions_per_connection / max_topic_bytes, by reason.
    subscribes_capped: Counter[str] = field(default_factory=Counter)
    messages_in: Counter[str] = field(default_factory=Counter)  # by topic class
    messages_out: Counter[str] = field(default_factory=Counter)  # by topic class
    deliveries: int = 0
    offline_dropped: int = 0
    keepalive_timeouts: int = 0
    connect_timeouts: int = 0
    token_expiries: int = 0
    wills_published: int = 0  # wills that went through the PUBLISH checks (maybe dropped there)
    protocol_errors: Counter[str] = field(default_factory=Counter)  # connections closed, by reason
    offline_stored: int = 0
    offline_replayed: int = 0
    offline_expired: int = 0
    offline_evicted: int = 0
    offline_purged: int = 0  # queued for a user whose last persistent session went
    sessions_evicted: int = 0  # replaced by a newer one of their user (limits.max_sessions_per_user)
    sessions_expired: int = 0  # disconnected longer than broker.session_expiry_s
    store_errors: int = 0
    tz_rewrites: int = 0  # one per (message, zone): shared by every subscriber in the zone
    tz_passthrough: int = 0
    fanout_seconds: Histogram = field(default_factory=Histogram)  # queue to last write scheduled
    store_seconds: Histogram = field(default_factory=Histogram)
