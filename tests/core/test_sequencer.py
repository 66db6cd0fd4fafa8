"""Sequencers: per-topic numbers a subscriber can use to spot gaps, never reused after a resume.

:class:`ReservedSequencer` is pure: the store is modelled here by :class:`ModelStore`, which
keeps the semantics the store contract tests pin on both real stores (reserve keeps the larger
values, release writes exactly, each call all or nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.sequencer import (
    AHEAD_S,
    LEGACY_GAP,
    MAX_BLOCK,
    MIN_BLOCK,
    NEW_TOPICS,
    OVERRUN_PER_S,
    ReservedSequencer,
    SeqReservation,
    Sequencer,
    block_for,
    resume_after,
)

BTC_ZAR = "market/luno/BTC-ZAR"
USDT_NGN = "market/quidax/USDT-NGN"
SOL_ZAR = "market/valr/SOL-ZAR"
T0 = 1_764_500_000.0
# Small blocks and a low overrun rate, so a few hundred ticks cross blocks and allowances.
SMALL_BLOCK, SLOW_OVERRUN = 64, 1000


def test_starts_at_one_and_counts_up() -> None:
    seq = Sequencer()
    assert seq.last(BTC_ZAR) == 0
    assert [seq.next(BTC_ZAR) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert seq.last(BTC_ZAR) == 5


def test_topics_are_independent() -> None:
    seq = Sequencer()
    assert seq.next(BTC_ZAR) == 1
    assert seq.next(BTC_ZAR) == 2
    assert seq.next(USDT_NGN) == 1
    assert seq.next(BTC_ZAR) == 3
    assert seq.last(USDT_NGN) == 1
    assert len(seq) == 2


def test_last_does_not_create_a_topic() -> None:
    seq = Sequencer()
    assert seq.last(BTC_ZAR) == 0
    assert len(seq) == 0


def test_resume_continues_after_the_known_value() -> None:
    seq = Sequencer()
    seq.resume(BTC_ZAR, 41)
    assert seq.next(BTC_ZAR) == 42
    assert seq.next(USDT_NGN) == 1


@pytest.mark.parametrize("stale", [0, 1, 9, 10, -5])
def test_resume_never_goes_backwards(stale: int) -> None:
    seq = Sequencer()
    for _ in range(10):
        seq.next(BTC_ZAR)
    seq.resume(BTC_ZAR, stale)
    assert seq.last(BTC_ZAR) == 10
    assert seq.next(BTC_ZAR) == 11


@given(
    st.lists(
        st.tuples(
            st.sampled_from([BTC_ZAR, USDT_NGN, SOL_ZAR]),
            st.none() | st.integers(min_value=-3, max_value=1_000),
        ),
        max_size=60,
    )
)
def test_numbers_strictly_increase_per_topic(ops: list[tuple[str, int | None]]) -> None:
    # None means "take the next number", an int means "resume after it".
    seq = Sequencer()
    handed_out: dict[str, list[int]] = {}
    for topic, resume_at in ops:
        before = seq.last(topic)
        if resume_at is None:
            handed_out.setdefault(topic, []).append(seq.next(topic))
        else:
            seq.resume(topic, resume_at)
        assert seq.last(topic) >= before
    for numbers in handed_out.values():
        assert numbers[0] >= 1
        assert all(a < b for a, b in pairwise(numbers))


# --- ReservedSequencer ------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class ModelStore:
    """The store contract's seq semantics, in memory."""

    held: dict[str, SeqReservation] = field(default_factory=dict)

    def reserve(self, batch: list[SeqReservation]) -> None:
        for r in batch:
            old = self.held.get(r.topic, r)
            self.held[r.topic] = SeqReservation(r.topic, max(old.reserved, r.reserved), max(old.at, r.at))

    def release(self, batch: list[SeqReservation]) -> None:
        for r in batch:
            self.held[r.topic] = SeqReservation(r.topic, r.reserved, r.at, clean=True)


