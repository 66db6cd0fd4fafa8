"""Lookups asked in one event-loop step, answered by one call.

In a reconnect storm many CONNECTs ask the store for their user's zone at once. Each question
alone costs a store round trip: a hop to SQLite's thread, or a Redis command. Gathered per
loop step, they cost one call. A failed call fails every question in its batch; a caller
that goes away (its CONNECT cancelled) leaves the others' answers alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["BatchedLookup"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchedLookup(Generic[K, V]):
    """``await get(key)``: the value ``fetch`` gives for ``key`` (None: it has none).

    ``fetch`` gets the distinct keys of one loop step, at most ``max_batch`` at a time.
    """

    __slots__ = ("_closed", "_fetch", "_max_batch", "_name", "_pending", "_running", "batches", "keys")

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, name: str, max_batch: int = 500
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fetch = fetch
        self._name = name
        self._max_batch = max_batch
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # fetch calls made
        self.keys = 0  # keys asked for in them

    async def get(self, key: K) -> V | None:
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # Runs after this step's callbacks: every question asked in the step joins.
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.setdefault(key, []).append(future)
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        if self._closed:
            for futures in pending.values():
                for future in futures:
                    future.cancel()
            return
        batch: dict[K, list[asyncio.Future[V | None]]] = {}
        for key, futures in pending.items():
            if all(future.done() for future in futures):  # every asker went away
                continue
            batch[key] = futures
            if len(batch) == self._max_batch:
                self._start(batch)
                batch = {}
        if batch:
            self._start(batch)

    def _start(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        task = asyncio.create_task(self._answer(batch), name=f"{self._name}-batch")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        self.batches += 1
        self.keys += len(batch)
        try:
            found = await self._fetch(list(batch))
        except asyncio.CancelledError:
            for futures in batch.values():
                for future in futures:
                    future.cancel()
            raise
        except Exception as exc:  # the callers see the store's error, each its own way
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        for key, futures in batch.items():
            value = found.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(value)

    async def aclose(self) -> None:
        """Cancel the calls in flight and those not yet made (their callers get
        CancelledError), and wait for them."""
        self._closed = True
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
