"""Token checking as pure code: ``decide_auth(token, username, now, keys, policy)``.

No I/O and no clock: keys arrive loaded (``bridge.keys``), ``now`` is passed in. The
result is :class:`Claims` or an :class:`~bridge.errors.AuthError` with a stable reason.
``decide_verified`` decides the same and keeps what a later decision on the same token
needs (:class:`Verified`: the claims and the time claims), for ``bridge.token_cache``.

Reasons: missing_token, too_large, malformed, bad_alg, unknown_kid, bad_signature,
missing_claim, expired, not_yet_valid, bad_audience, bad_issuer, bad_claims,
username_mismatch.

Time claims are checked here against ``now`` (PyJWT's own checks read the wall clock, so
they are switched off). ``AuthError.detail`` never quotes the token; claim and header values
it names are clipped.
"""

from __future__ import annotations

import functools
import math
import sys
import zoneinfo
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from bridge.core.ratelimit import MAX_RATE, MIN_RATE, valid_rate
from bridge.core.topics import is_valid_filter
from bridge.errors import AuthError

if TYPE_CHECKING:
    from bridge.config import AuthConfig

__all__ = [
    "ROLES",
    "Claims",
    "ClaimsModel",
    "KeyRing",
    "Role",
    "SigningKey",
    "TokenPolicy",
    "VerificationKey",
    "Verified",
    "decide_auth",
    "decide_verified",
    "mint_token",
]

Role = Literal["subscriber", "feed", "service", "admin"]
ROLES: tuple[Role, ...] = ("subscriber", "feed", "service", "admin")
_ROLE_NAMES: dict[str, Role] = {role: role for role in ROLES}

_MAX_SUB_CHARS = 128
_MAX_ACL_ENTRIES = 32
_MAX_TZ_CHARS = 64
_SUB_FORBIDDEN = ("/", "+", "#", "\x00")


def _clip(value: object, limit: int = 40) -> str:
    """``repr`` of a header or claim value, short enough for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=1024)
def _known_zone(name: str) -> bool:
    """Is ``name`` an IANA zone key ``zoneinfo`` can load (tzdata is a dependency)?"""
    if not name or len(name) > _MAX_TZ_CHARS:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except Exception:  # ValueError, ZoneInfoNotFoundError, IsADirectoryError, ...: all "no"
        return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """What the broker uses from a verified token: made by :func:`decide_auth` from a
    validated :class:`ClaimsModel`. A slotted record, not the pydantic model, because every
    connection (and the token cache, one entry per token) holds one: ~80 bytes, not ~600."""

    sub: str
    role: Role = "subscriber"
    tz: str | None = None
    sub_acl: tuple[str, ...] | None = None
    pub_acl: tuple[str, ...] | None = None
    rate: float | None = None  # max updates per second per topic; overrides the role's
    exp: float


class ClaimsModel(BaseModel):
    """The token's claims as validated (see :class:`Claims` for what is kept)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sub: str
    role: Role = "subscriber"
    tz: str | None = None
    sub_acl: tuple[str, ...] | None = None
    pub_acl: tuple[str, ...] | None = None
    # Max updates per second per topic delivered to this user; overrides the role's setting.
    rate: float | None = None
    exp: float

    @field_validator("sub")
    @classmethod
    def _sub_is_one_topic_level(cls, value: str) -> str:
        # The sub is the MQTT username and replaces '{sub}' in ACL filters: it must be
        # exactly one literal topic level, never a wildcard or a '$' (system) level.
        if not 1 <= len(value) <= _MAX_SUB_CHARS:
            raise ValueError(f"must be 1 to {_MAX_SUB_CHARS} characters")
        if any(char in value for char in _SUB_FORBIDDEN):
            raise ValueError("must not contain '/', '+', '#' or NUL")
        if value.startswith("$"):
            raise ValueError("must not start with '$'")
        return value

    @field_validator("tz")
    @classmethod
    def _tz_is_iana(cls, value: str | None) -> str | None:
        if value is not None and not _known_zone(value):
            raise ValueError(f"tz {_clip(value)} is not a known IANA time zone")
        return value

    @field_validator("rate", mode="before")
    @classmethod
    def _rate_in_range(cls, value: object) -> object:
        # A bad rate refuses the token instead of being ignored: ignoring it would run the user
        # at the role's rate (by default unlimited), so an issuer's mistake would fail open.
        if value is None:
            return None
        rate = valid_rate(value)
        if rate is None:
            raise ValueError(
                f"rate {_clip(value)} is not a number of updates per second from {MIN_RATE:g} to {MAX_RATE:.0f}"
            )
        return rate

    @field_validator("sub_acl", "pub_acl")
    @classmethod
    def _acl_filters(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if len(value) > _MAX_ACL_ENTRIES:
            raise ValueError(f"at most {_MAX_ACL_ENTRIES} filters, got {len(value)}")
        for index, topic_filter in enumerate(value):
            if not is_valid_filter(topic_filter):
                raise ValueError(f"entry {index} {_clip(topic_filter)} is not a valid MQTT topic filter")
        return value


@dataclass(frozen=True)
class VerificationKey:
    """``key`` is ``bytes`` for HMAC, a cryptography public key object otherwise."""

    kid: str | None
    key: Any
    algorithms: frozenset[str]


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[VerificationKey, ...]
    _by_kid: dict[str, VerificationKey] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        by_kid: dict[str, VerificationKey] = {}
        for key in self.keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, key)  # the first wins; bridge.keys refuses duplicates
        object.__setattr__(self, "_by_kid", by_kid)

    def select(self, kid: str | None) -> VerificationKey | None:
        """The key named ``kid``; a token without kid gets the only key, if there is one."""
        if kid is None:
            return self.keys[0] if len(self.keys) == 1 else None
        return self._by_kid.get(kid)


