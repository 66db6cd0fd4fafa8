"""Per-topic sequence numbers: strictly increasing, so a subscriber can spot a gap."""

from __future__ import annotations

__all__ = ["Sequencer"]


class Sequencer:
    """Hands out ``1, 2, 3, ...`` per topic; ``resume`` continues after a known value."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def next(self, topic: str) -> int:
        seq = self._last.get(topic, 0) + 1
        self._last[topic] = seq
        return seq

    def resume(self, topic: str, last: int) -> None:
        """Never go backwards: continue after ``last`` if it is ahead of what we have."""
        if last > self._last.get(topic, 0):
            self._last[topic] = last

    def last(self, topic: str) -> int:
        return self._last.get(topic, 0)

    def __len__(self) -> int:
        return len(self._last)
