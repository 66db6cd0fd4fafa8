"""Store write-behind the broker drives: snapshots, and keeping the seq reservations ahead of
the sequencer. (The user mailbox is :mod:`bridge.core.mailbox`; the store is opened by
:mod:`broker_plugins.offline_store`.)

Both talk only to the :class:`~bridge.core.store.OfflineStore` contract and to callables the
broker hands in, so they run (and are tested) without amqtt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress

from bridge.core.sequencer import RENEW_S, ReservedSequencer
from bridge.core.store import OfflineStore, Snapshot, StoreError
from bridge.logs import OutageLog

__all__ = ["SeqReserver", "SnapshotWriter"]

log = logging.getLogger(__name__)


class SnapshotWriter:
    """Writes market snapshots behind the fan-out, coalesced: the latest per topic wins.

    Ticks never wait on the store; if it is down, the dirty set is kept (bounded by the
    number of topics) and written when it is back.
    """

    def __init__(self, store: OfflineStore, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._dirty: dict[str, Snapshot] = {}
        self.failures = 0
        self._outage = OutageLog(log, "saving snapshots")

    def mark(self, snapshot: Snapshot) -> None:
        self._dirty[snapshot.topic] = snapshot

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    async def flush(self) -> bool:
        if not self._dirty:
            return True
        batch, self._dirty = self._dirty, {}
        try:
            await self._store.save_snapshots(list(batch.values()))
        except StoreError as exc:
            self.failures += 1
            # Keep what was not written, unless a newer tick for the topic came meanwhile.
            self._dirty = {**batch, **self._dirty}
            self._outage.failed("could not save %d snapshots (will retry): %s", len(batch), exc)
            return False
        self._outage.succeeded()
        return True


class SeqReserver:
    """Writes the sequencer's reservations: at once when a topic needs more numbers (``wake``),
    and all of them every ``renew_s`` (see :mod:`bridge.core.sequencer`).

    Ticks never wait for it. If the store is down, it retries every ``renew_s``; meanwhile the
    sequencer keeps handing out numbers within the allowance the last writes give it.
    """

    def __init__(
        self,
        store: OfflineStore,
        sequencer: ReservedSequencer,
        *,
        clock: Callable[[], float],
        renew_s: float = RENEW_S,
    ) -> None:
        self._store = store
        self._sequencer = sequencer
        self._clock = clock
        self._renew_s = renew_s
        self._wake = asyncio.Event()
        self.writes = 0
        self.failures = 0
        self._outage = OutageLog(log, "reserving seq numbers")

    def wake(self) -> None:
        """A topic needs a write (called from the hot path: cheap, no await)."""
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation.
            with suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, renewed + self._renew_s - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            renew = loop.time() >= renewed + self._renew_s
            if renew:
                renewed = loop.time()
            if not await self.write(renew=renew):
                await asyncio.sleep(self._renew_s)  # the store is down: do not spin on it

    async def write(self, *, renew: bool) -> bool:
        """One write: the due reservations, or every one with ``renew``. False if it failed."""
        batch = self._sequencer.plan(self._clock(), renew=renew)
        if not batch:
            return True
        try:
            await self._store.reserve_seq(batch)
        except StoreError as exc:
            self.failures += 1
            self._outage.failed(
                "could not reserve seq numbers for %d topics (will retry; %d past their reservation,"
                " %d refused so far): %s",
                len(batch),
                self._sequencer.overrun,
                self._sequencer.refused,
                exc,
            )
            return False
        self.writes += 1
        self._outage.succeeded()
        self._sequencer.confirmed(batch)
        return True
