"""Local-time rewriting of JSON payloads: timestamps shown in a subscriber's IANA zone.

Pure and I/O-free (apart from ``zoneinfo`` loading zone files once per name). The broker calls
:func:`rewrite` once per (message, zone); :class:`TopicSwitch` says for which topics it does.

``rewrite(payload, tz, fields=DEFAULT_FIELDS)`` rules:

- The payload is parsed as UTF-8 JSON (decoded explicitly as UTF-8). Only a top-level object or
  array is rewritten; anything else passes through unchanged with ``rewritten=False``: bytes
  not starting (after whitespace) with ``{`` or ``[`` (not even parsed), invalid UTF-8 or JSON,
  ``NaN``/``Infinity`` or numbers overflowing to infinity (they would make the output invalid
  JSON), integers longer than Python's 4300-digit limit, lone surrogates (``"\\ud800"``, not
  encodable as UTF-8), nesting too deep for the ``json`` module.
- Fields are keys named in ``fields``, found at any depth inside objects and arrays; the
  top-level container is depth 1 and containers deeper than 32 are left as they are.
- A field holding a string that ``datetime.fromisoformat`` reads as ISO-8601 *with* an offset
  (``Z``, ``+hh:mm``, ...) becomes the same instant in ``tz``, ISO-8601 with its offset::

      "2026-11-30T11:00:00.123Z" in Africa/Lagos -> "2026-11-30T12:00:00.123+01:00"

  with milliseconds when the input had a fraction (finer digits are truncated), whole seconds
  otherwise. UTC renders ``+00:00``. Naive strings, strings that are not timestamps (or
  longer than 64 characters) and instants outside years 1..9999 once converted are left
  unchanged.
- A field holding a number (int or float, not bool) is a Unix epoch timestamp: seconds, or
  milliseconds when ``abs(value) > 1e11`` (1e11 s is the year 5138, 1e11 ms is March 1973).
  The number stays and gains a sibling ``<field>_local`` right after it, local ISO-8601 with
  milliseconds; an existing ``<field>_local`` is replaced. Numbers out of ``datetime``'s range
  gain no sibling (and an existing one is left as it is).
- A top-level object gains ``"tz": "<zone name>"`` at the end, or has its ``tz`` overwritten
  in place.
- Output is compact JSON (``,`` and ``:`` separators, no ASCII escaping, UTF-8) in the input's
  key order; duplicate keys keep the last value, as ``json.loads`` does. Numbers keep their
  value exactly (floats via ``repr``, ints unbounded) though not always their spelling
  (``1E2`` -> ``100.0``). ``rewritten=True`` for every object/array re-serialised, even when
  no field was found.
- Rewriting the output again with the same zone returns identical bytes; with another zone
  the instants stay the same.

An unknown or invalid ``tz`` raises :class:`ValueError` whatever the payload.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bridge.core.topics import is_valid_filter, matches

__all__ = [
    "DEFAULT_FIELDS",
    "LOCAL_SUFFIX",
    "LocalClock",
    "Rewritten",
    "TopicSwitch",
    "is_valid_zone",
    "rewrite",
    "zone",
]

DEFAULT_FIELDS: frozenset[str] = frozenset({"ts", "timestamp", "time", "created", "at"})
LOCAL_SUFFIX = "_local"

_MAX_DEPTH: Final = 32
_MS_THRESHOLD: Final = 1e11
# Longer strings are not timestamps; spares fromisoformat a pointless attempt on big texts.
_MAX_TS_LEN: Final = 64
_MEMO_LIMIT: Final = 10_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND: Final = timedelta(seconds=1)
_OPENERS: Final = (b"{", b"[")


@dataclass(frozen=True)
class Rewritten:
    payload: bytes
    rewritten: bool  # False: passed through unchanged (not JSON, binary, no object/array, ...)


@functools.lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The zone called ``name``; ValueError if unknown or not a valid key (e.g. a path)."""
    try:
        return ZoneInfo(name)
    # ZoneInfo raises KeyError subclass for unknown names, ValueError for malformed keys or
    # non-TZif files, OSError for directories ("Africa"); callers get one exception type.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def is_valid_zone(name: str) -> bool:
    try:
        zone(name)
    except ValueError:
        return False
    return True


def _refuse_constant(name: str) -> NoReturn:
    # NaN/Infinity are not JSON; re-emitting them would hand subscribers invalid JSON.
    raise ValueError(f"non-finite number {name}")


