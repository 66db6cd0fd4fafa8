"""open_envelope: plain payloads pass through; envelopes set priority and TTL; bad ones are refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.envelope import Envelope, EnvelopeError, open_envelope
from bridge.core.store import Priority

DEFAULT_TTL, MAX_TTL = 3600.0, 86400.0


def _open(data: bytes) -> Envelope:
    return open_envelope(data, default_ttl_s=DEFAULT_TTL, max_ttl_s=MAX_TTL)


def _env(**fields: Any) -> bytes:
    return json.dumps({"mb_envelope": 1, **fields}).encode()


@pytest.mark.parametrize(
    "data",
    [b"hello", b"", b"\xff\x00binary", b"[1,2]", b'{"alert": "x"}', b"{not json", b'{"mb": 1}', b"  plain  "],
)
def test_plain_payloads_are_delivered_as_they_are(data: bytes) -> None:
    assert _open(data) == Envelope(data, Priority.NORMAL, DEFAULT_TTL)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_env(payload="fill 0.5 BTC"), Envelope(b"fill 0.5 BTC", Priority.NORMAL, DEFAULT_TTL)),
        (_env(payload={"a": 1}, priority="urgent"), Envelope(b'{"a":1}', Priority.URGENT, DEFAULT_TTL)),
        (_env(payload=[1, 2], priority="LOW", ttl_s=5), Envelope(b"[1,2]", Priority.LOW, 5.0)),
        (_env(payload=None, priority="High", ttl_s=0.5), Envelope(b"null", Priority.HIGH, 0.5)),
        (
            _env(payload_b64=base64.b64encode(b"\x00\x01").decode(), ttl_s=MAX_TTL),
            Envelope(b"\x00\x01", Priority.NORMAL, MAX_TTL),
        ),
    ],
)
def test_envelopes_set_priority_and_ttl(data: bytes, expected: Envelope) -> None:
    assert _open(data) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (json.dumps({"mb_envelope": 2, "payload": 1}).encode(), "bad_version"),
        (json.dumps({"mb_envelope": True, "payload": 1}).encode(), "bad_version"),
        (_env(payload=1, extra=2), "unknown_field"),
        (_env(payload=1, priority="CRITICAL"), "bad_priority"),
        (_env(payload=1, priority=3), "bad_priority"),
        (_env(payload=1, ttl_s=0), "bad_ttl"),
        (_env(payload=1, ttl_s=-5), "bad_ttl"),
        (_env(payload=1, ttl_s="60"), "bad_ttl"),
        (_env(payload=1, ttl_s=True), "bad_ttl"),
        (_env(payload=1, ttl_s=MAX_TTL + 1), "bad_ttl"),
        (b'{"mb_envelope": 1, "payload": 1, "ttl_s": NaN}', "bad_ttl"),
        (_env(), "bad_payload"),
        (_env(payload=1, payload_b64="AA=="), "bad_payload"),
        (_env(payload_b64="***"), "bad_payload"),
        (_env(payload_b64=5), "bad_payload"),
    ],
)
def test_malformed_envelopes_are_refused_whole(data: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        _open(data)
    assert caught.value.reason == reason


@given(st.binary(max_size=200))
def test_any_bytes_either_open_or_raise_envelope_error(data: bytes) -> None:
    try:
        result = _open(data)
    except EnvelopeError:
        return
    assert isinstance(result.priority, Priority)
    assert result.ttl_s > 0
