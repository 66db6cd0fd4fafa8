"""Per-topic sequence numbers: strictly increasing, so a subscriber can spot a gap.

:class:`Sequencer` counts in memory (a feed stamping its own ticks). :class:`ReservedSequencer`
is the broker's: its numbers never go backwards or repeat across restarts, even ``kill -9``,
because the store always holds a *reservation* per topic at or above what was handed out.

The rules (pure; the broker's :class:`~bridge.offline.SeqReserver` does the writing):

- A reservation ``(topic, reserved, at)`` in the store promises: no number above ``reserved``
  was handed out on ``topic`` before wall time ``at``, and after ``at`` numbers pass
  ``reserved`` by at most :data:`OVERRUN_PER_S` per second. A restart at ``now`` therefore
  continues after ``reserved + OVERRUN_PER_S * (now - at)`` (:func:`resume_after`): a
  forward gap, never a repeat. A clean stop writes the exact last number (``clean``) and
  the restart continues right after it, without a gap.
- In the run, a topic's numbers stay within the promise of *every* write the store may hold:
  the last confirmed one and any sent since whose outcome is unknown (a timeout may hide a
  success). Numbers up to the smallest ``reserved`` of those need no check (the hot path: a
  dict lookup and a compare); past it (the store is behind) the allowance is checked against
  the clock, and a number beyond it is refused (``next`` returns 0, the tick is dropped). That
  takes over :data:`OVERRUN_PER_S` ticks per second on one topic while the store cannot be
  written, which no feed comes near: otherwise ticks keep flowing whatever the store does.
- Reservations are raised ahead: when a topic passes half its block, the next write sets
  ``reserved = last + block``, the block sized to last :data:`AHEAD_S` at the topic's recent
  rate (measured over at least :data:`RATE_WINDOW_S`; between :data:`MIN_BLOCK` and
  :data:`MAX_BLOCK`). Every :data:`RENEW_S` all of them are rewritten with a fresh ``at``,
  which keeps the jump after a crash small.
- Topics the store holds nothing for start after the reservation of :data:`NEW_TOPICS`
  (``""``), which every write renews. A new topic is in every write until one holding it is
  confirmed; until then the :data:`NEW_TOPICS` reservation covers it.
- Each write is atomic (all of its topics or none), and the store keeps the larger
  ``reserved`` and ``at`` of what it had and what it gets (so a late write never lowers it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AHEAD_S",
    "LEGACY_GAP",
    "MAX_BLOCK",
    "MIN_BLOCK",
    "NEW_TOPICS",
    "OVERRUN_PER_S",
    "RATE_WINDOW_S",
    "RENEW_S",
    "ReservedSequencer",
    "SeqReservation",
    "Sequencer",
    "block_for",
    "resume_after",
]

NEW_TOPICS: Final = ""  # the reservation that covers every topic without its own
OVERRUN_PER_S: Final = 100_000  # past its reservation, at most this many numbers per second per topic
MIN_BLOCK: Final = 65_536
AHEAD_S: Final = 60.0  # a block lasts this long at the topic's recent rate
MAX_BLOCK: Final = OVERRUN_PER_S * 60
RENEW_S: Final = 1.0  # every reservation is rewritten (fresh ``at``) this often
RATE_WINDOW_S: Final = 1.0  # a block adapts to the rate measured over at least this long
# A store written before reservations existed holds only snapshots, written up to
# store.snapshot_flush_s (at most 60 s) behind: skip what that could have missed.
LEGACY_GAP: Final = OVERRUN_PER_S * 60


class Sequencer:
    """Hands out ``1, 2, 3, ...`` per topic; ``resume`` continues after a known value."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def next(self, topic: str) -> int:
        seq = self._last.get(topic, 0) + 1
        self._last[topic] = seq
        return seq

    def resume(self, topic: str, last: int) -> None:
        """Never go backwards: continue after ``last`` if it is ahead of what we have."""
        if last > self._last.get(topic, 0):
            self._last[topic] = last

    def last(self, topic: str) -> int:
        return self._last.get(topic, 0)

    def __len__(self) -> int:
        return len(self._last)


@dataclass(frozen=True)
class SeqReservation:
    """What the store keeps per market topic (``NEW_TOPICS`` for all others); see the module doc.

    ``reserved``: no seq above it was handed out before ``at`` (epoch seconds), and past it at
    most :data:`OVERRUN_PER_S` per second after. ``clean``: written at a clean stop, and
    ``reserved`` is exactly the last seq handed out.
    """

    topic: str
    reserved: int
    at: float
    clean: bool = False


