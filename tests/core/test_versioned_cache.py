"""VersionedCache (bridge/core/versioned_cache.py): table-driven, no broker."""

from __future__ import annotations

import pytest

from bridge.core.versioned_cache import VersionedCache

# (key, version, value, size) put in order
Puts = list[tuple[str, int, bytes, int]]


@pytest.mark.parametrize(
    ("puts", "key", "version", "expected"),
    [
        pytest.param([], "a", 0, None, id="empty"),
        pytest.param([("a", 1, b"x", 1)], "a", 1, b"x", id="same-version"),
        pytest.param([("a", 1, b"x", 1)], "a", 2, None, id="other-version-is-a-miss"),
        pytest.param([("a", 1, b"", 0)], "a", 1, b"", id="an-empty-value-is-a-hit"),
        pytest.param([("a", 1, b"x", 1), ("a", 2, b"y", 1)], "a", 2, b"y", id="replaced"),
        pytest.param([("a", 1, b"x", 1), ("b", 1, b"y", 1)], "a", 1, b"x", id="others-kept"),
    ],
)
def test_get(puts: Puts, key: str, version: int, expected: bytes | None) -> None:
    cache: VersionedCache[str, bytes] = VersionedCache(max_entries=10, max_bytes=100)
    for put in puts:
        cache.put(*put)
    assert cache.get(key, version) == expected


@pytest.mark.parametrize(
    ("puts", "left", "size"),
    [
        pytest.param([("a", 1, b"", 40), ("b", 1, b"", 40)], ["a", "b"], 80, id="within-bounds"),
        pytest.param(
            [("a", 1, b"", 40), ("b", 1, b"", 40), ("c", 1, b"", 40)], ["c"], 40, id="past-bytes-empties"
        ),
        pytest.param([("a", 1, b"", 60), ("a", 2, b"", 60)], ["a"], 60, id="a-replaced-entry-counts-once"),
        pytest.param(
            [("a", 1, b"", 1), ("b", 1, b"", 1), ("c", 1, b"", 1)], ["a", "b", "c"], 3, id="at-entries"
        ),
        pytest.param(
            [("a", 1, b"", 1), ("b", 1, b"", 1), ("c", 1, b"", 1), ("d", 1, b"", 1)],
            ["d"],
            1,
            id="past-entries-empties",
        ),
        pytest.param(
            [("a", 1, b"", 1), ("b", 1, b"", 1), ("c", 1, b"", 1), ("c", 2, b"", 1)],
            ["c"],
            1,
            id="full-empties-even-to-replace",
        ),
        pytest.param([("a", 1, b"", 101)], ["a"], 101, id="one-over-the-bytes-is-still-kept"),
    ],
)
def test_bounds(puts: Puts, left: list[str], size: int) -> None:
    cache: VersionedCache[str, bytes] = VersionedCache(max_entries=3, max_bytes=100)
    for put in puts:
        cache.put(*put)
    assert [key for key in "abcd" if cache.get(key, 1) is not None or cache.get(key, 2) is not None] == left
    assert (len(cache), cache.size) == (len(left), size)


def test_without_a_byte_bound_only_entries_count() -> None:
    cache: VersionedCache[str, list[int]] = VersionedCache(max_entries=2)
    cache.put("a", 1, [1], 10**9)
    cache.put("b", 1, [2], 10**9)
    assert (cache.get("a", 1), cache.get("b", 1)) == ([1], [2])
    cache.put("c", 1, [3])
    assert (len(cache), cache.get("a", 1), cache.get("c", 1)) == (1, None, [3])
