"""Rate limits as pure code: no clock, no I/O, no tasks. Callers pass monotonic seconds.

- :class:`PublishBucket`: a token bucket for one connection's inbound PUBLISH rate.
- :class:`TopicGate`: at most ``max_per_s`` messages per topic to one subscriber. A message
  that comes too soon is *held*; the caller keeps the latest such message per topic
  (conflation) and arms one timer at :meth:`TopicGate.next_due`, which hands the held
  topics back through :meth:`TopicGate.release`.

Intended use by an outbox holding ``pending: dict[str, bytes]``::

    def send(topic, data):                       # on every delivery
        if gate.admit(topic, loop.time()):
            if pending.pop(topic, None) is not None:
                conflated += 1                   # a late timer: the held one is older
            write(data)
            return
        if topic in pending:
            conflated += 1
        pending[topic] = data
        arm(gate.next_due())                     # re-arm only if earlier than the armed time

    def on_timer(when):                          # the time the timer was armed for
        for topic in gate.release(max(loop.time(), when)):
            if (data := pending.pop(topic, None)) is not None:
                write(data)
        if (due := gate.next_due()) is not None:
            arm(due)

Rates are messages per second. 0 means "no limit" in configuration; the factories at the
bottom turn it into ``None`` so callers skip the check entirely. Any other rate must lie in
[:data:`MIN_RATE`, :data:`MAX_RATE`]; :func:`valid_rate` is that check, shared with the
config and the token's ``rate`` claim (this module imports neither at run time, so both can
import it).
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.auth import Claims
    from bridge.config import RateLimitConfig

__all__ = [
    "MAX_RATE",
    "MIN_RATE",
    "PublishBucket",
    "TopicGate",
    "publisher_bucket",
    "subscriber_gate",
    "subscriber_rate",
    "valid_rate",
]

# One message per 1000 s: slower is not market data, and it keeps 1/rate a small finite number.
MIN_RATE = 0.001
# Faster than any feed publishes: a higher limit could never bite.
MAX_RATE = 1_000_000.0


def valid_rate(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool) in [MIN_RATE, MAX_RATE]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        rate = float(value)
    except OverflowError:  # an int beyond float range
        return None
    # NaN fails both comparisons, infinities the range.
    return rate if MIN_RATE <= rate <= MAX_RATE else None


def _checked_rate(name: str, value: float) -> float:
    rate = valid_rate(value)
    if rate is None:
        raise ValueError(f"{name} must be from {MIN_RATE:g} to {MAX_RATE:.0f}, got {value!r}")
    return rate


class PublishBucket:
    """A token bucket: ``burst`` messages at once, refilled at ``rate_per_s``.

    Starts full, so a connecting feed can send its first ``burst`` messages at once. Over any
    window of ``d`` seconds it admits at most ``burst + rate_per_s * d`` messages. A refused
    message takes no token; counting refusals is the caller's job.
    """

    __slots__ = ("_capacity", "_last", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_RATE:
            raise ValueError(f"burst must be an integer from 1 to {MAX_RATE:.0f}, got {burst!r}")
        self.rate_per_s = _checked_rate("rate_per_s", rate_per_s)
        self.burst = burst
        self._capacity = float(burst)
        self._tokens = self._capacity
        # -inf: the first admit refills to a full bucket whatever the clock's origin.
        self._last = -math.inf

    def admit(self, now: float) -> bool:
        """Take one token at ``now`` if there is one. A ``now`` earlier than one already seen
        refills nothing (time does not run backwards here)."""
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._capacity, self._tokens + elapsed * self.rate_per_s)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds from ``now`` until :meth:`admit` would take a token (0: one is there)."""
        tokens = min(self._capacity, self._tokens + max(0.0, now - self._last) * self.rate_per_s)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s