def resume_after(reservation: SeqReservation, now: float, overrun_per_s: int = OVERRUN_PER_S) -> int:
    """The highest seq a previous run may have handed out on the reservation's topic."""
    if reservation.clean:
        return reservation.reserved
    return reservation.reserved + math.ceil(overrun_per_s * max(0.0, now - reservation.at))


def block_for(rate_per_s: float, *, min_block: int = MIN_BLOCK, max_block: int = MAX_BLOCK) -> int:
    """Numbers to reserve at once for a topic running at ``rate_per_s``."""
    return min(max_block, max(min_block, math.ceil(rate_per_s * AHEAD_S)))


@dataclass
class _Topic:
    """One topic's reservation state (``NEW_TOPICS`` has one too)."""

    reserved: int  # the highest reservation planned (sent or about to be); never lowered
    # Every write the store may hold reserves at least ``safe``, and allows at most
    # ``limit_reserved + OVERRUN_PER_S * (t - limit_at)`` at time t (the tightest of them).
    safe: int
    limit_reserved: int
    limit_at: float
    block: int
    # Past half its block, or not yet in a confirmed write: the next write raises it.
    due: bool = False
    mark: tuple[int, float] | None = None  # (last, time) the rate is measured from

    def tighten(self, reserved: int, at: float, overrun_per_s: int) -> None:
        """A write that may land promises ``(reserved, at)``: keep the tighter limit."""
        self.safe = min(self.safe, reserved)
        if reserved - self.limit_reserved < overrun_per_s * (at - self.limit_at):
            self.limit_reserved, self.limit_at = reserved, at

    def settle(self, reserved: int, at: float) -> None:
        """A write holding ``(reserved, at)`` is confirmed, and none is outstanding after it."""
        self.safe, self.limit_reserved, self.limit_at = reserved, reserved, at


def _nothing() -> None:
    return None


