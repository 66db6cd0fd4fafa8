"""The user mailbox: messages addressed to a user, stored durably and replayed to their
persistent sessions; no amqtt here.

The mailbox talks to the store contract (:mod:`bridge.core.store`) and to one live
connection at a time through :class:`MailboxLink`, which ``bridge/edge`` implements over its
protocol handler. What it keeps:

- **Stored until acknowledged.** A message leaves the store only on the client's PUBACK;
  anything unacknowledged when the connection drops is delivered again next time, with DUP
  (the store counts deliveries) and the same packet id (:func:`mailbox_packet_id`).
- **A sliding window** (:func:`replay`): up to ``window`` messages in flight; as soon as one
  is acknowledged, or ``wake`` says a new one was stored, the next ones go out.
- **Evictions are never silent**: a full queue's drops are returned to the caller, and
  :func:`eviction_notice` words them for the sending service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from bridge.core.store import (
    EnqueueResult,
    NewMessage,
    OfflineMessage,
    OfflineStore,
    StoreError,
    StoreUnavailable,
)
from bridge.core.topics import USER_PREFIX, is_valid_topic
from bridge.errors import MessageError
from bridge.logs import CLIENT, STORE, clip
from bridge.stats import BrokerStats

__all__ = [
    "Committed",
    "GroupCommit",
    "Mailbox",
    "MailboxLink",
    "ReplayResult",
    "Turns",
    "eviction_notice",
    "mailbox_packet_id",
    "replay",
    "user_topic",
]

log = logging.getLogger(__name__)

# Replay rounds (acks, a page, mark_sent) at the store at once, across all users.
STORE_TURNS = 4
# A round's page while other replays wait for a turn: users take turns a page at a time
# (round-robin), so nobody waits for another user's whole queue.
FAIR_PAGE = 50
# Packet ids are 1..65535 ([MQTT-2.3.1-1]).
_PACKET_IDS = 65535


class MailboxLink(Protocol):
    """One live connection of a mailbox session, as the mailbox needs it."""

    @property
    def client_id(self) -> str: ...

    def acknowledged(self, store_id: str) -> bool:
        """Whether this connection already acknowledged the stored message ``store_id``
        (a PUBACK for a resend that no replay task was waiting for)."""

    def in_flight(self, store_id: str) -> int | None:
        """The packet id ``store_id`` is in flight under (resent at reconnect), else None."""

    async def await_ack(self, packet_id: int) -> None:
        """Until the acknowledgement of a message already in flight."""

    def publish(
        self, message: OfflineMessage, *, dup: bool, on_ack: Callable[[], None]
    ) -> asyncio.Future[None]:
        """Write a stored message now (at the QoS the session takes it; DUP if asked); the
        future completes on its acknowledgement (at once at QoS 0) and is cancelled or fails
        if the connection goes first. ``on_ack`` runs on an acknowledgement that comes when
        the future is gone (after a reconnect resent the message)."""


def user_topic(user: str, topic: str) -> str:
    """The full ``user/<user>/...`` topic of a message for ``user``; ``topic`` may be the
    full topic or the part after ``user/<user>/``. Raises :class:`MessageError` for a bad
    address."""
    own = f"{USER_PREFIX}{user}/"
    full = topic if topic.startswith(USER_PREFIX) else own + topic
    if not user or "/" in user or not full.startswith(own) or not is_valid_topic(full) or full.endswith("/"):
        raise MessageError("bad_address", f"cannot address {full!r} to user {user!r}")
    return full


def eviction_notice(user: str, evicted: Collection[OfflineMessage]) -> bytes:
    """What a full queue dropped, for the sending service (``service/<sub>/evictions``)."""
    notice = {
        "user": user,
        "reason": "queue_full",
        "evicted": [
            {"topic": m.topic, "priority": m.priority.name, "created_at": m.created_at, "new": m.id == ""}
            for m in evicted
        ],
    }
    return json.dumps(notice, separators=(",", ":")).encode()


def mailbox_packet_id(store_id: str, taken: Callable[[int], bool], fresh: Callable[[], int]) -> int:
    """A stored message's packet id, derived from its store id: the same on every delivery,
    after a reconnect or a restart ([MQTT-4.4.0-1]), unless another message in flight holds
    it (``taken``; then ``fresh()``, and the message still carries DUP)."""
    try:
        preferred = int(store_id) % _PACKET_IDS + 1
    except ValueError:
        return fresh()
    return fresh() if taken(preferred) else preferred


@dataclass
class ReplayResult:
    replayed: int = 0
    expired: int = 0
    complete: bool = False  # False: stopped early (disconnect, no PUBACK); the rest stays stored
    # mark_sent / ack calls the store failed; delivery went on without them (at-least-once).
    bookkeeping_failures: int = 0
    pages: int = 0  # reads of the queue
    store_down: bool = False  # stopped because the store could not be reached: try again later


class Turns:
    """Turns at the store for replay rounds: ``size`` at once, the others wait in arrival
    order. ``contended`` while any waits: a round then reads one fair page, not a window."""

    def __init__(self, size: int = STORE_TURNS) -> None:
        self._slots = asyncio.Semaphore(size)
        self._waiting = 0

    @property
    def contended(self) -> bool:
        return self._waiting > 0 or self._slots.locked()

    async def __aenter__(self) -> None:
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1

    async def __aexit__(self, *_exc: object) -> None:
        self._slots.release()


async def replay(
    store: OfflineStore,
    user: str,
    *,
    send: Callable[[OfflineMessage], asyncio.Future[None]],
    accepts: Callable[[str], bool],
    window: int,
    clock: Callable[[], float],
    wake: asyncio.Event | None = None,
    turns: Turns | None = None,
) -> ReplayResult:
    """Deliver ``user``'s queue in priority order, pipelined, with up to ``window`` messages
    in flight.

    The queue is read in pages (URGENT -> LOW, FIFO within a priority; only as much as the
    window has room for, so memory is bounded by the window, not the queue). ``send`` writes
    a message and returns a future that completes on the client's PUBACK; nothing waits
    per message. Acknowledged ids are removed in batches (:meth:`OfflineStore.ack_many`)
    before each new page and at the end: a message leaves the store only after its PUBACK,
    so anything unacknowledged when the connection drops is delivered again next time
    (``sent`` > 0, so with DUP). The window is refilled once a quarter of it is free, or
    when ``wake`` says a new message was stored. Messages for topics the session does not
    take (``accepts``) stay in the store for another session of the same user. With
    ``turns``, each round of store calls (acks, a page, its ``mark_sent``) waits for a turn:
    many users draining at once queue there, first come first served, instead of piling
    onto the store past its call deadline; while others wait, a round reads at most
    :data:`FAIR_PAGE` messages, so users take turns a page at a time (round-robin). Returns when
    the queue is empty and nothing is in flight, or when a send fails (the connection is gone).

    What is stored is delivered even when the store cannot keep its books (a full disk, Redis
    over ``maxmemory``): a failed ``mark_sent`` only means no DUP next time, a failed ``ack``
    that the messages come again next time (at-least-once); the replay goes on and logs the
    first such failure once. It stops only when the queue cannot be read, or an ``ack`` finds
    the store unreachable (the next read would too).
    """
    result = ReplayResult()
    exclude: set[str] = set()  # for another session, or acknowledged but still stored
    in_flight: dict[str, asyncio.Future[None]] = {}
    acked: list[str] = []  # acknowledged, not yet removed
    lost = False
    progress = asyncio.Event()
    refill_at = max(1, window // 4)  # free slots that make a page worth reading
    exhausted = False  # the last page was short: nothing more until something is stored

    def settled(message_id: str, future: asyncio.Future[None]) -> None:
        nonlocal lost
        if in_flight.pop(message_id, None) is None:
            return
        if future.cancelled() or future.exception() is not None:
            lost = True
        else:
            acked.append(message_id)
            result.replayed += 1
        if lost or window - len(in_flight) >= refill_at:
            progress.set()

    async def flush_acks() -> bool:
        """Remove what was acknowledged; False if the store is unreachable."""
        if not acked:
            return True
        batch = acked[:]
        del acked[:]
        try:
            await store.ack_many(user, batch)
        except StoreUnavailable as exc:
            log.warning(
                "offline replay to %s stopped after %d message(s): %s; the rest stays stored",
                clip(user),
                result.replayed,
                exc,
                extra=STORE,
            )
            result.store_down = True
            return False
        except StoreError as exc:
            exclude.update(batch)
            _bookkeeping_failed(result, user, "ack", exc)
        return True

    async def refill(room: int, *, new_stored: bool) -> bool | None:
        """Remove what was acknowledged, then read and send a page; None: stop (the store is
        unreachable), else whether anything was sent."""
        nonlocal exhausted
        if not await flush_acks():
            return None
        if room <= 0 or not (not exhausted or new_stored or not in_flight):
            return False
        room = window - len(in_flight)
        if turns is not None and turns.contended:
            room = min(room, FAIR_PAGE)  # others wait: one page, then the back of the line
        # Acknowledged while the last batch of acks was being removed: still stored.
        pending = await store.pending(
            user, now=clock(), limit=room, exclude=exclude | in_flight.keys() | set(acked)
        )
        result.pages += 1
        result.expired += pending.expired
        exhausted = len(pending.messages) < room
        batch = [m for m in pending.messages if accepts(m.topic)]
        exclude.update(m.id for m in pending.messages if not accepts(m.topic))
        if not batch:
            return False
        try:
            await store.mark_sent(user, [m.id for m in batch])
        except StoreError as exc:
            _bookkeeping_failed(result, user, "mark_sent", exc)
        for message in batch:
            future = send(message)
            in_flight[message.id] = future
            future.add_done_callback(partial(settled, message.id))
        return True

    try:
        while True:
            new_stored = wake is not None and wake.is_set()
            if wake is not None:
                wake.clear()
            progress.clear()
            if lost:
                await flush_acks()
                return result  # not acknowledged: the connection is gone, the rest stays
            room = window - len(in_flight)
            if room >= refill_at or not in_flight or new_stored:
                async with turns or contextlib.nullcontext():
                    sent = await refill(room, new_stored=new_stored)
                if sent is None:
                    return result
                if sent:
                    continue  # what was sent may already be settled (QoS 0)
            if not in_flight and exhausted and not lost and (wake is None or not wake.is_set()):
                async with turns or contextlib.nullcontext():
                    flushed = await flush_acks()
                if not flushed:
                    return result
                result.complete = True
                return result
            await _either(progress, wake)
    finally:
        # What is still in flight stays in the session's in-flight state (resent on the next
        # connection); its late settlements land in lists nobody reads any more.
        if acked:
            # Cancelled (the connection was released): what was acknowledged still goes.
            with suppress(StoreError):
                await store.ack_many(user, acked)


async def _either(first: asyncio.Event, second: asyncio.Event | None) -> None:
    """Until one of the events is set."""
    if second is None:
        await first.wait()
        return
    waits = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


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


# What a submitter hears once its message's group is written: (result, None) or (None, the
# error; CancelledError if the writer was cancelled). Called on the event loop, synchronously
# from the group's write: no future or callback hop per message.
Committed = Callable[["EnqueueResult | None", "BaseException | None"], None]


class GroupCommit:
    """Group commit of enqueues: every message submitted in one event-loop step (and while
    the previous group is being written) goes to the store in one
    :meth:`~bridge.core.store.OfflineStore.enqueue_many`, at most ``max_group`` at a time,
    groups one after another so arrival order is store order. Each submitter hears of its
    message only once the commit holding it has returned: a sender is acknowledged for what
    is durably stored, never before."""

    def __init__(self, store: OfflineStore, *, clock: Callable[[], float], max_group: int = 512) -> None:
        self._store = store
        self._clock = clock
        self.max_group = max_group
        self._waiting: list[tuple[str, NewMessage, Committed]] = []
        self._writer: asyncio.Task[None] | None = None
        self.groups = 0  # commits so far (each one write)
        self.committed = 0  # messages they held

    def submit(self, user: str, message: NewMessage) -> asyncio.Future[EnqueueResult]:
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self.submit_then(user, message, partial(_resolve, future))
        return future

    def submit_then(self, user: str, message: NewMessage, then: Committed) -> None:
        """:meth:`submit` with a plain callback instead of a future."""
        self._waiting.append((user, message, then))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="mailbox-group-commit")

    async def _write(self) -> None:
        while self._waiting:
            # Yield once: what else arrives in this event-loop step joins the group.
            await asyncio.sleep(0)
            group, self._waiting = self._waiting[: self.max_group], self._waiting[self.max_group :]
            try:
                results = await self._store.enqueue_many([(u, m) for u, m, _ in group], now=self._clock())
            except Exception as exc:  # StoreError, or a bug: every submitter hears of it
                for _, _, then in group:
                    _tell(then, None, exc)
                continue
            except asyncio.CancelledError as exc:
                for _, _, then in group + self._waiting:
                    _tell(then, None, exc)
                self._waiting = []
                raise
            self.groups += 1
            self.committed += len(group)
            for (_, _, then), result in zip(group, results, strict=True):
                _tell(then, result, None)

    async def close(self) -> None:
        """Let the groups already submitted be written."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)