# Built once: json.loads/dumps with non-default options build a new codec per call (~2x slower).
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)
# allow_nan=False refuses 1e999 (parsed as inf); encoding to UTF-8 refuses lone surrogates.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _Rewriter:
    # Exact type checks are safe (json.loads builds only dict, list, str, int, float, bool,
    # None) and faster than isinstance; `type(x) is int` also leaves bools out.
    __slots__ = ("fields", "zone")

    def __init__(self, tz: ZoneInfo, fields: frozenset[str]) -> None:
        self.zone = tz
        self.fields = fields

    def array(self, items: list[Any], depth: int) -> list[Any]:
        if depth > _MAX_DEPTH:
            return items
        out: list[Any] = []
        for item in items:
            kind = type(item)
            if kind is dict:
                out.append(self.obj(item, depth + 1))
            elif kind is list:
                out.append(self.array(item, depth + 1))
            else:
                out.append(item)
        return out

    def obj(self, obj: dict[str, Any], depth: int) -> dict[str, Any]:
        if depth > _MAX_DEPTH:
            return obj
        fields = self.fields
        out: dict[str, Any] = {}
        placed: set[str] | None = None  # siblings already written; later copies are dropped
        for key, value in obj.items():
            if placed is not None and key in placed:
                continue
            kind = type(value)
            if key in fields:
                if kind is str:
                    out[key] = self.text(value)
                    continue
                if kind is int or kind is float:
                    out[key] = value
                    local = self.epoch(value)
                    if local is not None:
                        sibling = key + LOCAL_SUFFIX
                        out.pop(sibling, None)  # an earlier copy moves to right after its field
                        out[sibling] = local
                        if placed is None:
                            placed = set()
                        placed.add(sibling)
                    continue
            if kind is dict:
                out[key] = self.obj(value, depth + 1)
            elif kind is list:
                out[key] = self.array(value, depth + 1)
            else:
                out[key] = value
        return out

    def text(self, text: str) -> str:
        if len(text) > _MAX_TS_LEN:
            return text
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return text
        if moment.tzinfo is None:
            return text
        try:
            local = moment.astimezone(self.zone)
        except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
            return text
        # A date never holds '.' or ',', so either one means the time had a fraction.
        timespec = "milliseconds" if "." in text or "," in text else "seconds"
        return local.isoformat(timespec=timespec)

    def epoch(self, value: float) -> str | None:
        try:
            delta = timedelta(milliseconds=value) if abs(value) > _MS_THRESHOLD else timedelta(seconds=value)
            local = (_EPOCH + delta).astimezone(self.zone)
        except (OverflowError, ValueError):
            return None
        return local.isoformat(timespec="milliseconds")


def rewrite(payload: bytes, tz: str, *, fields: frozenset[str] = DEFAULT_FIELDS) -> Rewritten:
    """``payload`` with its timestamps in zone ``tz`` (rules in the module docstring)."""
    local_zone = zone(tz)  # first, so a bad zone fails loudly even for pass-through payloads
    if payload.lstrip()[:1] not in _OPENERS:
        return Rewritten(payload, False)
    try:
        data = _DECODER.decode(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return Rewritten(payload, False)
    rewriter = _Rewriter(local_zone, fields)
    if type(data) is dict:
        data = rewriter.obj(data, 1)
        data["tz"] = tz
    elif type(data) is list:
        data = rewriter.array(data, 1)
    else:  # unreachable after the opener check, kept as a guard
        return Rewritten(payload, False)
    try:
        return Rewritten(_ENCODER.encode(data).encode("utf-8"), True)
    except (ValueError, RecursionError):
        return Rewritten(payload, False)


class LocalClock:
    """UTC instants as local ISO-8601 with milliseconds, the way :func:`rewrite` spells them.

    The broker's hot path: a tick's ``ts`` in each subscriber zone, per tick. The zone's
    conversion is done once per (zone, second) and cached; the milliseconds are appended.
    ``local_ms(moment, tz)`` equals ``rewrite``'s output for that instant written with a
    fraction (a property test holds them to it); ``utc_ms`` equals ``bridge.core.tick.format_ts``.
    """

    __slots__ = ("_seconds",)

    def __init__(self) -> None:
        # zone -> (epoch second, "YYYY-MM-DDTHH:MM:SS", "+hh:mm"); "" -> UTC with "Z"
        self._seconds: dict[str, tuple[int, str, str]] = {}

    @staticmethod
    def split(moment: datetime) -> tuple[int, int]:
        """(epoch second, millisecond) of an aware instant, floored (pre-1970 too)."""
        return (moment - _EPOCH) // _SECOND, moment.microsecond // 1000

    def local_ms(self, moment: datetime, tz: str) -> str | None:
        """``moment`` (aware) in ``tz``; None where ``rewrite`` would leave it unchanged."""
        second, ms = self.split(moment)
        return self.local_at(second, ms, tz)

    def local_at(self, second: int, ms: int, tz: str) -> str | None:
        cached = self._seconds.get(tz)
        if cached is None or cached[0] != second:
            try:
                text = datetime.fromtimestamp(second, zone(tz)).isoformat(timespec="seconds")
            except (OverflowError, ValueError, OSError):
                return None
            if len(text) != 25:  # an offset with seconds (LMT-era instants): rare, not cached
                return f"{text[:19]}.{ms:03d}{text[19:]}"
            cached = self._remember(tz, second, text[:19], text[19:])
        return f"{cached[1]}.{ms:03d}{cached[2]}"

    def utc_at(self, second: int, ms: int) -> str:
        """``2026-11-30T11:00:00.123Z``, as ``format_ts`` writes it."""
        cached = self._seconds.get("")
        if cached is None or cached[0] != second:
            text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
            cached = self._remember("", second, text[:19], "Z")
        return f"{cached[1]}.{ms:03d}Z"

    def _remember(self, key: str, second: int, prefix: str, offset: str) -> tuple[int, str, str]:
        if len(self._seconds) >= _MEMO_LIMIT:
            self._seconds.clear()
        entry = self._seconds[key] = (second, prefix, offset)
        return entry


class TopicSwitch:
    """Per-topic-pattern on/off for rewriting: first matching rule wins, default on."""

    def __init__(self, rules: Sequence[tuple[str, bool]] = ()) -> None:
        for topic_filter, _ in rules:
            if not is_valid_filter(topic_filter):
                raise ValueError(f"invalid topic filter {topic_filter!r}")
        self._rules = tuple((topic_filter, bool(enabled)) for topic_filter, enabled in rules)
        self._memo: dict[str, bool] = {}
        self.always_on = not any(not enabled for _, enabled in self._rules)  # enabled() is always True

    def enabled(self, topic: str) -> bool:
        known = self._memo.get(topic)
        if known is not None:
            return known
        result = next((on for topic_filter, on in self._rules if matches(topic, topic_filter)), True)
        # Topics are client-chosen: clear rather than grow without bound (LRU is not worth it).
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[topic] = result
        return result
