"""Stopping a background task: one way for every part that runs one.

:func:`stop_task` cancels and waits. It does not swallow a cancellation of its caller: a
``suppress(CancelledError)`` around ``await task`` hides that too. An error the task ended
with is logged, not raised, so a shutdown goes on to its next part. Parts whose loop must
end even when a cancellation is swallowed inside a library also keep a stop flag their loop
checks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["stop_task"]

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: there is none) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task %s ended with %s", task.get_name(), type(error).__name__, exc_info=error)