class TopicGate:
    """At most one message per topic every ``1 / max_per_s`` seconds, for one subscriber.

    :meth:`admit` says whether a message may go now. When it may not, the topic is *held*
    until its due time (the last send plus the interval); :meth:`next_due` says when the
    earliest held topic is due and :meth:`release` hands back those that are. The gate
    holds no payloads: which message to send for a released topic (the latest) is the
    caller's. Sends of one topic, whether admitted or released, are always at least one
    interval apart; the first message on a topic always goes at once.

    Timer wakeups are batched: :meth:`next_due` is never sooner than
    ``interval / flushes_per_interval`` after the last release, so a subscriber costs at most
    ``flushes_per_interval`` wakeups per interval however many topics it holds, and a held
    message waits at most ``interval / flushes_per_interval`` past its due time.

    Time never runs backwards in a gate: a ``now`` earlier than one already seen counts as
    the latest seen. Since ``now`` comes from a monotonic clock, an earlier value is only
    ever a stale reading, and the real time is at least the latest one.

    Cost: :meth:`admit` is O(1), plus O(log h) when a topic starts being held (h: topics
    held). Memory: one float per topic seen, at most ``max_topics``, and one heap entry per
    held topic. Entries older than one interval no longer gate anything: when the table is
    full they are dropped (at most one sweep per interval, so amortised O(1)). Only when
    more than ``max_topics`` topics were sent within one interval does a new topic go
    through ungated (fails open): the limit shapes bandwidth, it is not a security boundary,
    and memory stays bounded either way. Topics are bounded anyway by the subscriber's ACL
    and the topics feeds publish, but every subscriber keeps its own gate, so a flood of
    one-off topics must not grow them all without bound.
    """

    __slots__ = (
        "_flush_gap",
        "_flushed_at",
        "_heap",
        "_held",
        "_last",
        "_next_sweep",
        "_now",
        "interval",
        "max_per_s",
        "max_topics",
    )

    def __init__(self, max_per_s: float, *, max_topics: int = 10_000, flushes_per_interval: int = 4) -> None:
        if max_topics < 1:
            raise ValueError(f"max_topics must be >= 1, got {max_topics!r}")
        if flushes_per_interval < 1:
            raise ValueError(f"flushes_per_interval must be >= 1, got {flushes_per_interval!r}")
        self.max_per_s = _checked_rate("max_per_s", max_per_s)
        self.interval = 1.0 / self.max_per_s
        self.max_topics = max_topics
        self._flush_gap = self.interval / flushes_per_interval
        self._last: dict[str, float] = {}  # topic -> time of its last send (admitted or released)
        self._held: dict[str, float] = {}  # topic -> due time; always a subset of _last's topics
        # (due, topic) for held topics; entries whose topic is no longer held at that due time
        # are stale and skipped (lazy deletion).
        self._heap: list[tuple[float, str]] = []
        self._now = -math.inf
        self._flushed_at = -math.inf
        self._next_sweep = -math.inf

    @property
    def held(self) -> int:
        """How many topics are held (each has, at the caller, a message waiting)."""
        return len(self._held)

    @property
    def tracked(self) -> int:
        """How many topics the gate remembers a send time for (memory use, for tests)."""
        return len(self._last)

    def _clock(self, now: float) -> float:
        if now < self._now:
            return self._now
        self._now = now
        return now

    def admit(self, topic: str, now: float) -> bool:
        """True: send this message now (anything the caller still holds for ``topic`` is older
        and superseded). False: hold it as ``topic``'s latest, to be released later."""
        now = self._clock(now)
        last = self._last.get(topic)
        if last is None:
            if len(self._last) >= self.max_topics and not self._make_room(now):
                return True  # too many live topics: ungated rather than unbounded (see class doc)
            self._last[topic] = now
            return True
        due = last + self.interval
        if now < due:
            if topic not in self._held:
                self._hold(topic, due)
            return False
        self._last[topic] = now
        if self._held:
            # Held, and due by now: the timer is late. This newer message replaces the held one.
            self._held.pop(topic, None)
        return True

    def next_due(self) -> float | None:
        """When to call :meth:`release` next; None when nothing is held."""
        heap, held = self._heap, self._held
        while heap and held.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale: released or re-admitted since
        if not heap:
            return None
        return max(heap[0][0], self._flushed_at + self._flush_gap)

    def release(self, now: float) -> list[str]:
        """The held topics due at ``now``, earliest due first; each counts as sent at ``now``.

        Pass the time the timer was armed for when it is later than the clock: asyncio may
        run a timer up to its clock resolution early.
        """
        now = self._clock(now)
        heap, held, last = self._heap, self._held, self._last
        released: list[str] = []
        while heap and heap[0][0] <= now:
            due, topic = heapq.heappop(heap)
            if held.get(topic) == due:
                del held[topic]
                last[topic] = now
                released.append(topic)
        if released:
            self._flushed_at = now
        return released

    def _hold(self, topic: str, due: float) -> None:
        self._held[topic] = due
        heapq.heappush(self._heap, (due, topic))
        if len(self._heap) > 2 * len(self._held) + 16:
            # Stale entries only pile up if release is not called; keep the heap O(held).
            self._heap = [(when, name) for name, when in self._held.items()]
            heapq.heapify(self._heap)

    def _make_room(self, now: float) -> bool:
        """Forget topics whose last send is an interval old (they would be admitted anyway).

        At most once per interval: entries surviving a sweep were all sent since the previous
        one, which pays for it. False when the table is still full.
        """
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self.interval
        interval, held = self.interval, self._held
        self._last = {
            topic: last for topic, last in self._last.items() if now < last + interval or topic in held
        }
        return len(self._last) < self.max_topics


# --- from configuration and token claims --------------------------------------------------------


def subscriber_rate(claims: Claims | None, cfg: RateLimitConfig) -> float | None:
    """Max updates per second per topic for a connection; None for full rate.

    A valid ``rate`` claim wins, above or below its role's configured value: the token's
    issuer decides (``bridge.auth`` refuses tokens whose ``rate`` is invalid; an invalid value
    that still gets here, e.g. from constructed claims, is ignored). Otherwise the role's
    value from ``limits.rate.topic_updates_per_s``; without claims (auth disabled) the
    ``subscriber`` role's. 0 there means full rate.
    """
    if claims is not None and (claimed := valid_rate(claims.rate)) is not None:
        return claimed
    configured = cfg.topic_updates_per_s.for_role(claims.role if claims is not None else "subscriber")
    return configured or None


def subscriber_gate(claims: Claims | None, cfg: RateLimitConfig) -> TopicGate | None:
    """A gate for a connection's deliveries, or None when it gets every update."""
    rate = subscriber_rate(claims, cfg)
    return TopicGate(rate) if rate is not None else None


def publisher_bucket(cfg: RateLimitConfig) -> PublishBucket | None:
    """A bucket for one connection's inbound PUBLISH packets, or None when unlimited.

    The same limit for every role and token: it protects the broker, whose fan-out turns
    each PUBLISH into a write per subscriber. One bucket per connection; create it on the
    connection's first PUBLISH so subscribers, which never publish, carry none.
    """
    if not cfg.publish_per_s:
        return None
    return PublishBucket(cfg.publish_per_s, cfg.publish_burst)
