"""Deadlines and failure tracking around any :class:`~bridge.core.store.OfflineStore`.

:func:`broker_plugins.offline_store.open_store` returns a :class:`GuardedStore`, and the broker wraps a
store it is given in one, so every store call the bridge makes goes through here:

- **A deadline on every call**: ``store.call_timeout_s`` (2 s), and ``store.quick_timeout_s``
  (0.5 s) for the two calls on a hot path, :meth:`GuardedStore.ping` (``/readyz``) and
  :meth:`GuardedStore.get_user_tzs` (every CONNECT, which then uses the token's zone). Past it
  the caller gets :class:`~bridge.core.store.StoreUnavailable`, the error it already handles for a
  store that is down, however the store is stuck: a SIGSTOPped or overloaded Redis, a
  stalled disk, an SQLite file locked by another process.
- **The call itself is not cut short**: it runs on in its own task and a late result is
  dropped. A store operation is never left half done (an SQLite transaction keeps the
  store's lock until it commits or rolls back, a Redis script runs whole or not at all); a
  write that missed its deadline may still land, so a sender told 503 may send again and the
  user get the message twice: at-least-once, as with a lost PUBACK. How long a late call
  lingers is bounded by the store's own timeouts (Redis socket timeouts, SQLite busy
  timeout), which :func:`~broker_plugins.offline_store.open_store` sets to the same ``call_timeout_s``.
- **Refusals are remembered**: a call the store answered with an error (not
  :class:`~bridge.core.store.StoreUnavailable`: a full disk, Redis over ``maxmemory``, a read-only
  or corrupt file) is kept as :meth:`GuardedStore.failure` for :data:`FAILURE_HOLD_S`, so
  ``/readyz`` reports a store that cannot write even while its pings answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

from bridge.core.store import (
    EnqueueResult,
    NewMessage,
    OfflineStore,
    Pending,
    SeqReservation,
    SessionRecord,
    Snapshot,
    StoreError,
    StoreUnavailable,
)

__all__ = ["CALL_TIMEOUT_S", "FAILURE_HOLD_S", "QUICK_TIMEOUT_S", "GuardedStore", "StoreFailure"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT_S: Final = 2.0
QUICK_TIMEOUT_S: Final = 0.5
# How long a refused call keeps the store reported as failing (readiness 503), however many
# calls succeed meanwhile: on a full disk small writes may pass while larger ones fail.
FAILURE_HOLD_S: Final = 30.0


@dataclass(frozen=True)
class StoreFailure:
    """The latest call the store refused: which operation, its error, when (monotonic)."""

    operation: str
    error: str
    at: float


class GuardedStore:
    """An :class:`~bridge.core.store.OfflineStore` whose calls have deadlines; see the module docstring."""

    def __init__(
        self,
        store: OfflineStore,
        *,
        name: str = "store",
        call_timeout_s: float = CALL_TIMEOUT_S,
        quick_timeout_s: float = QUICK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = store
        self.limits = store.limits
        self.name = name  # in timeout errors, e.g. "sqlite store var/market-bridge.sqlite3"
        self.call_timeout_s = call_timeout_s
        self.quick_timeout_s = quick_timeout_s
        self._clock = clock
        self._running: set[asyncio.Task[Any]] = set()
        self._abandoned: set[asyncio.Task[Any]] = set()  # their callers stopped waiting
        self._failure: StoreFailure | None = None
        self.timeouts = 0  # calls whose caller got StoreUnavailable at the deadline
        self.failures = 0  # calls the store refused with an error

    def failure(self) -> StoreFailure | None:
        """The latest call the store refused, if that was less than :data:`FAILURE_HOLD_S` ago."""
        failure = self._failure
        if failure is None or self._clock() - failure.at >= FAILURE_HOLD_S:
            return None
        return failure

    @property
    def in_flight(self) -> int:
        """Calls still running, including those whose caller stopped waiting."""
        return len(self._running)

    async def settle(self, timeout_s: float | None = None) -> bool:
        """Wait, at most ``timeout_s``, for the calls still running (those whose caller gave up
        included); True when none is left."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)
        return not self._running

    async def _call(self, operation: str, work: Coroutine[Any, Any, T], timeout_s: float) -> T:
        task = asyncio.create_task(work, name=f"store:{operation}")
        self._running.add(task)
        task.add_done_callback(partial(self._finished, operation))
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            self._abandoned.add(task)  # the caller went away; the call finishes on its own
            raise
        if not done:
            self.timeouts += 1
            self._abandoned.add(task)
            raise StoreUnavailable(f"{self.name} did not answer {operation} within {timeout_s:g}s")
        return task.result()

    def _finished(self, operation: str, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        abandoned = task in self._abandoned
        self._abandoned.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here too, so a late failure is never "unretrieved"
        if isinstance(exc, StoreUnavailable) or exc is None:
            return
        if isinstance(exc, StoreError):
            self.failures += 1
            self._failure = StoreFailure(operation, str(exc), self._clock())
        elif abandoned:  # a bug in a store, with nobody left to raise it to
            log.error("store %s failed after its deadline", operation, exc_info=exc)

    # -- the OfflineStore contract, each call with its deadline -------------------------------

    async def ping(self) -> None:
        await self._call("ping", self.inner.ping(), self.quick_timeout_s)

    async def enqueue(self, user: str, message: NewMessage, *, now: float) -> EnqueueResult:
        return await self._call("enqueue", self.inner.enqueue(user, message, now=now), self.call_timeout_s)

    async def enqueue_many(
        self, messages: Sequence[tuple[str, NewMessage]], *, now: float
    ) -> list[EnqueueResult]:
        return await self._call("enqueue", self.inner.enqueue_many(messages, now=now), self.call_timeout_s)

    async def pending(self, user: str, *, now: float, limit: int, exclude: Collection[str] = ()) -> Pending:
        return await self._call(
            "pending", self.inner.pending(user, now=now, limit=limit, exclude=exclude), self.call_timeout_s
        )

    async def mark_sent(self, user: str, message_ids: Collection[str]) -> None:
        await self._call("mark_sent", self.inner.mark_sent(user, message_ids), self.call_timeout_s)

    async def ack(self, user: str, message_id: str) -> bool:
        return await self._call("ack", self.inner.ack(user, message_id), self.call_timeout_s)

    async def ack_many(self, user: str, message_ids: Collection[str]) -> int:
        return await self._call("ack", self.inner.ack_many(user, message_ids), self.call_timeout_s)

    async def queue_size(self, user: str) -> tuple[int, int]:
        return await self._call("queue_size", self.inner.queue_size(user), self.call_timeout_s)

    async def save_session(self, record: SessionRecord) -> None:
        await self._call("save_session", self.inner.save_session(record), self.call_timeout_s)

    async def delete_session(self, client_id: str) -> None:
        await self._call("delete_session", self.inner.delete_session(client_id), self.call_timeout_s)

    async def set_disconnected(self, client_ids: Collection[str], at: float | None) -> None:
        await self._call("set_disconnected", self.inner.set_disconnected(client_ids, at), self.call_timeout_s)

    async def purge_orphaned_queue(self, user: str) -> int:
        return await self._call(
            "purge_orphaned_queue", self.inner.purge_orphaned_queue(user), self.call_timeout_s
        )

    async def load_sessions(self) -> list[SessionRecord]:
        return await self._call("load_sessions", self.inner.load_sessions(), self.call_timeout_s)

    async def user_sessions(self, user: str) -> list[SessionRecord]:
        return await self._call("user_sessions", self.inner.user_sessions(user), self.call_timeout_s)

    async def save_snapshots(self, snapshots: Collection[Snapshot]) -> None:
        await self._call("save_snapshots", self.inner.save_snapshots(snapshots), self.call_timeout_s)

    async def load_snapshots(self) -> list[Snapshot]:
        return await self._call("load_snapshots", self.inner.load_snapshots(), self.call_timeout_s)

    async def reserve_seq(self, reservations: Collection[SeqReservation]) -> None:
        await self._call("reserve_seq", self.inner.reserve_seq(reservations), self.call_timeout_s)

    async def release_seq(self, reservations: Collection[SeqReservation]) -> None:
        await self._call("release_seq", self.inner.release_seq(reservations), self.call_timeout_s)

    async def load_seq_reservations(self) -> list[SeqReservation]:
        return await self._call(
            "load_seq_reservations", self.inner.load_seq_reservations(), self.call_timeout_s
        )

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        await self._call("set_user_tz", self.inner.set_user_tz(user, tz), self.call_timeout_s)

    async def get_user_tzs(self, users: Collection[str]) -> dict[str, str]:
        return await self._call("get_user_tzs", self.inner.get_user_tzs(users), self.quick_timeout_s)

    async def list_user_tzs(self, limit: int) -> dict[str, str] | None:
        return await self._call("list_user_tzs", self.inner.list_user_tzs(limit), self.call_timeout_s)

    async def close(self) -> None:
        """Let running calls end (each is bounded by the store's own timeouts), then close the
        store, within the call deadline each; a store that does not close in time is left."""
        if not await self.settle(self.call_timeout_s):
            stuck = set(self._running)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await self._call("close", self.inner.close(), self.call_timeout_s)
