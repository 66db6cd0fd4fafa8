"""The one tick model every feed produces and the broker validates.

Wire form (JSON object, keys in this order, compact separators)::

    {"exchange":"luno","pair":"BTC-ZAR","bid":"1234.5","ask":"1235","last":"1234.9",
     "volume_24h":"12.3","ts":"2026-11-30T11:00:00.123Z","seq":42}

- ``exchange``: lower case ``[a-z][a-z0-9_]*``; ``pair``: canonical ``BASE-QUOTE`` (feeds.pairs).
- prices and volume: non-negative decimal *strings*; a JSON number is refused (floats lose cents).
- ``ts``: ISO-8601 with an explicit offset; stored and sent as UTC with milliseconds and ``Z``.
- ``seq``: per-topic, strictly increasing; the broker re-stamps it (it is the sequencer), so
  subscribers see 1, 2, 3, ... per topic whatever feeds restart, and never a number twice
  whatever the broker does (after a crash it skips ahead: bridge.core.sequencer).
- topic: ``market/<exchange>/<pair>``, e.g. ``market/luno/BTC-ZAR``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from bridge.core.topics import MARKET_PREFIX
from bridge.errors import TickError

__all__ = [
    "MAX_TICK_BYTES",
    "Tick",
    "TickParts",
    "format_ts",
    "market_topic",
    "parse_market_topic",
]

MAX_TICK_BYTES: Final = 4096
PRICE_FIELDS: Final = ("bid", "ask", "last", "volume_24h")

_EXCHANGE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
_PAIR_PATTERN = r"^[A-Z0-9]{2,10}-[A-Z0-9]{2,10}$"
# No sign, no exponent, no leading zeros: one spelling per value, so payloads compare byte-wise.
_DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,29})(\.[0-9]{1,18})?$"
_TOPIC = re.compile(r"^market/([a-z][a-z0-9_]{0,31})/([A-Z0-9]{2,10}-[A-Z0-9]{2,10})$")

DecimalStr = Annotated[str, StringConstraints(strict=True, pattern=_DECIMAL_PATTERN)]


def format_ts(moment: datetime) -> str:
    """UTC ISO-8601 with milliseconds and ``Z``: ``2026-11-30T11:00:00.123Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def market_topic(exchange: str, pair: str) -> str:
    return f"{MARKET_PREFIX}{exchange}/{pair}"


def parse_market_topic(topic: str) -> tuple[str, str] | None:
    """``market/luno/BTC-ZAR`` -> ``("luno", "BTC-ZAR")``; None if not canonical."""
    match = _TOPIC.fullmatch(topic)
    return (match.group(1), match.group(2)) if match else None


class Tick(BaseModel):
    """A validated, normalised ticker snapshot for one pair on one exchange."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exchange: Annotated[str, StringConstraints(strict=True, pattern=_EXCHANGE_PATTERN)]
    pair: Annotated[str, StringConstraints(strict=True, pattern=_PAIR_PATTERN)]
    bid: DecimalStr
    ask: DecimalStr
    last: DecimalStr
    volume_24h: DecimalStr
    ts: datetime
    seq: Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)] = 0

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_is_aware_iso(cls, value: Any) -> datetime:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, str) and 10 <= len(value) <= 40:
            try:
                moment = datetime.fromisoformat(value)
            except ValueError as exc:
                raise ValueError(f"not ISO-8601: {value!r}") from exc
        else:
            raise ValueError("must be an ISO-8601 string")
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError("needs an explicit UTC offset (e.g. 'Z')")
        try:
            utc = moment.astimezone(UTC)
        except OverflowError:
            raise ValueError("out of range once converted to UTC") from None
        return utc.replace(microsecond=utc.microsecond // 1000 * 1000)

    @property
    def topic(self) -> str:
        return market_topic(self.exchange, self.pair)

    def with_seq(self, seq: int) -> Tick:
        return self.model_copy(update={"seq": seq})

    def to_wire(self) -> dict[str, str | int]:
        return {
            "exchange": self.exchange,
            "pair": self.pair,
            "bid": self.bid,
            "ask": self.ask,
            "last": self.last,
            "volume_24h": self.volume_24h,
            "ts": format_ts(self.ts),
            "seq": self.seq,
        }

    def encode(self, seq: int | None = None) -> bytes:
        """Deterministic compact JSON (field order fixed), with ``seq`` if given.

        Byte-identical to ``json.dumps(self.to_wire(), separators=(",", ":"))``: every string
        field is validated against a pattern with nothing JSON would escape, so formatting
        is exact and several times cheaper (this runs once per tick on the broker's hot path).
        """
        return self.wire_head() + b'"ts":"' + format_ts(self.ts).encode() + self.wire_tail(seq)

    def wire_head(self) -> bytes:
        """The wire form up to the ``ts`` field (shared by every time-zone variant)."""
        return (
            f'{{"exchange":"{self.exchange}","pair":"{self.pair}","bid":"{self.bid}","ask":"{self.ask}",'
            f'"last":"{self.last}","volume_24h":"{self.volume_24h}",'
        ).encode()

    def wire_tail(self, seq: int | None = None) -> bytes:
        return b'","seq":' + str(self.seq if seq is None else seq).encode() + b"}"

    @classmethod
    def decode(cls, payload: bytes, *, topic: str | None = None) -> Tick:
        """Validate a wire payload; raise :class:`TickError` with a stable reason code.

        With ``topic`` given, the tick must belong to it (``wrong_topic`` otherwise).
        """
        if len(payload) > MAX_TICK_BYTES:
            raise TickError("too_large", f"{len(payload)} bytes > {MAX_TICK_BYTES}")
        try:
            # pydantic-core parses the JSON itself (strict UTF-8), skipping a dict round trip.
            tick = cls.model_validate_json(payload)
        except ValidationError as exc:
            raise _tick_error(exc) from None
        if topic is not None and tick.topic != topic:
            raise TickError("wrong_topic", f"tick is for {tick.topic!r}, published to {topic!r}")
        return tick


class TickParts:
    """A sequenced tick's wire form (``data``) and the pieces every time-zone variant shares:
    ``data == head + b'"ts":"' + ts + tail``, ``ts`` being the instant (``second``, ``ms``)
    in UTC. A variant swaps ``ts`` without parsing JSON again."""

    __slots__ = ("data", "head", "ms", "second", "tail", "ts")

    def __init__(self, data: bytes, head: bytes, ts: str, tail: bytes, second: int, ms: int) -> None:
        self.data = data
        self.head = head
        self.ts = ts
        self.tail = tail
        self.second = second
        self.ms = ms


def _tick_error(exc: ValidationError) -> TickError:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "tick"
    kind = first["type"]
    if kind == "json_invalid":
        return TickError("not_json", first["msg"])
    if kind == "model_type":
        return TickError("not_object", f"expected a JSON object: {first['msg']}")
    if kind == "missing":
        reason = "missing_field"
    elif kind == "extra_forbidden":
        reason = "unknown_field"
    elif field in PRICE_FIELDS and isinstance(first.get("input"), int | float):
        reason = "float_price"
    elif field in PRICE_FIELDS:
        reason = "bad_decimal"
    elif field == "ts":
        reason = "bad_timestamp"
    else:
        reason = f"bad_{field}"
    return TickError(reason, f"{field}: {first['msg']}")