class Run:
    """One broker run: a sequencer started on the model store, and how often it asked for a write."""

    def __init__(
        self,
        store: ModelStore,
        clock: Clock,
        snapshots: dict[str, int] | None = None,
        *,
        min_block: int = MIN_BLOCK,
        overrun_per_s: int = OVERRUN_PER_S,
    ) -> None:
        self.store, self.clock = store, clock
        self.wakes = 0
        self.seq = ReservedSequencer(
            clock=clock, on_due=self._wake, min_block=min_block, overrun_per_s=overrun_per_s
        )
        startup = self.seq.start(list(store.held.values()), snapshots or {}, clock())
        store.reserve(startup)
        self.seq.confirmed(startup)

    def _wake(self) -> None:
        self.wakes += 1

    def write(self, *, renew: bool = False, outcome: str = "ok") -> list[SeqReservation]:
        """One write by the reserver: ``ok``, ``lost`` (failed), ``hidden`` (landed, reported failed)."""
        batch = self.seq.plan(self.clock(), renew=renew)
        if outcome in ("ok", "hidden"):
            self.store.reserve(batch)
        if outcome == "ok":
            self.seq.confirmed(batch)
        return batch

    def stop(self) -> None:
        self.store.release(self.seq.release(self.clock()))

    def take(self, topic: str, count: int) -> list[int]:
        return [self.seq.next(topic) for _ in range(count)]


RESUME_CASES = [
    # (reserved, at, clean, now) -> the highest seq a previous run may have sent
    (100, T0, True, T0 + 3600, 100),
    (100, T0, False, T0, 100),
    (100, T0, False, T0 + 1, 100 + OVERRUN_PER_S),
    (100, T0, False, T0 + 2.5, 100 + 250_000),
    (100, T0, False, T0 + 0.000_001, 101),  # any part of a number counts
    (100, T0, False, T0 - 60, 100),  # a clock behind the write adds nothing (never subtracts)
    (0, T0, False, T0 + 0.25, 25_000),
]


@pytest.mark.parametrize(("reserved", "at", "clean", "now", "expected"), RESUME_CASES)
def test_resume_after(reserved: int, at: float, clean: bool, now: float, expected: int) -> None:
    assert resume_after(SeqReservation(BTC_ZAR, reserved, at, clean), now) == expected


BLOCK_CASES = [
    (0.0, MIN_BLOCK),
    (1.0, MIN_BLOCK),
    (MIN_BLOCK / AHEAD_S, MIN_BLOCK),
    (2000.0, math.ceil(2000 * AHEAD_S)),
    (2000.5, math.ceil(2000.5 * AHEAD_S)),
    (OVERRUN_PER_S * 10.0, MAX_BLOCK),
]


@pytest.mark.parametrize(("rate", "block"), BLOCK_CASES)
def test_blocks_last_ahead_s_at_the_topics_rate_within_bounds(rate: float, block: int) -> None:
    assert block_for(rate) == block


START_CASES = [
    # (held, snapshots, expected first seq per topic and for a new topic)
    pytest.param([], {}, {BTC_ZAR: 1, SOL_ZAR: 1}, id="fresh store: 1, 2, 3"),
    pytest.param(
        [SeqReservation("", 0, T0 - 1, clean=True), SeqReservation(BTC_ZAR, 41, T0 - 1, clean=True)],
        {BTC_ZAR: 41},
        {BTC_ZAR: 42, SOL_ZAR: 1},
        id="clean stop: right after the last",
    ),
    pytest.param(
        [SeqReservation("", 65_536, T0 - 2), SeqReservation(BTC_ZAR, 65_577, T0 - 2)],
        {BTC_ZAR: 23},
        {BTC_ZAR: 65_577 + 2 * OVERRUN_PER_S + 1, SOL_ZAR: 65_536 + 2 * OVERRUN_PER_S + 1},
        id="kill -9: past reservation plus allowance",
    ),
    pytest.param(
        [SeqReservation("", 65_536, T0 - 1), SeqReservation(BTC_ZAR, 9_000_000, T0 - 1, clean=True)],
        {USDT_NGN: 70},
        {BTC_ZAR: 9_000_001, USDT_NGN: 65_536 + OVERRUN_PER_S + 1, SOL_ZAR: 65_536 + OVERRUN_PER_S + 1},
        id="snapshot without its own reservation: covered by new topics'",
    ),
    pytest.param(
        [],
        {BTC_ZAR: 500, USDT_NGN: 7},
        {BTC_ZAR: 500 + LEGACY_GAP + 1, USDT_NGN: 7 + LEGACY_GAP + 1, SOL_ZAR: LEGACY_GAP + 1},
        id="store from before reservations: past the snapshots' lag",
    ),
]


