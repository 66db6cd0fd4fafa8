"""bridge.tasks.stop_task: cancel, wait, never swallow the caller's cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.tasks import stop_task

pytestmark = pytest.mark.timeout(10)


async def test_none_is_nothing_to_stop() -> None:
    await stop_task(None)


async def test_a_running_task_is_cancelled_and_has_ended() -> None:
    cleaned = asyncio.Event()

    async def body() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that takes a step
            cleaned.set()

    task = asyncio.create_task(body())
    await asyncio.sleep(0)
    await stop_task(task)
    assert task.cancelled()
    assert cleaned.is_set()


async def test_an_error_the_task_ended_with_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        raise RuntimeError("bug")

    task = asyncio.create_task(body(), name="buggy")
    await asyncio.sleep(0)
    await stop_task(task)
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "bridge.tasks"] == [
        (logging.ERROR, "background task buggy ended with RuntimeError")
    ]


async def test_the_callers_cancellation_is_not_swallowed() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # holds its cancellation up

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task))
    await asyncio.sleep(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not task.done()  # left to end by itself
    release.set()
    await asyncio.wait([task])
    assert task.cancelled()
