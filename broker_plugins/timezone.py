"""Timezone plugin: ``on_deliver`` shows a message's timestamps in the subscriber's zone.

A thin adapter over the pure :mod:`bridge.core.timezones` (``rewrite``, ``TopicSwitch``,
``LocalClock``). The delivery pipeline calls it once per (message, zone), never per
subscriber, and shares the result with every subscriber in that zone. Ticks take
:meth:`TimezonePlugin.on_deliver_tick`: the tick is already split around its ``ts``
(:class:`~bridge.core.tick.TickParts`), so its local variant is a join, not a JSON parse;
tests hold both byte-for-byte equal to ``rewrite``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from bridge.core.tick import Tick, TickParts
from bridge.core.timezones import DEFAULT_FIELDS, LocalClock, TopicSwitch, rewrite

__all__ = ["TimezonePlugin"]

_TICK_FIELDS: Final = frozenset(Tick.model_fields)


class TimezonePlugin:
    """``on_deliver`` (bridge/core/hooks.py) for local time; ``counted(rewritten)`` is told of
    every rewrite (True) or pass-through of a payload that is not JSON (False)."""

    def __init__(
        self,
        *,
        fields: Iterable[str] = DEFAULT_FIELDS,
        rules: Iterable[tuple[str, bool]] = (),
        counted: Callable[[bool], None] | None = None,
    ) -> None:
        self._fields = frozenset(fields)
        self._switch = TopicSwitch(list(rules))
        self._counted = counted
        self._clock = LocalClock()
        # A tick is localised from its parts when ``ts`` is the only tick key rewrite()
        # would touch (the default); other field sets take the generic rewrite().
        tick_fields = self._fields & _TICK_FIELDS
        self._tick_fast = tick_fields <= {"ts"}
        self._tick_ts = "ts" in tick_fields

    def on_deliver(self, payload: bytes, zone: str | None, topic: str) -> bytes:
        """``payload`` with its timestamps in ``zone`` (None, or a topic switched off: as is)."""
        if zone is None or not self._switch.enabled(topic):
            return payload
        result = rewrite(payload, zone, fields=self._fields)
        if self._counted is not None:
            self._counted(result.rewritten)
        return result.payload

    def on_deliver_ticks(self, ticks: Sequence[tuple[str, TickParts]], zone: str) -> list[bytes]:
        """:meth:`on_deliver_tick` of each (topic, parts) in one pass, for a retained snapshot
        of many topics in one zone: the same bytes, without a call chain per topic."""
        if not self._tick_fast:
            return [self.on_deliver_tick(parts, zone, topic) for topic, parts in ticks]
        enabled = None if self._switch.always_on else self._switch.enabled
        local_at = self._clock.local_at if self._tick_ts else None
        zone_tail = b',"tz":"' + zone.encode() + b'"}'
        join = b"".join
        stamps: dict[tuple[int, int], bytes] = {}  # (second, ms) -> local ts: ticks share instants
        out: list[bytes] = []
        rewritten = 0
        for topic, parts in ticks:
            if enabled is not None and not enabled(topic):
                out.append(parts.data)
                continue
            instant = (parts.second, parts.ms)
            stamp = stamps.get(instant)
            if stamp is None:
                local = local_at(parts.second, parts.ms, zone) if local_at is not None else None
                stamp = stamps[instant] = (local or parts.ts).encode()
            out.append(join((parts.head, b'"ts":"', stamp, parts.tail[:-1], zone_tail)))
            rewritten += 1
        if self._counted is not None:
            for _ in range(rewritten):
                self._counted(True)
        return out

    def on_deliver_tick(self, parts: TickParts, zone: str | None, topic: str) -> bytes:
        """A tick's wire form in ``zone``: what :meth:`on_deliver` gives for ``parts.data``,
        built from the parts."""
        if zone is None:
            return parts.data
        if not self._tick_fast or not self._switch.enabled(topic):
            return self.on_deliver(parts.data, zone, topic)
        local = self._clock.local_at(parts.second, parts.ms, zone) if self._tick_ts else None
        if self._counted is not None:
            self._counted(True)
        return b"".join(
            (
                parts.head,
                b'"ts":"',
                (local or parts.ts).encode(),
                parts.tail[:-1],
                b',"tz":"',
                zone.encode(),
                b'"}',
            )
        )
