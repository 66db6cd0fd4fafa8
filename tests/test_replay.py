"""ReplayFeed: replays a recording in order, paced by ts, passing over bad lines."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from bridge.core.tick import Tick
from bridge.errors import FeedError
from feeds.replay import ReplayFeed, write_ndjson

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SAMPLE = Path(__file__).resolve().parent.parent / "config" / "replay-sample.ndjson"


def tick(offset_s: float, *, pair: str = "BTC-ZAR", last: str = "1650000", seq: int = 0) -> Tick:
    return Tick(
        exchange="luno",
        pair=pair,
        bid="1649000",
        ask="1651000.5",
        last=last,
        volume_24h="31.25",
        ts=START + timedelta(seconds=offset_s),
        seq=seq,
    )


class SleepRecorder:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


async def collect(feed: ReplayFeed, limit: int | None = None) -> list[Tick]:
    out: list[Tick] = []
    stream = feed.ticks()
    assert isinstance(stream, AsyncGenerator)
    async for item in stream:
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    await stream.aclose()
    return out


async def test_write_then_replay_in_order(tmp_path: Path) -> None:
    recorded = [tick(0, last="1650000"), tick(1, pair="ETH-ZAR", last="58000.5"), tick(2, last="1650100")]
    path = tmp_path / "rec.ndjson"
    assert write_ndjson(path, recorded) == 3
    assert path.read_bytes() == b"".join(t.encode() + b"\n" for t in recorded)

    feed = ReplayFeed(path, speed=0, sleep=SleepRecorder())
    assert await collect(feed) == recorded
    assert feed.skipped == 0
    assert feed.replayed == 3


async def test_recorded_seq_is_reset(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [tick(0, seq=17), tick(1, seq=18)])
    replayed = await collect(ReplayFeed(path, speed=0, sleep=SleepRecorder()))
    assert [t.seq for t in replayed] == [0, 0]
    assert [t.ts for t in replayed] == [START, START + timedelta(seconds=1)]


async def test_bad_lines_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [tick(0), tick(1), tick(2)]
    lines = [
        good[0].encode(),  # line 1
        b"{not json",  # line 2
        b"",  # line 3: blank, ignored
        good[1].encode().replace(b'"bid":"1649000"', b'"bid":1649000'),  # line 4: float price
        b"   \t",  # line 5: blank, ignored
        b"[1, 2, 3]",  # line 6: not an object
        good[1].encode(),  # line 7
        b'{"exchange":"luno"}',  # line 8: missing fields
        b"\xff\xfe garbage",  # line 9: not UTF-8
        good[2].encode(),  # line 10, no trailing newline
    ]
    path = tmp_path / "rec.ndjson"
    path.write_bytes(b"\n".join(lines))

    feed = ReplayFeed(path, speed=0, sleep=SleepRecorder())
    with caplog.at_level(logging.WARNING, logger="feeds.replay"):
        replayed = await collect(feed)

    assert replayed == good
    assert feed.skipped == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    for lineno, reason in [(2, "not_json"), (4, "float_price"), (6, "not_object"), (8, "missing_field")]:
        assert any(f"line {lineno} " in w and reason in w for w in warnings), (lineno, warnings)
    assert any("line 9 " in w for w in warnings)


async def test_crlf_line_endings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    path.write_bytes(tick(0).encode() + b"\r\n" + tick(1).encode() + b"\r\n")
    feed = ReplayFeed(path, speed=0, sleep=SleepRecorder())
    assert await collect(feed) == [tick(0), tick(1)]
    assert feed.skipped == 0


@pytest.mark.parametrize(
    ("speed", "expected"),
    [
        (1.0, [0.5, 2.0, 0.0, 0.0, 1.5]),
        (2.0, [0.25, 1.0, 0.0, 0.0, 0.75]),
        (0.5, [1.0, 4.0, 0.0, 0.0, 3.0]),
        (0, [0.0, 0.0, 0.0, 0.0, 0.0]),
    ],
)
async def test_spacing_follows_ts_scaled_by_speed(
    tmp_path: Path, speed: float, expected: list[float]
) -> None:
    # Offsets: a same-ts pair (no wait) and a step back in time (no wait, no negative sleep).
    offsets = [0, 0.5, 2.5, 2.5, 1.0, 2.5]
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [tick(o) for o in offsets])
    sleep = SleepRecorder()
    replayed = await collect(ReplayFeed(path, speed=speed, sleep=sleep))
    assert len(replayed) == len(offsets)
    assert sleep.calls == pytest.approx(expected)


async def test_loop_restarts_from_the_top(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [tick(0, last="1"), tick(1, last="2"), tick(3, last="3")])
    sleep = SleepRecorder()
    feed = ReplayFeed(path, speed=1.0, loop=True, sleep=sleep)
    replayed = await collect(feed, limit=8)
    assert [t.last for t in replayed] == ["1", "2", "3", "1", "2", "3", "1", "2"]
    # Wrapping round goes back in time, so it is not waited for.
    assert sleep.calls == pytest.approx([1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0])
    assert feed.replayed == 8


async def test_without_loop_the_feed_ends(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [tick(0)])
    assert len(await collect(ReplayFeed(path, speed=0, sleep=SleepRecorder()))) == 1


async def test_loop_over_nothing_valid_raises(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    path.write_bytes(b"junk\n\n")
    feed = ReplayFeed(path, speed=0, loop=True, sleep=SleepRecorder())
    with pytest.raises(FeedError, match="no valid ticks"):
        await collect(feed)
    assert feed.skipped == 1


async def test_empty_file_without_loop_yields_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    path.write_bytes(b"")
    assert await collect(ReplayFeed(path, sleep=SleepRecorder())) == []


def test_missing_file_raises_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "rec.ndjson"
    with pytest.raises(FeedError) as caught:
        ReplayFeed(missing)
    assert str(missing) in str(caught.value)


async def test_file_removed_before_replay_raises(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [tick(0)])
    feed = ReplayFeed(path, speed=0, sleep=SleepRecorder())
    path.unlink()
    with pytest.raises(FeedError) as caught:
        await collect(feed)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("speed", [-1.0, float("inf"), float("nan")])
def test_bad_speed_is_refused(tmp_path: Path, speed: float) -> None:
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [tick(0)])
    with pytest.raises(FeedError, match="speed"):
        ReplayFeed(path, speed=speed)


def test_name_mentions_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rec.ndjson"
    write_ndjson(path, [])
    feed = ReplayFeed(path)
    assert feed.name == "replay:rec.ndjson"
    assert feed.path == path


async def test_shipped_sample_is_clean() -> None:
    feed = ReplayFeed(SAMPLE, speed=0, sleep=SleepRecorder())
    replayed = await collect(feed)
    assert feed.skipped == 0
    assert 20 <= len(replayed) <= 40
    assert {t.pair.split("-")[1] for t in replayed} == {"ZAR", "NGN", "KES"}
    assert all(a.ts <= b.ts for a, b in pairwise(replayed))
