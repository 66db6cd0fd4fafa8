"""``asyncio.Queue`` and ``asyncio.Event`` that cost a few hundred bytes while idle, not kilobytes.

asyncio keeps every waiter list, and a queue's items, in a ``collections.deque``; an empty
deque already holds a 64-slot block (``sys.getsizeof``: 760 bytes on CPython 3.11, an empty
list 56). A Queue has four of them (items, getters, putters and its ``join()`` Event's
waiters): ~3 KB before the first item. amqtt gives every connection four Queues (two per
Session, two per broker handler), almost always empty: ~12 KB of an idle connection's ~40 KB.

:class:`LeanQueue` and :class:`LeanEvent` are the stdlib classes with those containers
swapped: waiters in a list (there is rarely more than one), items in a deque created on the
first ``put`` and dropped when the queue drains. Same API, same ``isinstance``; only the
containers behind the hooks asyncio itself uses (``_init``/``_put``/``_get``, ``_queue``,
the ``_getters``/``_putters``/``_waiters`` lists) change, and tests/edge/test_lean.py runs both
classes through their blocking, cancelling and bounded paths so a Python upgrade that moves
those internals fails there.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from typing import Any, TypeVar

__all__ = ["TIMER_CONTEXT", "LeanEvent", "LeanQueue", "SmallDeque"]

# The context per-connection timers run in: asyncio copies the current one for every
# ``call_later`` otherwise (a Context object per timer per connection). Nothing of ours
# sets context variables; the callbacks that get it (keep-alive, token expiry) set none.
TIMER_CONTEXT = contextvars.Context()

_T = TypeVar("_T")


class SmallDeque(list[Any]):
    """A list that answers the deque calls asyncio and websockets make on their waiter lists
    (``append``, ``popleft``, ``remove``, ``extend``): for the few items they hold, an empty
    one costs 56 bytes instead of 760."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class LeanEvent(asyncio.Event):
    def __init__(self) -> None:
        # asyncio.Event.__init__'s two attributes, without the deque it would make and drop
        # (a 760-byte allocation outside pymalloc, at every CONNECT).
        self._waiters: Any = SmallDeque()
        self._value = False


class LeanQueue(asyncio.Queue[_T]):
    # Idle: the shared empty tuple (asyncio reads ``len(self._queue)`` and ``not self._queue``).
    _queue: collections.deque[_T] | tuple[()]

    def __init__(self, maxsize: int = 0) -> None:
        # asyncio.Queue.__init__'s attributes (3.11), set here rather than made and replaced:
        # it would allocate three deques and an Event per queue, four queues per CONNECT.
        self._maxsize = maxsize
        self._getters: Any = SmallDeque()
        self._putters: Any = SmallDeque()
        self._unfinished_tasks = 0
        self._finished_event = None
        self._init(maxsize)

    # join()'s Event, made on first use (a put clears it, task_done sets it, join waits on it):
    # a queue nothing was ever put on needs none, and keeps no Event and waiter list for it.
    # (Plain attribute access, never ``self.__dict__``, which would materialise a full dict.)
    _finished_event: asyncio.Event | None = None

    @property
    def _finished(self) -> asyncio.Event:
        event = self._finished_event
        if event is None:
            event = self._finished_event = LeanEvent()
            if not self._unfinished_tasks:
                event.set()
        return event

    @_finished.setter
    def _finished(self, event: asyncio.Event) -> None:
        self._finished_event = event

    def _init(self, maxsize: int) -> None:
        self._queue = ()

    def _put(self, item: _T) -> None:
        if isinstance(self._queue, tuple):
            self._queue = collections.deque()
        self._queue.append(item)

    def _get(self) -> _T:
        assert not isinstance(self._queue, tuple), "get from an empty LeanQueue"
        item = self._queue.popleft()
        if not self._queue:
            self._queue = ()  # back to idle size once drained
        return item
