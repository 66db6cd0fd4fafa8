"""bridge.core.lookup_batch: the questions of one loop step answered by one call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from bridge.core.lookup_batch import BatchedLookup

pytestmark = pytest.mark.timeout(10)


async def steps_until(condition: Callable[[], bool]) -> None:
    """Let the loop run step by step (no clock) until ``condition`` holds."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class Source:
    """A fetch that records its calls; ``gate`` holds the answer back until set."""

    def __init__(self, values: Mapping[str, str], *, fail: Exception | None = None) -> None:
        self.values = dict(values)
        self.calls: list[list[str]] = []
        self.fail = fail
        self.gate = asyncio.Event()
        self.gate.set()

    async def fetch(self, keys: list[str]) -> dict[str, str]:
        self.calls.append(keys)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: self.values[k] for k in keys if k in self.values}


async def test_the_questions_of_one_step_cost_one_call() -> None:
    source = Source({"ada": "Africa/Lagos", "kim": "Africa/Nairobi"})
    lookup = BatchedLookup(source.fetch, name="t")
    answers = await asyncio.gather(*(lookup.get(k) for k in ["ada", "bo", "kim", "ada"]))
    assert answers == ["Africa/Lagos", None, "Africa/Nairobi", "Africa/Lagos"]
    assert source.calls == [["ada", "bo", "kim"]]  # distinct keys, in asking order
    assert (lookup.batches, lookup.keys) == (1, 3)


async def test_questions_of_later_steps_are_later_calls() -> None:
    source = Source({"ada": "Africa/Cairo"})
    lookup = BatchedLookup(source.fetch, name="t")
    assert await lookup.get("ada") == "Africa/Cairo"
    assert await lookup.get("bo") is None
    assert source.calls == [["ada"], ["bo"]]


@pytest.mark.parametrize(
    ("asked", "max_batch", "calls"),
    [
        (5, 2, [["u0", "u1"], ["u2", "u3"], ["u4"]]),
        (4, 4, [["u0", "u1", "u2", "u3"]]),
        (1, 1, [["u0"]]),
    ],
)
async def test_a_batch_holds_at_most_max_batch_keys(
    asked: int, max_batch: int, calls: list[list[str]]
) -> None:
    source = Source({})
    lookup = BatchedLookup(source.fetch, name="t", max_batch=max_batch)
    assert await asyncio.gather(*(lookup.get(f"u{i}") for i in range(asked))) == [None] * asked
    assert source.calls == calls


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchedLookup(Source({}).fetch, name="t", max_batch=0)


async def test_a_failed_call_fails_every_question_of_its_batch() -> None:
    source = Source({}, fail=ConnectionError("store down"))
    lookup = BatchedLookup(source.fetch, name="t")
    results = await asyncio.gather(lookup.get("a"), lookup.get("b"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    # The next step asks again: a failure is not remembered.
    source.fail = None
    source.values["a"] = "UTC"
    assert await lookup.get("a") == "UTC"


async def test_a_caller_that_goes_away_leaves_the_others_answered() -> None:
    source = Source({"a": "Africa/Lagos", "b": "Africa/Cairo"})
    source.gate.clear()
    lookup = BatchedLookup(source.fetch, name="t")
    leaving = asyncio.create_task(lookup.get("a"))
    staying_same_key = asyncio.create_task(lookup.get("a"))
    staying = asyncio.create_task(lookup.get("b"))
    await steps_until(lambda: bool(source.calls))  # the batch started
    assert source.calls == [["a", "b"]]
    leaving.cancel()
    source.gate.set()
    assert await staying == "Africa/Cairo"
    assert await staying_same_key == "Africa/Lagos"
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_a_key_whose_askers_all_left_is_not_fetched() -> None:
    source = Source({"b": "UTC"})
    lookup = BatchedLookup(source.fetch, name="t")
    gone = asyncio.create_task(lookup.get("a"))
    kept = asyncio.create_task(lookup.get("b"))
    await asyncio.sleep(0)  # both asked; the flush is due next step
    gone.cancel()
    assert await kept == "UTC"
    assert source.calls == [["b"]]


async def test_aclose_cancels_calls_in_flight_and_questions_not_yet_sent() -> None:
    source = Source({"a": "UTC"})
    source.gate.clear()
    lookup = BatchedLookup(source.fetch, name="t")
    in_flight = asyncio.create_task(lookup.get("a"))
    await steps_until(lambda: bool(source.calls))
    assert source.calls == [["a"]]
    await lookup.aclose()
    not_sent = asyncio.create_task(lookup.get("b"))
    for task in (in_flight, not_sent):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert source.calls == [["a"]]  # nothing asked after the close