class ReservedSequencer:
    """The broker's sequencer: numbers covered by store reservations (see the module doc).

    Life: :meth:`start` with what the store holds (write its result, then :meth:`confirmed`);
    :meth:`next` per tick; :meth:`plan` / :meth:`confirmed` from the writer task;
    :meth:`release` at a clean stop (write it; no number is handed out after it).
    ``on_due`` is called (on the hot path, so it must be cheap) when a topic needs a write.
    ``min_block`` and ``overrun_per_s`` are for tests; a store must always be used with the
    same ``overrun_per_s`` (restarts rely on it).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        on_due: Callable[[], None] = _nothing,
        min_block: int = MIN_BLOCK,
        overrun_per_s: int = OVERRUN_PER_S,
    ) -> None:
        self._clock = clock
        self.on_due = on_due
        self._min_block = min_block
        self._max_block = max(min_block, overrun_per_s * 60)
        self._overrun_per_s = overrun_per_s
        self._last: dict[str, int] = {}
        # A number at or below its topic's watermark needs no bookkeeping (fast path).
        self._watch: dict[str, int] = {}
        self._topics: dict[str, _Topic] = {}
        self._base = 0  # new topics start after this
        self._running = False
        self.refused = 0  # numbers refused: past every allowance the store may hold
        self.overrun = 0  # numbers handed out past the reservation (within the allowance)
        self.resumed_unclean = 0  # topics that skipped ahead at start (their last stop was not clean)

    # -- hot path ---------------------------------------------------------------------------

    def next(self, topic: str) -> int:
        """The next number for ``topic``, or 0 if none can be handed out safely (drop the tick)."""
        seq = self._last.get(topic, self._base) + 1
        self._last[topic] = seq
        if seq > self._watch.get(topic, 0):
            return self._checked(topic, seq)
        return seq

    def _checked(self, topic: str, seq: int) -> int:
        state = self._topics.get(topic)
        if not self._running:
            return self._refuse(topic, seq)
        if state is None:
            state = self._new_topic(topic)
        if not state.due:
            state.due = True
            self.on_due()
        self._watch[topic] = state.safe
        if seq <= state.safe:
            return seq
        if seq <= state.limit_reserved + self._overrun_per_s * (self._clock() - state.limit_at):
            self.overrun += 1
            return seq
        return self._refuse(topic, seq)

    def _refuse(self, topic: str, seq: int) -> int:
        self._last[topic] = seq - 1
        self.refused += 1
        return 0

    def _new_topic(self, topic: str) -> _Topic:
        cover = self._topics[NEW_TOPICS]
        state = _Topic(
            reserved=0,
            safe=cover.safe,
            limit_reserved=cover.limit_reserved,
            limit_at=cover.limit_at,
            block=self._min_block,
            mark=(self._base, self._clock()),
        )
        self._topics[topic] = state
        return state

    # -- the writer's side ------------------------------------------------------------------

    def start(
        self, reservations: Iterable[SeqReservation], snapshots: Mapping[str, int], now: float
    ) -> list[SeqReservation]:
        """Continue after whatever earlier runs may have handed out; the reservations to write
        (and :meth:`confirm <confirmed>`) before any number is handed out.

        ``snapshots``: topic -> seq of the stored snapshots. A store with snapshots but no
        reservation at all was written before reservations existed: its topics skip
        :data:`LEGACY_GAP` (the snapshots' write-behind may have missed that many).
        """
        held = {r.topic: r for r in reservations}
        cover = held.pop(NEW_TOPICS, None)
        legacy = cover is None and bool(snapshots)
        rate = self._overrun_per_s
        self._base = resume_after(cover, now, rate) if cover is not None else LEGACY_GAP if legacy else 0
        last = {topic: resume_after(r, now, rate) for topic, r in held.items()}
        self.resumed_unclean = sum(not r.clean for r in held.values())
        for topic, seq in snapshots.items():
            last[topic] = max(last.get(topic, self._base), seq + LEGACY_GAP if legacy else seq)
        self._last = dict(last)
        self._watch = {}
        self._topics = {
            topic: _Topic(
                reserved=seq,
                safe=seq,
                limit_reserved=seq,
                limit_at=now,
                block=self._min_block,
                due=True,
                mark=(seq, now),
            )
            for topic, seq in {**last, NEW_TOPICS: self._base}.items()
        }
        self._running = True
        return self.plan(now, renew=True)

    def plan(self, now: float, *, renew: bool) -> list[SeqReservation]:
        """The reservations to write now: due topics raised, every topic if ``renew``; [] if none.

        Send it, then :meth:`confirmed` on success; on failure just plan again later.
        """
        if not self._running or not (renew or any(s.due for s in self._topics.values())):
            return []
        batch = []
        for topic, state in self._topics.items():
            if not (renew or state.due or topic == NEW_TOPICS):
                continue
            if state.due:
                last = self._last_of(topic)
                if state.mark is None:
                    state.mark = (last, now)
                elif now - state.mark[1] >= RATE_WINDOW_S:
                    rate = (last - state.mark[0]) / (now - state.mark[1])
                    state.block = block_for(rate, min_block=self._min_block, max_block=self._max_block)
                    state.mark = (last, now)
                state.reserved = max(state.reserved, last + state.block)
            state.tighten(state.reserved, now, self._overrun_per_s)
            batch.append(SeqReservation(topic, state.reserved, now))
        return batch

    def confirmed(self, batch: Iterable[SeqReservation]) -> None:
        """``batch`` (from :meth:`plan` or :meth:`start`) is in the store."""
        more = False
        for written in batch:
            state = self._topics.get(written.topic)
            if state is None or not self._running:
                continue
            state.settle(written.reserved, written.at)
            if written.topic == NEW_TOPICS:
                state.due = False
                continue
            low = written.reserved - state.block // 2
            state.due = self._last_of(written.topic) > low
            more |= state.due
            self._watch[written.topic] = state.safe if state.due else low
        if more:
            self.on_due()

    def release(self, now: float) -> list[SeqReservation]:
        """Stop handing out numbers; the exact last one per topic, to write as clean."""
        if not self._running:
            return []
        self._running = False
        self._watch.clear()  # every later number takes the slow path, which refuses
        return [SeqReservation(topic, self._last_of(topic), now, clean=True) for topic in self._topics]

    # -- reading ----------------------------------------------------------------------------

    def _last_of(self, topic: str) -> int:
        return self._base if topic == NEW_TOPICS else self._last.get(topic, self._base)

    def last(self, topic: str) -> int:
        return self._last.get(topic, 0)

    def reserved(self, topic: str) -> int:
        """The highest reservation planned for ``topic`` (0 for a topic it does not know)."""
        state = self._topics.get(topic)
        return 0 if state is None else state.reserved

    def __len__(self) -> int:
        return len(self._last)
