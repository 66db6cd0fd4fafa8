"""The dashboard's pure rules (bridge/dashboard/static/logic.js), table-driven in the same
headless Chromium the page runs in: backoff with full jitter, seq gaps, timestamps, topics,
the token in the fragment, sparkline geometry."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from bridge.dashboard.routes import STATIC_DIR

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def logic(browser: Browser) -> Iterator[Page]:
    """One blank page with logic.js loaded, shared by the module (the rules keep no state)."""
    context = browser.new_context()
    page = context.new_page()
    page.add_script_tag(path=str(STATIC_DIR / "logic.js"))
    try:
        yield page
    finally:
        context.close()


def call(page: Page, name: str, *args: Any) -> Any:
    return page.evaluate("([name, args]) => MBLogic[name](...args)", [name, list(args)])


@pytest.mark.parametrize(
    ("attempt", "random", "delay_ms"),
    [
        (0, 0.999999, 499),  # first retry within the base
        (1, 0.5, 500),
        (3, 0.5, 2000),
        (5, 0.999999, 15_999),
        (6, 0.999999, 29_999),  # 32 s capped at 30 s
        (1000, 0.5, 15_000),  # no overflow however long the outage
        (-1, 0.5, 250),
        (4, 0.0, 0),  # full jitter reaches down to an immediate retry
    ],
)
def test_backoff_is_exponential_with_full_jitter_and_capped(
    logic: Page, attempt: int, random: float, delay_ms: int
) -> None:
    result = logic.evaluate(
        "([attempt, r]) => MBLogic.backoffDelay(attempt, 500, 30000, () => r)", [attempt, random]
    )
    assert result == delay_ms


@pytest.mark.parametrize(
    ("last", "seq", "retained", "verdict"),
    [
        (None, 5, False, {"action": "show", "missed": 0}),  # first tick of a topic
        (5, 6, False, {"action": "show", "missed": 0}),
        (5, 5, False, {"action": "stale", "missed": 0}),  # a copy (two matching subscriptions)
        (5, 4, False, {"action": "stale", "missed": 0}),
        (5, 9, False, {"action": "gap", "missed": 3}),
        (5, 2, True, {"action": "show", "missed": 0}),  # a snapshot resets the baseline
        (5, 70_000, True, {"action": "show", "missed": 0}),
        (5, None, False, {"action": "show", "missed": 0}),  # no seq: nothing to check
    ],
)
def test_seq_verdicts(
    logic: Page, last: int | None, seq: int | None, retained: bool, verdict: dict[str, Any]
) -> None:
    assert call(logic, "seqVerdict", last, seq, retained) == verdict


@pytest.mark.parametrize(
    ("ts", "parts"),
    [
        ("2026-11-30T12:00:00.123+01:00", {"date": "2026-11-30", "time": "12:00:00", "offset": "+01:00"}),
        ("2026-11-30T11:00:00.123Z", {"date": "2026-11-30", "time": "11:00:00", "offset": "+00:00"}),
        ("2026-11-30T07:30:00-03:30", {"date": "2026-11-30", "time": "07:30:00", "offset": "-03:30"}),
        ("2026-11-30T12:00:00.123", None),  # naive: no offset to show
        ("2026-11-30T12:00:00+01:00<b>", None),
        ("12:00", None),
        (1_796_191_193_000, None),
    ],
)
def test_timestamps_keep_the_offset_the_broker_gave(
    logic: Page, ts: Any, parts: dict[str, str] | None
) -> None:
    assert call(logic, "splitTs", ts) == parts


@pytest.mark.parametrize(
    ("value", "shown"),
    [("a" * 40, "a" * 40), ("a" * 41, "a" * 39 + "…"), (12.5, "12.5"), ("<b>x</b>", "<b>x</b>")],
)
def test_values_are_clipped(logic: Page, value: Any, shown: str) -> None:
    assert call(logic, "clip", value) == shown


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("market/luno/BTC-ZAR", {"exchange": "luno", "pair": "BTC-ZAR"}),
        ("market/luno", None),
        ("market/a/b/c", None),
        ("user/alice/fills", None),
        ("market/" + "x" * 33 + "/BTC-ZAR", None),
        ("market/<img src=x>/BTC-ZAR", None),
    ],
)
def test_topics_become_rows_only_in_the_market_shape(
    logic: Page, topic: str, parsed: dict[str, str] | None
) -> None:
    assert call(logic, "parseTopic", topic) == parsed


@pytest.mark.parametrize(
    ("fragment", "token"),
    [
        ("#token=abc", "abc"),
        ("#view=1&token=a.b.c", "a.b.c"),
        ("", None),
        ("#token=", None),
        ("#tok=x", None),
    ],
)
def test_the_token_comes_from_the_fragment(logic: Page, fragment: str, token: str | None) -> None:
    assert call(logic, "fragmentToken", fragment) == token


def _jwt(claims: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2ln"


@pytest.mark.parametrize(
    ("token", "claims"),
    [
        # '?>' and '~~~' encode to '-' and '_' in base64url: the decoder must map them back.
        (_jwt({"sub": "?>ü", "tz": "Africa/Lagos", "x": "~~~"}), {"sub": "?>ü", "tz": "Africa/Lagos"}),
        (_jwt({"sub": "demo"}), {"sub": "demo", "tz": None}),
        (_jwt({"sub": 5, "tz": ["x"]}), {"sub": None, "tz": None}),
        ("not-a-jwt", {"sub": None, "tz": None}),
    ],
)
def test_the_token_s_sub_and_zone_are_read_for_display(
    logic: Page, token: str, claims: dict[str, Any]
) -> None:
    assert call(logic, "tokenClaims", token) == claims


@pytest.mark.parametrize(
    ("values", "points"),
    [
        ([], ""),
        ([1], "0.0,11.0"),
        ([1, 1], "0.0,11.0 90.0,11.0"),
        ([0, 10], "0.0,21.0 90.0,1.0"),
        ([0, 5, 10], "0.0,21.0 45.0,11.0 90.0,1.0"),
    ],
)
def test_sparkline_points_fill_the_box(logic: Page, values: list[float], points: str) -> None:
    assert call(logic, "sparkPoints", values, 90, 22) == points