@pytest.mark.parametrize(("held", "snapshots", "first"), START_CASES)
def test_start_continues_after_anything_an_earlier_run_may_have_sent(
    held: list[SeqReservation], snapshots: dict[str, int], first: dict[str, int]
) -> None:
    store = ModelStore({r.topic: r for r in held})
    run = Run(store, Clock(), snapshots)
    assert {topic: run.seq.next(topic) for topic in first} == first
    # The startup write reserves a block ahead of every known topic and of new topics.
    assert store.held[NEW_TOPICS].reserved == first[SOL_ZAR] - 1 + MIN_BLOCK
    for topic in {*snapshots, *(r.topic for r in held if r.topic)}:
        assert store.held[topic].reserved == first[topic] - 1 + MIN_BLOCK
        assert store.held[topic].at == T0
        assert not store.held[topic].clean


def test_nothing_is_handed_out_before_start_or_after_release() -> None:
    store, clock = ModelStore(), Clock()
    seq = ReservedSequencer(clock=clock)
    assert seq.next(BTC_ZAR) == 0
    assert seq.plan(T0, renew=True) == []
    run = Run(store, clock)
    assert run.take(BTC_ZAR, 3) == [1, 2, 3]
    run.stop()
    assert store.held[BTC_ZAR] == SeqReservation(BTC_ZAR, 3, T0, clean=True)
    assert store.held[NEW_TOPICS] == SeqReservation(NEW_TOPICS, 0, T0, clean=True)
    clock.now += 3600
    assert run.take(BTC_ZAR, 2) == [0, 0]
    assert run.seq.next(USDT_NGN) == 0
    assert run.seq.refused == 3
    assert run.seq.plan(clock(), renew=True) == []
    # The next run continues right after: a clean stop leaves no gap.
    assert Run(store, clock).take(BTC_ZAR, 2) == [4, 5]


def test_reservation_is_raised_a_block_ahead_once_half_of_it_is_used() -> None:
    store, clock = ModelStore(), Clock()
    run = Run(store, clock)
    half = MIN_BLOCK // 2
    assert run.take(BTC_ZAR, 1) == [1]
    assert run.wakes == 1  # a new topic needs its own reservation at once
    run.write()
    assert store.held[BTC_ZAR].reserved == 1 + MIN_BLOCK
    assert run.write() == []  # nothing due: no write until the renewal
    run.take(BTC_ZAR, half)
    assert (run.wakes, run.seq.last(BTC_ZAR)) == (1, 1 + half)  # not past half yet
    clock.now += 10.0
    run.take(BTC_ZAR, 1)
    assert run.wakes == 2
    run.take(BTC_ZAR, 100)
    assert run.wakes == 2  # one wake per crossing
    batch = run.write()
    # Raised by a block sized on the rate since the topic appeared (the first raise came too
    # soon after to measure one): ~3,300/s for 10 s.
    last = run.seq.last(BTC_ZAR)
    block = block_for(last / 10.0)
    assert block > MIN_BLOCK
    assert SeqReservation(BTC_ZAR, last + block, clock()) in batch
    assert store.held[BTC_ZAR] == SeqReservation(BTC_ZAR, last + block, clock())
    assert run.seq.reserved(BTC_ZAR) == last + block


def test_renewal_rewrites_every_reservation_with_a_fresh_time() -> None:
    store, clock = ModelStore(), Clock()
    run = Run(store, clock)
    run.take(BTC_ZAR, 5)
    run.take(USDT_NGN, 5)
    run.write()
    clock.now += 1.0
    batch = run.write(renew=True)
    assert {r.topic for r in batch} == {NEW_TOPICS, BTC_ZAR, USDT_NGN}
    assert all(r.at == clock() and not r.clean for r in batch)
    assert store.held[BTC_ZAR].reserved == 5 + MIN_BLOCK  # renewed, not raised


def test_a_new_topic_is_in_every_write_until_one_holding_it_is_confirmed() -> None:
    store, clock = ModelStore(), Clock()
    run = Run(store, clock)
    run.take(BTC_ZAR, 1)
    assert {r.topic for r in run.write(outcome="lost")} == {NEW_TOPICS, BTC_ZAR}
    run.take(BTC_ZAR, 1)
    assert {r.topic for r in run.write(outcome="lost")} == {NEW_TOPICS, BTC_ZAR}
    assert BTC_ZAR not in store.held
    assert {r.topic for r in run.write()} == {NEW_TOPICS, BTC_ZAR}
    assert run.write() == []


