"""What a feed is and where its ticks go.

A feed is an async iterable of :class:`~bridge.core.tick.Tick` (seq left at 0; whoever publishes
stamps it). A sink takes ticks: in the broker process it is the broker itself, in a
stand-alone ``market-bridge feed`` it is an MQTT publisher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from bridge.core.tick import Tick

__all__ = ["Clock", "Feed", "Sleep", "TickSink", "utc_now"]

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Feed(Protocol):
    """A source of ticks. ``name`` appears in logs and task names."""

    @property
    def name(self) -> str: ...

    def ticks(self) -> AsyncIterator[Tick]: ...


class TickSink(Protocol):
    async def publish(self, tick: Tick) -> None: ...