def _tell(then: Committed, result: EnqueueResult | None, exc: BaseException | None) -> None:
    try:
        then(result, exc)
    except Exception:  # one submitter's bug must not keep the others from hearing
        log.exception("group commit: a submitter's callback failed")


def _resolve(
    future: asyncio.Future[EnqueueResult], result: EnqueueResult | None, exc: BaseException | None
) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    elif exc is not None:
        future.set_exception(exc)
    else:
        assert result is not None
        future.set_result(result)


class Mailbox:
    """Every user's mailbox on one store: store a message, replay a queue to a connection,
    remove what was acknowledged. The broker decides who is a mailbox session and when a
    replay runs; this decides what goes out, in which order, and when it leaves the store."""

    def __init__(
        self,
        store: OfflineStore,
        *,
        window: int,
        clock: Callable[[], float],
        stats: BrokerStats,
    ) -> None:
        self.store = store
        self.window = window
        self._clock = clock
        self._stats = stats
        self._background: set[asyncio.Task[Any]] = set()  # acks whose sender was gone
        self.commits = GroupCommit(store, clock=clock)
        # Replays at the store at once: more wait their turn (FIFO), so a reconnect storm of
        # users with backlogs queues here rather than past the store's call deadline.
        self.turns = Turns(STORE_TURNS)

    def submit(self, user: str, message: NewMessage) -> asyncio.Future[EnqueueResult]:
        """Store durably, in the next group commit; the future says what became of it (or
        raises :class:`StoreError`: nothing is reported stored that was not)."""
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self.submit_then(user, message, partial(_resolve, future))
        return future

    def submit_then(self, user: str, message: NewMessage, then: Committed) -> None:
        """:meth:`submit` with a callback, called once the commit holding it returns."""
        started = time.perf_counter()

        def committed(result: EnqueueResult | None, exc: BaseException | None) -> None:
            self._committed(user, result, exc, started)
            then(result, exc)

        self.commits.submit_then(user, message, committed)

    async def enqueue(self, user: str, message: NewMessage) -> EnqueueResult:
        """:meth:`submit`, awaited."""
        return await self.submit(user, message)

    def _committed(
        self, user: str, result: EnqueueResult | None, exc: BaseException | None, started: float
    ) -> None:
        if isinstance(exc, asyncio.CancelledError):
            return
        if exc is not None or result is None:
            self._stats.store_errors += 1
            return
        self._stats.store_seconds.observe(time.perf_counter() - started)
        self._stats.offline_stored += result.stored is not None
        self._stats.offline_evicted += len(result.evicted)
        if result.evicted:
            log.warning(
                "queue of %s full: evicted %d message(s)", clip(user), len(result.evicted), extra=CLIENT
            )

    async def replay(
        self, user: str, link: MailboxLink, accepts: Callable[[str], bool], wake: asyncio.Event
    ) -> ReplayResult:
        """Replay ``user``'s queue over ``link``; ``store_down`` if the store stopped it (logged)."""
        started = self._clock()
        try:
            result = await replay(
                self.store,
                user,
                send=lambda message: self.deliver(user, link, message),
                accepts=accepts,
                window=self.window,
                clock=self._clock,
                wake=wake,
                turns=self.turns,
            )
        except StoreError as exc:
            log.warning("offline replay for %s stopped: %s", clip(user), exc, extra=STORE)
            return ReplayResult(store_down=True)
        self._stats.offline_replayed += result.replayed
        self._stats.offline_expired += result.expired
        if result.replayed or result.expired:
            log.info(
                "replayed %d offline message(s) to %s in %.3fs (%d expired, %d store bookkeeping failures)",
                result.replayed,
                clip(link.client_id),
                self._clock() - started,
                result.expired,
                result.bookkeeping_failures,
            )
        return result

    def deliver(self, user: str, link: MailboxLink, message: OfflineMessage) -> asyncio.Future[None]:
        """Send one stored message; the future completes once it is acknowledged (QoS 1/2) or
        written (QoS 0), and fails or is cancelled if the connection goes first."""
        if link.acknowledged(message.id):
            # Acknowledged after a reconnect re-sent it, before this replay got here.
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        packet_id = link.in_flight(message.id)
        if packet_id is not None:
            # Re-sent at reconnect with its original packet id: wait for that one's ack.
            return asyncio.ensure_future(link.await_ack(packet_id))
        # Delivered before without an ack (maybe before a restart): DUP ([MQTT-3.3.1-1]).
        return link.publish(message, dup=message.sent > 0, on_ack=lambda: self.ack_later(user, message))

    def ack_later(self, user: str, message: OfflineMessage) -> None:
        """The PUBACK of a stored message whose sending task was gone (it came after a
        reconnect re-sent it): remove it from the store in the background."""
        task = asyncio.create_task(self._ack(user, message), name=f"mailbox-ack:{message.id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ack(self, user: str, message: OfflineMessage) -> None:
        try:
            await self.store.ack(user, message.id)
        except StoreError as exc:
            self._stats.store_errors += 1
            log.error("store: could not remove an acknowledged message: %s", exc, extra=STORE)

    async def settle(self) -> None:
        """Wait for group commits and background acks (at shutdown, before the store closes)."""
        await self.commits.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
