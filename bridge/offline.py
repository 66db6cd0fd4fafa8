"""Offline delivery mechanics the broker drives: queue replay, snapshot write-behind and
keeping the seq reservations ahead of the sequencer.

Both talk only to the :class:`~bridge.core.store.OfflineStore` contract and to callables the
broker hands in, so they run (and are tested) without amqtt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bridge.config import StoreConfig
from bridge.core.sequencer import RENEW_S, ReservedSequencer
from bridge.core.store import (
    OfflineMessage,
    OfflineStore,
    QueueLimits,
    Snapshot,
    StoreError,
    StoreUnavailable,
)
from bridge.logs import STORE, clip
from bridge.store_guard import GuardedStore

__all__ = ["ReplayResult", "SeqReserver", "SnapshotWriter", "open_store", "replay"]

log = logging.getLogger(__name__)


async def open_store(config: StoreConfig) -> GuardedStore:
    """Redis when ``redis_url`` is set, otherwise the embedded SQLite file; every call with a
    deadline (:class:`~bridge.store_guard.GuardedStore`), and the store's own timeouts set to it."""
    limits = QueueLimits(config.queue_max_messages, config.queue_max_bytes)
    store: OfflineStore
    if config.redis_url:
        from bridge.redis_store import RedisStore  # noqa: PLC0415 - only needed with Redis

        store = await RedisStore.open(config.redis_url, limits, timeout_s=config.call_timeout_s)
        name = store.name
    else:
        from bridge.sqlite_store import SqliteStore  # noqa: PLC0415 - only needed without Redis

        store = await SqliteStore.open(Path(config.path), limits, busy_timeout_s=config.call_timeout_s)
        name = f"sqlite store {config.path}"
    return GuardedStore(
        store, name=name, call_timeout_s=config.call_timeout_s, quick_timeout_s=config.quick_timeout_s
    )


@dataclass
class ReplayResult:
    replayed: int = 0
    expired: int = 0
    complete: bool = False  # False: stopped early (disconnect, no PUBACK); the rest stays stored
    # mark_sent / ack calls the store failed; delivery went on without them (at-least-once).
    bookkeeping_failures: int = 0


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

    What is stored is delivered even when the store cannot keep its books (a full disk, Redis
    over ``maxmemory``): a failed ``mark_sent`` only means no DUP next time, a failed ``ack``
    that the message comes again next time (at-least-once); the replay goes on and logs the
    first such failure once. It stops only when the queue cannot be read, or an ``ack`` finds
    the store unreachable (the next read would too).
    """
    result = ReplayResult()
    exclude: set[str] = set()  # for another session, or delivered but still stored
    in_flight: dict[asyncio.Task[bool], OfflineMessage] = {}
    try:
        while True:
            if wake is not None:
                wake.clear()
            room = window - len(in_flight)
            exhausted = False
            while room > 0:
                pending = await store.pending(
                    user, now=clock(), limit=room, exclude=exclude | {m.id for m in in_flight.values()}
                )
                result.expired += pending.expired
                if not pending.messages:
                    exhausted = True
                    break
                batch = [m for m in pending.messages if accepts(m.topic)]
                exclude.update(m.id for m in pending.messages if not accepts(m.topic))
                if batch:
                    try:
                        await store.mark_sent(user, [m.id for m in batch])
                    except StoreError as exc:
                        _bookkeeping_failed(result, user, "mark_sent", exc)
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
                result.replayed += 1
                try:
                    await store.ack(user, message.id)
                except StoreUnavailable as exc:
                    log.warning(
                        "offline replay to %s stopped after %d message(s): %s; the rest stays stored",
                        clip(user),
                        result.replayed,
                        exc,
                        extra=STORE,
                    )
                    return result  # this one comes again too: it is still stored
                except StoreError as exc:
                    exclude.add(message.id)
                    _bookkeeping_failed(result, user, "ack", exc)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


def _bookkeeping_failed(result: ReplayResult, user: str, operation: str, exc: StoreError) -> None:
    if not result.bookkeeping_failures:
        log.warning(
            "offline replay to %s goes on without the store's bookkeeping (%s failed: %s);"
            " delivered messages may come again",
            clip(user),
            operation,
            exc,
            extra=STORE,
        )
    result.bookkeeping_failures += 1


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
            log.warning("could not save %d snapshots (will retry): %s", len(batch), exc, extra=STORE)
            return False
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
            log.warning(
                "could not reserve seq numbers for %d topics (will retry; %d past their reservation,"
                " %d refused so far): %s",
                len(batch),
                self._sequencer.overrun,
                self._sequencer.refused,
                exc,
            )
            return False
        self.writes += 1
        self._sequencer.confirmed(batch)
        return True
