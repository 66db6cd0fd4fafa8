"""Replay a recording: an NDJSON file with one tick per line, in :meth:`Tick.encode` form.

A recording is usually broker output, so a bad line (cut off by a crash, hand-edited) must not
end a demo: it is logged with its line number, counted in ``skipped`` and passed over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from bridge.core.tick import Tick
from bridge.errors import FeedError, TickError
from feeds.base import Sleep

__all__ = ["ReplayFeed", "write_ndjson"]

log = logging.getLogger(__name__)


def write_ndjson(path: str | os.PathLike[str], ticks: Iterable[Tick]) -> int:
    """Write ``ticks`` to ``path`` (replacing it), one encoded tick per line; return the count."""
    count = 0
    with Path(path).open("wb") as out:
        for tick in ticks:
            out.write(tick.encode() + b"\n")
            count += 1
    return count


def _read_lines(source: BinaryIO) -> Iterator[tuple[int, bytes]]:
    # Plain blocking reads: a local file line is tiny next to the sleeps between ticks, and
    # reading lazily keeps long recordings out of memory.
    yield from enumerate(source, start=1)


class ReplayFeed:
    """Feed yielding the ticks of an NDJSON recording.

    ``speed`` scales the original spacing (taken from consecutive ``ts`` values): 1.0 replays
    in real time, 2.0 twice as fast, 0 without waiting. Before every tick but the first the
    feed awaits ``sleep(delay)``, with a delay of 0 when there is nothing to wait for, so a
    fast replay still lets other tasks run. Ticks going back in time (e.g. the jump from the
    end of the file to its start when ``loop`` is set) are not waited for. Recorded ``seq``
    values are reset to 0: whoever publishes stamps its own.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        speed: float = 1.0,
        loop: bool = False,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not (math.isfinite(speed) and speed >= 0):
            raise FeedError("replay", f"speed must be a finite number >= 0, got {speed!r}")
        self._path = Path(path)
        # Fail at start-up rather than later inside a feed task.
        if not self._path.is_file():
            raise FeedError("replay", f"recording not found: {self._path}")
        self._speed = speed
        self._loop = loop
        self._sleep = sleep
        self.skipped = 0
        self.replayed = 0

    @property
    def name(self) -> str:
        return f"replay:{self._path.name}"

    @property
    def path(self) -> Path:
        return self._path

    def _delay(self, previous: datetime | None, current: datetime) -> float:
        if previous is None or self._speed == 0:
            return 0.0
        return max((current - previous).total_seconds(), 0.0) / self._speed

    def _parse(self, lineno: int, raw: bytes) -> Tick | None:
        line = raw.strip()
        if not line:
            return None
        try:
            return Tick.decode(line)
        except TickError as exc:
            self.skipped += 1
            log.warning("%s line %d skipped (%s): %s", self._path, lineno, exc.reason, exc.detail)
            return None

    async def ticks(self) -> AsyncIterator[Tick]:
        previous: datetime | None = None
        while True:
            produced = 0
            try:
                source = self._path.open("rb")
            except OSError as exc:
                raise FeedError("replay", f"cannot open recording {self._path}: {exc}") from exc
            with source:
                for lineno, raw in _read_lines(source):
                    tick = self._parse(lineno, raw)
                    if tick is None:
                        continue
                    if previous is not None:
                        await self._sleep(self._delay(previous, tick.ts))
                    previous = tick.ts
                    produced += 1
                    self.replayed += 1
                    yield tick.with_seq(0) if tick.seq else tick
            if not self._loop:
                return
            if not produced:
                # Looping over a file with nothing valid in it would spin forever.
                raise FeedError("replay", f"recording has no valid ticks: {self._path}")