# Past its reservation while the store takes no write, a topic may go OVERRUN_PER_S per second
# from the time of the last write that may have landed; a number beyond that is refused.
OVERRUN_CASES = [
    # (seconds after the last write attempt, numbers asked past the reservation, granted)
    (0.0, 10, 0),
    (2**-7, 1000, 781),  # 100,000/s for 7.8125 ms
    (0.5, 40_000, 40_000),
    (0.5, 60_000, 50_000),
    (2.0, 200_001, 200_000),
]


@pytest.mark.parametrize(("elapsed", "asked", "granted"), OVERRUN_CASES)
def test_past_the_reservation_numbers_are_granted_at_most_at_the_overrun_rate(
    elapsed: float, asked: int, granted: int
) -> None:
    store, clock = ModelStore(), Clock()
    run = Run(store, clock)
    run.take(BTC_ZAR, 1)
    run.write()
    reserved = run.seq.reserved(BTC_ZAR)
    run.take(BTC_ZAR, reserved - 1)  # every reserved number: never refused
    assert run.seq.refused == 0
    run.write(outcome="lost")  # raising it fails: the store is down
    clock.now += elapsed
    got = [n for n in run.take(BTC_ZAR, asked) if n]
    assert got == list(range(reserved + 1, reserved + 1 + granted))
    assert (run.seq.overrun, run.seq.refused) == (granted, asked - granted)
    # Whatever was handed out, a restart after a crash now continues beyond it.
    clock.now += 0.001
    assert Run(store, clock).seq.next(BTC_ZAR) > reserved + granted


def test_a_write_that_may_have_landed_limits_what_follows_it() -> None:
    store, clock = ModelStore(), Clock()
    run = Run(store, clock, min_block=SMALL_BLOCK, overrun_per_s=SLOW_OVERRUN)
    run.take(BTC_ZAR, 1)
    run.write()
    assert run.take(BTC_ZAR, 64)[-1] == 65 == run.seq.reserved(BTC_ZAR)
    clock.now += 10.0  # the confirmed write now allows 10,000 more
    # Reported failed but landed (a timeout hid it): a restart sees its `at`, not the older one.
    run.write(outcome="hidden")
    raised = store.held[BTC_ZAR]
    assert (raised.at, raised.reserved) == (clock(), 65 + 390)  # 6.5 ticks/s for 60 s
    got = [n for n in run.take(BTC_ZAR, 500) if n]
    assert got == list(range(66, 65 + 390 + 1))  # what that write reserves, no more
    assert (run.seq.overrun, run.seq.refused) == (390, 500 - 390)
    clock.now += 0.001
    assert (
        Run(store, clock, min_block=SMALL_BLOCK, overrun_per_s=SLOW_OVERRUN).seq.next(BTC_ZAR) == 65 + 390 + 2
    )


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.sampled_from([BTC_ZAR, USDT_NGN, SOL_ZAR]), st.integers(1, 200)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2, 1.0])),
        st.tuples(st.just("write"), st.booleans(), st.sampled_from(["ok", "ok", "lost", "hidden"])),
        st.tuples(st.just("crash"), st.sampled_from([0.0, 0.001, 0.1, 2.0])),
        st.tuples(st.just("stop"), st.sampled_from([0.0, 0.5])),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(OPS)
def test_no_number_repeats_across_any_crashes_restarts_and_store_failures(
    ops: list[tuple[object, ...]],
) -> None:
    store, clock = ModelStore(), Clock()
    run = Run(store, clock, min_block=SMALL_BLOCK, overrun_per_s=SLOW_OVERRUN)
    seen: dict[str, list[int]] = {}
    for op in ops:
        if op[0] == "tick":
            topic, count = str(op[1]), int(str(op[2]))
            seen.setdefault(topic, []).extend(n for n in run.take(topic, count) if n)
        elif op[0] == "wait":
            clock.now += float(str(op[1]))
        elif op[0] == "write":
            run.write(renew=op[1] is True, outcome=str(op[2]))
        else:
            if op[0] == "stop":
                run.stop()
            clock.now += float(str(op[1]))
            run = Run(store, clock, min_block=SMALL_BLOCK, overrun_per_s=SLOW_OVERRUN)
    for numbers in seen.values():
        assert numbers[0] >= 1
        assert all(a < b for a, b in pairwise(numbers)), "a seq went backwards or repeated"
