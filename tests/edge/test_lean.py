"""LeanQueue and LeanEvent behave as asyncio.Queue and asyncio.Event, at a fraction of the idle size."""

from __future__ import annotations

import asyncio
import sys

import pytest

from bridge.edge.lean import LeanEvent, LeanQueue


def _idle_bytes(queue: asyncio.Queue[int]) -> int:
    parts = [queue._getters, queue._putters, queue._finished._waiters, queue._queue]  # type: ignore[attr-defined]
    return sum(sys.getsizeof(part) for part in parts if part != ())


async def test_an_idle_queue_is_a_fraction_of_asyncios() -> None:
    lean, stdlib = LeanQueue[int](), asyncio.Queue[int]()
    assert isinstance(lean, asyncio.Queue)
    assert isinstance(lean._finished, asyncio.Event)
    assert _idle_bytes(lean) * 10 < _idle_bytes(stdlib)


async def test_get_waits_for_put_in_fifo_order_and_drained_queue_is_idle_again() -> None:
    queue = LeanQueue[int]()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    for item in (1, 2, 3):
        queue.put_nowait(item)
    assert await getter == 1
    assert [queue.get_nowait(), await queue.get()] == [2, 3]
    assert queue.empty()
    assert queue._queue == ()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_cancelled_getter_is_forgotten_and_the_next_one_is_woken() -> None:
    queue = LeanQueue[str]()
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await queue.put("x")
    assert await asyncio.wait_for(second, 1) == "x"
    assert not queue._getters


async def test_bounded_put_waits_for_room() -> None:
    queue = LeanQueue[int](maxsize=1)
    queue.put_nowait(1)
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(2)
    putter = asyncio.ensure_future(queue.put(2))
    await asyncio.sleep(0)
    assert not putter.done()
    assert queue.get_nowait() == 1
    await asyncio.wait_for(putter, 1)
    assert (queue.full(), queue.qsize(), queue.get_nowait()) == (True, 1, 2)


async def test_join_waits_for_task_done() -> None:
    queue = LeanQueue[int]()
    await asyncio.wait_for(queue.join(), 1)  # nothing unfinished
    queue.put_nowait(1)
    joiner = asyncio.ensure_future(queue.join())
    await asyncio.sleep(0)
    assert not joiner.done()
    queue.get_nowait()
    queue.task_done()
    await asyncio.wait_for(joiner, 1)


async def test_event_wakes_every_waiter_and_forgets_cancelled_ones() -> None:
    event = LeanEvent()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.gather(waiters[0], return_exceptions=True)
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1) == [True, True]
    assert not event._waiters
    event.clear()
    assert not event.is_set()
    assert "unset" in repr(event)


async def test_lean_classes_set_every_attribute_asyncios_init_sets() -> None:
    # LeanQueue and LeanEvent set asyncio's attributes themselves instead of calling its
    # __init__: a Python upgrade that adds one must fail here, not in production.
    queue, lean_queue = asyncio.Queue[int](), LeanQueue[int]()
    assert set(vars(queue)) <= set(vars(lean_queue)) | {"_finished"}
    assert isinstance(lean_queue._finished, asyncio.Event)
    assert lean_queue._finished.is_set()
    assert set(vars(asyncio.Event())) <= set(vars(LeanEvent()))
