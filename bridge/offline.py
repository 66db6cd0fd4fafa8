"""Offline delivery mechanics the broker drives: queue replay and snapshot write-behind.

Both talk only to the :class:`~bridge.store.OfflineStore` contract and to callables the
broker hands in, so they run (and are tested) without amqtt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bridge.config import StoreConfig
from bridge.store import OfflineMessage, OfflineStore, QueueLimits, Snapshot, StoreError

__all__ = ["ReplayResult", "SnapshotWriter", "open_store", "replay"]

log = logging.getLogger(__name__)


async def open_store(config: StoreConfig) -> OfflineStore:
    """Redis when ``redis_url`` is set, otherwise the embedded SQLite file."""
    limits = QueueLimits(config.queue_max_messages, config.queue_max_bytes)
    if config.redis_url:
        from bridge.redis_store import RedisStore  # noqa: PLC0415 - only needed with Redis

        return await RedisStore.open(config.redis_url, limits)
    from bridge.sqlite_store import SqliteStore  # noqa: PLC0415 - only needed without Redis

    return await SqliteStore.open(Path(config.path), limits)


@dataclass
class ReplayResult:
    replayed: int = 0
    expired: int = 0
    complete: bool = False  # False: stopped early (disconnect, no PUBACK); the rest stays stored


async def replay(
    store: OfflineStore,
    user: str,
    *,
    send: Callable[[OfflineMessage], Awaitable[bool]],
    accepts: Callable[[str], bool],
    window: int,
    clock: Callable[[], float],
    wake: asyncio.Event | None = None,
) -> ReplayResult:
    """Deliver ``user``'s queue in priority order with up to ``window`` messages in flight.

    A sliding window: as soon as one message is acknowledged, or ``wake`` says a new one
    was stored, the next ones go out; one unacknowledged message never holds up the rest.
    ``send`` returns True once the client acknowledged (PUBACK); only then is the message
    removed, so anything unacknowledged when the connection drops is delivered again next
    time (``sent`` > 0, so with DUP). Messages for topics the session does not take
    (``accepts``) stay in the store for another session of the same user. Returns when the
    queue is empty and nothing is in flight, or when a send fails (the connection is gone).
    """
    result = ReplayResult()
    skipped: set[str] = set()
    in_flight: dict[asyncio.Task[bool], OfflineMessage] = {}
    try:
        while True:
            if wake is not None:
                wake.clear()
            room = window - len(in_flight)
            exhausted = False
            while room > 0:
                pending = await store.pending(
                    user, now=clock(), limit=room, exclude=skipped | {m.id for m in in_flight.values()}
                )
                result.expired += pending.expired
                if not pending.messages:
                    exhausted = True
                    break
                batch = [m for m in pending.messages if accepts(m.topic)]
                skipped.update(m.id for m in pending.messages if not accepts(m.topic))
                if batch:
                    await store.mark_sent(user, [m.id for m in batch])
                    for message in batch:
                        in_flight[asyncio.ensure_future(send(message))] = message
                    room -= len(batch)
            if not in_flight:
                if exhausted and (wake is None or not wake.is_set()):
                    result.complete = True
                    return result
                continue
            waits: set[asyncio.Future[Any]] = set(in_flight)
            woken = asyncio.ensure_future(wake.wait()) if wake is not None else None
            if woken is not None:
                waits.add(woken)
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if woken is not None:
                    woken.cancel()
            for finished in done:
                if finished is woken:
                    continue
                task = cast("asyncio.Task[bool]", finished)
                message = in_flight.pop(task)
                if task.cancelled() or task.exception() is not None or task.result() is not True:
                    return result  # not acknowledged: the connection is gone, the rest stays
                await store.ack(user, message.id)
                result.replayed += 1
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


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
            log.warning("could not save %d snapshots (will retry): %s", len(batch), exc)
            return False
        return True
