"""Sequencer: per-topic numbers a subscriber can use to spot gaps, never reused after a resume."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feeds.sequencer import Sequencer

BTC_ZAR = "market/luno/BTC-ZAR"
USDT_NGN = "market/quidax/USDT-NGN"


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
            st.sampled_from([BTC_ZAR, USDT_NGN, "market/valr/SOL-ZAR"]),
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