@dataclass(frozen=True)
class SigningKey:
    """``key`` is ``bytes`` for HMAC, a cryptography private key object otherwise."""

    kid: str | None
    key: Any
    algorithm: str


@dataclass(frozen=True)
class TokenPolicy:
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = 30.0
    require_iat: bool = False
    max_token_bytes: int = 8192

    @classmethod
    def from_config(cls, auth: AuthConfig) -> TokenPolicy:
        """The one policy for every way in (MQTT CONNECT, the admin API): a field added here
        applies to all of them, so no door checks tokens more loosely than another."""
        return cls(
            audience=auth.audience,
            issuer=auth.issuer,
            leeway_s=auth.leeway_s,
            require_iat=auth.require_iat,
            max_token_bytes=auth.max_token_bytes,
        )


def _number(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (bools, strings, NaN, 1e999)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _verify(text: str, key: VerificationKey, alg: str, policy: TokenPolicy) -> dict[str, Any] | AuthError:
    """Signature, aud, iss and presence of required claims, by PyJWT (its clock unused)."""
    options: Options = {
        "verify_signature": True,
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_aud": policy.audience is not None,
        "verify_iss": True,
        "verify_sub": True,
        "verify_jti": True,
        "require": ["exp", "sub", "iat"] if policy.require_iat else ["exp", "sub"],
    }
    try:
        return jwt.decode(
            text,
            key.key,
            algorithms=[alg],
            options=options,
            audience=policy.audience,
            issuer=policy.issuer,
        )
    except jwt.InvalidSignatureError:
        return AuthError("bad_signature", "signature verification failed")
    except jwt.InvalidAudienceError:
        return AuthError("bad_audience", f"aud does not include {policy.audience!r}")
    except jwt.InvalidIssuerError:
        return AuthError("bad_issuer", f"iss is not {policy.issuer!r}")
    except jwt.MissingRequiredClaimError as exc:
        return AuthError("missing_claim", f"claim {exc.claim!r} is required")
    except jwt.InvalidAlgorithmError:
        return AuthError("bad_alg", f"alg {_clip(alg)} is not allowed for this key")
    except (InvalidSubjectError, InvalidJTIError) as exc:
        # PyJWT's own type checks on sub and jti: a claims problem, not a malformed token.
        return AuthError("bad_claims", str(exc))
    except jwt.PyJWTError as exc:
        return AuthError("malformed", f"token cannot be decoded ({type(exc).__name__})")
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        return AuthError("malformed", f"token cannot be decoded ({type(exc).__name__})")


def _check_times(payload: dict[str, Any], now: float, leeway: float) -> AuthError | None:
    exp = _number(payload.get("exp"))
    if exp is None:
        return AuthError("bad_claims", "exp must be a finite number")
    if now > exp + leeway:
        return AuthError("expired", f"expired at {exp:.0f} (now {now:.0f}, leeway {leeway:g}s)")
    for name in ("nbf", "iat"):
        if name not in payload:
            continue
        value = _number(payload[name])
        if value is None:
            return AuthError("bad_claims", f"{name} must be a finite number")
        if value > now + leeway:
            return AuthError("not_yet_valid", f"{name} {value:.0f} is in the future (now {now:.0f})")
    return None


def _time_claims(payload: dict[str, Any]) -> dict[str, float]:
    """exp, and nbf and iat when present, as floats (``_check_times`` has passed them)."""
    times: dict[str, float] = {}
    for name in ("exp", "nbf", "iat"):
        if name in payload and (value := _number(payload[name])) is not None:
            times[name] = value
    return times


def _username_mismatch(username: str | None) -> AuthError:
    return AuthError("username_mismatch", f"username {_clip(username)} is not the token's sub")


@dataclass(frozen=True, slots=True)
class Verified:
    """A token whose every check passed once: what is left to decide depends on ``now`` and
    the username only (its bytes, key, signature, aud, iss and claims cannot change)."""

    claims: Claims
    # nbf and iat when the token has them (exp is the claims'): finite numbers. Fields, not
    # a dict: the token cache holds one Verified per token, ~one per connection.
    nbf: float | None = None
    iat: float | None = None

    @property
    def times(self) -> dict[str, float]:
        """exp, and nbf and iat when the token has them."""
        times = {"exp": self.claims.exp}
        if self.nbf is not None:
            times["nbf"] = self.nbf
        if self.iat is not None:
            times["iat"] = self.iat
        return times

    def admit(self, username: str | None, now: float, leeway_s: float) -> Claims | AuthError:
        """The claims if the token is valid at ``now`` and ``username`` is its sub, as ``decide_auth``
        decides it: expired past exp + leeway, not_yet_valid before nbf / iat - leeway."""
        if (problem := _check_times(self.times, now, leeway_s)) is not None:
            return problem
        if username != self.claims.sub:
            return _username_mismatch(username)
        return self.claims


def _claims(payload: dict[str, Any]) -> Claims | AuthError:
    try:
        model = ClaimsModel.model_validate(payload)
        return Claims(
            sub=model.sub,
            # One string per role and per zone name for all connections, not one per token.
            role=_ROLE_NAMES[model.role],
            tz=sys.intern(model.tz) if model.tz is not None else None,
            sub_acl=model.sub_acl,
            pub_acl=model.pub_acl,
            rate=model.rate,
            exp=model.exp,
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "claims"
        return AuthError("bad_claims", f"claim {where}: {first['msg']}")
    except (ValueError, TypeError, RecursionError) as exc:
        return AuthError("bad_claims", f"claims cannot be validated ({type(exc).__name__})")


def decide_auth(
    token: str | bytes | None, username: str | None, now: float, keys: KeyRing, policy: TokenPolicy
) -> Claims | AuthError:
    """Claims of a valid token whose ``sub`` is ``username``, else why not. Never raises."""
    decision = decide_verified(token, username, now, keys, policy)
    return decision.claims if isinstance(decision, Verified) else decision


def decide_verified(
    token: str | bytes | None, username: str | None, now: float, keys: KeyRing, policy: TokenPolicy
) -> Verified | AuthError:
    """``decide_auth``, keeping the token's time claims: :meth:`Verified.admit` decides the same
    token again at another ``now`` without verifying it again. Never raises."""
    if token is None or (isinstance(token, str | bytes) and len(token) == 0):
        return AuthError("missing_token", "no token given (the token is the MQTT password)")
    if not isinstance(token, str | bytes):
        return AuthError("malformed", f"token must be text, got {type(token).__name__}")
    # Size first, before any decoding: a huge password must be refused for O(1).
    # A str of n characters has at least n UTF-8 bytes, and only ASCII passes below.
    if len(token) > policy.max_token_bytes:
        return AuthError("too_large", f"token is longer than {policy.max_token_bytes} bytes")
    if isinstance(token, bytes):
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            return AuthError("malformed", "token is not ASCII")
    else:
        if not token.isascii():
            return AuthError("malformed", "token is not ASCII")
        text = token

    if text.count(".") != 2:
        return AuthError("malformed", "not a JWT (a JWS has three dot-separated parts)")
    try:
        # Only the header segment: PyJWT checks base64 character by character in Python, so
        # handing it the whole token here would pay that twice (jwt.decode does it again).
        header = jwt.get_unverified_header(text.partition(".")[0] + "..")
    except jwt.PyJWTError as exc:
        return AuthError("malformed", f"not a JWT ({type(exc).__name__})")
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        return AuthError("malformed", f"not a JWT ({type(exc).__name__})")

    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        return AuthError("bad_alg", f"alg {_clip(alg)} is not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return AuthError("malformed", "kid must be a string")
    key = keys.select(kid)
    if key is None:
        if kid is None:
            return AuthError("unknown_kid", "token has no kid and more than one key is configured")
        return AuthError("unknown_kid", f"no key with kid {_clip(kid)}")
    if alg not in key.algorithms:
        return AuthError("bad_alg", f"alg {_clip(alg)} is not allowed for this key")

    payload = _verify(text, key, alg, policy)
    if isinstance(payload, AuthError):
        return payload
    if (problem := _check_times(payload, now, policy.leeway_s)) is not None:
        return problem
    claims = _claims(payload)
    if isinstance(claims, AuthError):
        return claims
    if username != claims.sub:
        return _username_mismatch(username)
    times = _time_claims(payload)
    return Verified(claims, times.get("nbf"), times.get("iat"))


def mint_token(
    key: SigningKey,
    *,
    sub: str,
    role: Role,
    now: float,
    ttl_s: float,
    tz: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed token for ``sub``; ``extra`` claims are merged last (they win, e.g. in tests)."""
    claims: dict[str, Any] = {"sub": sub, "role": role, "iat": int(now), "exp": int(now + ttl_s)}
    if tz is not None:
        claims["tz"] = tz
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    if extra:
        claims.update(extra)
    headers = {"kid": key.kid} if key.kid is not None else None
    return jwt.encode(claims, key.key, algorithm=key.algorithm, headers=headers)
