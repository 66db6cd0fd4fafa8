"""User-addressed message envelopes: how a sender sets priority and TTL.

A payload published to ``user/<sub>/<anything>`` is delivered as it is, NORMAL priority,
default TTL, unless it is an envelope: a JSON object carrying ``"mb_envelope": 1``::

    {"mb_envelope": 1, "priority": "HIGH", "ttl_s": 600, "payload": {"alert": "BTC-ZAR > 1.7M"}}

- ``priority``: LOW, NORMAL (default), HIGH or URGENT (any case).
- ``ttl_s``: seconds the message may wait for an offline user (default from config).
- exactly one of ``payload`` (a JSON value; a string is delivered as its UTF-8 text, any
  other value as compact JSON) or ``payload_b64`` (base64 bytes, for binary payloads).

The subscriber receives only the inner payload. An object with ``mb_envelope`` that breaks
these rules is refused whole (:class:`EnvelopeError`), never half-stored.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from bridge.core.store import Priority
from bridge.errors import MessageError

__all__ = ["ENVELOPE_KEY", "Envelope", "EnvelopeError", "open_envelope"]

ENVELOPE_KEY = "mb_envelope"
_ENVELOPE_KEY_BYTES = ENVELOPE_KEY.encode()
_FIELDS = frozenset({ENVELOPE_KEY, "priority", "ttl_s", "payload", "payload_b64"})


class EnvelopeError(MessageError):
    """A malformed envelope; ``reason`` is a stable code for metrics."""


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    priority: Priority
    ttl_s: float


def open_envelope(data: bytes, *, default_ttl_s: float, max_ttl_s: float) -> Envelope:
    """The message to deliver: the envelope's content, or ``data`` itself when not an envelope."""
    plain = Envelope(data, Priority.NORMAL, default_ttl_s)
    if not data.lstrip().startswith(b"{"):
        return plain
    if _ENVELOPE_KEY_BYTES not in data and b"\\u" not in data:
        return plain  # no key could be spelled in it: skip parsing a plain JSON payload
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return plain
    if not isinstance(obj, dict) or ENVELOPE_KEY not in obj:
        return plain
    return _parse(obj, default_ttl_s=default_ttl_s, max_ttl_s=max_ttl_s)


def _parse(obj: dict[str, Any], *, default_ttl_s: float, max_ttl_s: float) -> Envelope:
    version = obj[ENVELOPE_KEY]
    if type(version) is not int or version != 1:  # not bool: True == 1 in Python
        raise EnvelopeError("bad_version", f"{ENVELOPE_KEY} must be 1, got {obj[ENVELOPE_KEY]!r}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise EnvelopeError("unknown_field", f"unknown fields {unknown}")
    priority_name = obj.get("priority", "NORMAL")
    if not isinstance(priority_name, str) or priority_name.upper() not in Priority.__members__:
        raise EnvelopeError("bad_priority", f"priority must be one of {list(Priority.__members__)}")
    ttl = obj.get("ttl_s", default_ttl_s)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise EnvelopeError("bad_ttl", "ttl_s must be a positive number")
    if ttl > max_ttl_s:
        raise EnvelopeError("bad_ttl", f"ttl_s must be at most {max_ttl_s:g}")
    if ("payload" in obj) == ("payload_b64" in obj):
        raise EnvelopeError("bad_payload", "give exactly one of payload and payload_b64")
    if "payload_b64" in obj:
        encoded = obj["payload_b64"]
        if not isinstance(encoded, str):
            raise EnvelopeError("bad_payload", "payload_b64 must be a base64 string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise EnvelopeError("bad_payload", "payload_b64 is not valid base64") from None
    else:
        inner = obj["payload"]
        payload = (
            inner.encode() if isinstance(inner, str) else json.dumps(inner, separators=(",", ":")).encode()
        )
    return Envelope(payload, Priority[priority_name.upper()], float(ttl))
