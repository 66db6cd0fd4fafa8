"""bridge.auth: decide_auth's every reason, the accepted algorithms, leeway edges, minting."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from bridge.auth import (
    ROLES,
    Claims,
    KeyRing,
    SigningKey,
    TokenPolicy,
    VerificationKey,
    Verified,
    decide_auth,
    decide_verified,
    mint_token,
)
from bridge.config import AuthConfig, KeyConfig
from bridge.errors import AuthError

NOW = 1_700_000_000.0
LEEWAY = 30.0
SECRET = b"0123456789abcdef" * 4  # 64 bytes: long enough for HS512
OTHER_SECRET = b"fedcba9876543210" * 4
DROP = object()  # a claim value meaning "leave this claim out"


@dataclass(frozen=True)
class Keys:
    rsa: RSAPrivateKey
    other_rsa: RSAPrivateKey
    ec: EllipticCurvePrivateKey
    ed: Ed25519PrivateKey

    @property
    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def ring(self) -> KeyRing:
        """One key per family, each named by kid."""
        return KeyRing(
            keys=(
                VerificationKey("hs", SECRET, frozenset({"HS256", "HS384", "HS512"})),
                VerificationKey("rsa", self.rsa.public_key(), frozenset({"RS256"})),
                VerificationKey("ec", self.ec.public_key(), frozenset({"ES256"})),
                VerificationKey("ed", self.ed.public_key(), frozenset({"EdDSA"})),
            )
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        other_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=Ed25519PrivateKey.generate(),
    )


def claims(**overrides: object) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "role": "subscriber", "iat": int(NOW), "exp": int(NOW) + 600}
    for name, value in overrides.items():
        if value is DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def hs(payload: dict[str, Any], *, kid: str | None = "hs", alg: str = "HS256", secret: bytes = SECRET) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, secret, algorithm=alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_token(
    header: object, payload: object, signature: bytes = b"", *, hmac_key: bytes | None = None
) -> str:
    """A token built by hand; ``hmac_key`` signs it with HMAC-SHA256 like HS256 would."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def decide(
    token: str | bytes | None,
    keys: Keys,
    *,
    username: str | None = "alice",
    now: float = NOW,
    policy: TokenPolicy | None = None,
    ring: KeyRing | None = None,
) -> Claims | AuthError:
    return decide_auth(token, username, now, ring or keys.ring(), policy or TokenPolicy(leeway_s=LEEWAY))


# --------------------------------------------------------------------------- refusals

Token = Callable[[Keys], str | bytes | None]


def signed_non_json_payload() -> str:
    signing_input = b64url(b'{"alg":"HS256","kid":"hs"}') + "." + b64url(b"not json")
    return signing_input + "." + b64url(hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest())


def tampered() -> str:
    header, _, signature = hs(claims()).split(".")
    return header + "." + b64url(json.dumps(claims(role="admin")).encode()) + "." + signature


REFUSALS: list[tuple[str, Token, str | None, TokenPolicy, str]] = [
    # (id, token, username, policy, reason)
    ("none", lambda k: None, "alice", TokenPolicy(), "missing_token"),
    ("empty-str", lambda k: "", "alice", TokenPolicy(), "missing_token"),
    ("empty-bytes", lambda k: b"", "alice", TokenPolicy(), "missing_token"),
    ("1MB-str", lambda k: "a" * 1_000_000, "alice", TokenPolicy(), "too_large"),
    ("1MB-bytes", lambda k: b"\xff" * 1_000_000, "alice", TokenPolicy(), "too_large"),
    ("1MB-jwt-shaped", lambda k: hs(claims(pad="x" * 1_000_000)), "alice", TokenPolicy(), "too_large"),
    ("limit+1", lambda k: "a" * 257, "alice", TokenPolicy(max_token_bytes=256), "too_large"),
    ("garbage", lambda k: "not a token", "alice", TokenPolicy(), "malformed"),
    ("three-garbage-parts", lambda k: "a.b.c", "alice", TokenPolicy(), "malformed"),
    ("four-parts", lambda k: hs(claims()) + ".AAAA", "alice", TokenPolicy(), "malformed"),
    ("dots-only", lambda k: "..", "alice", TokenPolicy(), "malformed"),
    ("two-parts", lambda k: hs(claims()).rsplit(".", 1)[0], "alice", TokenPolicy(), "malformed"),
    ("non-ascii-str", lambda k: hs(claims()) + "é", "alice", TokenPolicy(), "malformed"),
    ("non-ascii-bytes", lambda k: hs(claims()).encode() + b"\xc3\xa9", "alice", TokenPolicy(), "malformed"),
    ("header-not-object", lambda k: raw_token([1, 2], claims()), "alice", TokenPolicy(), "malformed"),
    (
        "kid-int",
        lambda k: raw_token({"alg": "HS256", "kid": 5}, claims()),
        "alice",
        TokenPolicy(),
        "malformed",
    ),
    (
        "payload-not-json",
        lambda k: signed_non_json_payload(),
        "alice",
        TokenPolicy(),
        "malformed",
    ),
    ("alg-none", lambda k: raw_token({"alg": "none"}, claims()), "alice", TokenPolicy(), "bad_alg"),
    (
        "alg-None",
        lambda k: raw_token({"alg": "None", "kid": "hs"}, claims()),
        "alice",
        TokenPolicy(),
        "bad_alg",
    ),
    (
        "alg-NONE",
        lambda k: raw_token({"alg": "NONE", "kid": "hs"}, claims()),
        "alice",
        TokenPolicy(),
        "bad_alg",
    ),
    (
        "alg-missing",
        lambda k: raw_token({"kid": "hs"}, claims(), hmac_key=SECRET),
        "alice",
        TokenPolicy(),
        "bad_alg",
    ),
    ("alg-int", lambda k: raw_token({"alg": 256, "kid": "hs"}, claims()), "alice", TokenPolicy(), "bad_alg"),
    (
        "rs256-token-on-hmac-key",
        lambda k: jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "hs"}),
        "alice",
        TokenPolicy(),
        "bad_alg",
    ),
    (
        "es256-token-on-rsa-key",
        lambda k: jwt.encode(claims(), k.ec, algorithm="ES256", headers={"kid": "rsa"}),
        "alice",
        TokenPolicy(),
        "bad_alg",
    ),
    (
        "hs256-with-rsa-public-pem-as-secret",
        lambda k: raw_token({"alg": "HS256", "kid": "rsa"}, claims(), hmac_key=k.rsa_public_pem),
        "alice",
        TokenPolicy(),
        "bad_alg",
    ),
    ("unknown-kid", lambda k: hs(claims(), kid="nope"), "alice", TokenPolicy(), "unknown_kid"),
    ("no-kid-many-keys", lambda k: hs(claims(), kid=None), "alice", TokenPolicy(), "unknown_kid"),
    ("wrong-secret", lambda k: hs(claims(), secret=OTHER_SECRET), "alice", TokenPolicy(), "bad_signature"),
    (
        "wrong-rsa-key",
        lambda k: jwt.encode(claims(), k.other_rsa, algorithm="RS256", headers={"kid": "rsa"}),
        "alice",
        TokenPolicy(),
        "bad_signature",
    ),
    (
        "tampered-payload",
        lambda k: tampered(),
        "alice",
        TokenPolicy(),
        "bad_signature",
    ),
    (
        "empty-signature",
        lambda k: hs(claims()).rsplit(".", 1)[0] + ".",
        "alice",
        TokenPolicy(),
        "bad_signature",
    ),
    ("no-exp", lambda k: hs(claims(exp=DROP)), "alice", TokenPolicy(), "missing_claim"),
    ("exp-null", lambda k: hs(claims(exp=None)), "alice", TokenPolicy(), "missing_claim"),
    ("no-sub", lambda k: hs(claims(sub=DROP)), "alice", TokenPolicy(), "missing_claim"),
    (
        "no-iat-required",
        lambda k: hs(claims(iat=DROP)),
        "alice",
        TokenPolicy(require_iat=True),
        "missing_claim",
    ),
    ("aud-required-absent", lambda k: hs(claims()), "alice", TokenPolicy(audience="bridge"), "missing_claim"),
    ("iss-required-absent", lambda k: hs(claims()), "alice", TokenPolicy(issuer="idp"), "missing_claim"),
    ("expired", lambda k: hs(claims(exp=int(NOW) - 3600)), "alice", TokenPolicy(), "expired"),
    ("nbf-future", lambda k: hs(claims(nbf=int(NOW) + 3600)), "alice", TokenPolicy(), "not_yet_valid"),
    ("iat-future", lambda k: hs(claims(iat=int(NOW) + 3600)), "alice", TokenPolicy(), "not_yet_valid"),
    ("wrong-aud", lambda k: hs(claims(aud="other")), "alice", TokenPolicy(audience="bridge"), "bad_audience"),
    (
        "wrong-aud-list",
        lambda k: hs(claims(aud=["a", "b"])),
        "alice",
        TokenPolicy(audience="bridge"),
        "bad_audience",
    ),
    ("wrong-iss", lambda k: hs(claims(iss="evil")), "alice", TokenPolicy(issuer="idp"), "bad_issuer"),
    ("exp-string", lambda k: hs(claims(exp="2000000000")), "alice", TokenPolicy(), "bad_claims"),
    ("exp-bool", lambda k: hs(claims(exp=True)), "alice", TokenPolicy(), "bad_claims"),
    ("exp-nan", lambda k: hs(claims(exp=float("nan"))), "alice", TokenPolicy(), "bad_claims"),
    ("exp-infinity", lambda k: hs(claims(exp=float("inf"))), "alice", TokenPolicy(), "bad_claims"),
    ("exp-huge-int", lambda k: hs(claims(exp=10**400)), "alice", TokenPolicy(), "bad_claims"),
    ("nbf-string", lambda k: hs(claims(nbf="soon")), "alice", TokenPolicy(), "bad_claims"),
    ("iat-list", lambda k: hs(claims(iat=[1])), "alice", TokenPolicy(), "bad_claims"),
    ("sub-int", lambda k: hs(claims(sub=42)), "alice", TokenPolicy(), "bad_claims"),
    ("sub-empty", lambda k: hs(claims(sub="")), "", TokenPolicy(), "bad_claims"),
    ("sub-129", lambda k: hs(claims(sub="a" * 129)), "a" * 129, TokenPolicy(), "bad_claims"),
    ("sub-slash", lambda k: hs(claims(sub="a/b")), "a/b", TokenPolicy(), "bad_claims"),
    ("sub-plus", lambda k: hs(claims(sub="+")), "+", TokenPolicy(), "bad_claims"),
    ("sub-hash", lambda k: hs(claims(sub="a#")), "a#", TokenPolicy(), "bad_claims"),
    ("sub-nul", lambda k: hs(claims(sub="a\x00b")), "a\x00b", TokenPolicy(), "bad_claims"),
    ("sub-dollar", lambda k: hs(claims(sub="$SYS")), "$SYS", TokenPolicy(), "bad_claims"),
    ("role-unknown", lambda k: hs(claims(role="root")), "alice", TokenPolicy(), "bad_claims"),
    ("role-null", lambda k: hs(claims(role=None)), "alice", TokenPolicy(), "bad_claims"),
    ("tz-traversal", lambda k: hs(claims(tz="../etc")), "alice", TokenPolicy(), "bad_claims"),
    ("tz-absolute", lambda k: hs(claims(tz="/etc/localtime")), "alice", TokenPolicy(), "bad_claims"),
    ("tz-mars", lambda k: hs(claims(tz="Mars/Olympus")), "alice", TokenPolicy(), "bad_claims"),
    ("tz-empty", lambda k: hs(claims(tz="")), "alice", TokenPolicy(), "bad_claims"),
    ("tz-directory", lambda k: hs(claims(tz="Africa")), "alice", TokenPolicy(), "bad_claims"),
    ("tz-nul", lambda k: hs(claims(tz="Africa/Lagos\x00")), "alice", TokenPolicy(), "bad_claims"),
    ("tz-int", lambda k: hs(claims(tz=1)), "alice", TokenPolicy(), "bad_claims"),
    (
        "sub-acl-33",
        lambda k: hs(claims(sub_acl=[f"t/{i}" for i in range(33)])),
        "alice",
        TokenPolicy(),
        "bad_claims",
    ),
    ("sub-acl-bad-filter", lambda k: hs(claims(sub_acl=["a/#/b"])), "alice", TokenPolicy(), "bad_claims"),
    ("sub-acl-empty-filter", lambda k: hs(claims(sub_acl=[""])), "alice", TokenPolicy(), "bad_claims"),
    ("sub-acl-string", lambda k: hs(claims(sub_acl="market/#")), "alice", TokenPolicy(), "bad_claims"),
    ("pub-acl-non-string", lambda k: hs(claims(pub_acl=[1])), "alice", TokenPolicy(), "bad_claims"),
    ("pub-acl-partial-plus", lambda k: hs(claims(pub_acl=["a+/b"])), "alice", TokenPolicy(), "bad_claims"),
    ("rate-zero", lambda k: hs(claims(rate=0)), "alice", TokenPolicy(), "bad_claims"),
    ("rate-negative", lambda k: hs(claims(rate=-1)), "alice", TokenPolicy(), "bad_claims"),
    ("rate-too-slow", lambda k: hs(claims(rate=0.0001)), "alice", TokenPolicy(), "bad_claims"),
    ("rate-too-fast", lambda k: hs(claims(rate=1e7)), "alice", TokenPolicy(), "bad_claims"),
    ("rate-nan", lambda k: hs(claims(rate=float("nan"))), "alice", TokenPolicy(), "bad_claims"),
    ("rate-infinity", lambda k: hs(claims(rate=float("inf"))), "alice", TokenPolicy(), "bad_claims"),
    ("rate-huge-int", lambda k: hs(claims(rate=10**400)), "alice", TokenPolicy(), "bad_claims"),
    ("rate-string", lambda k: hs(claims(rate="5")), "alice", TokenPolicy(), "bad_claims"),
    ("rate-bool", lambda k: hs(claims(rate=True)), "alice", TokenPolicy(), "bad_claims"),
    ("rate-list", lambda k: hs(claims(rate=[5])), "alice", TokenPolicy(), "bad_claims"),
    ("username-other", lambda k: hs(claims()), "bob", TokenPolicy(), "username_mismatch"),
    ("username-none", lambda k: hs(claims()), None, TokenPolicy(), "username_mismatch"),
    ("username-case", lambda k: hs(claims()), "Alice", TokenPolicy(), "username_mismatch"),
]


@pytest.mark.parametrize(
    ("make_token", "username", "policy", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_decide_auth_refusals(
    keys: Keys, make_token: Token, username: str | None, policy: TokenPolicy, reason: str
) -> None:
    token = make_token(keys)
    result = decide_auth(token, username, NOW, keys.ring(), policy)
    assert isinstance(result, AuthError), result
    assert result.reason == reason, result.detail
    assert result.detail
    if isinstance(token, str | bytes) and token:
        text = token if isinstance(token, str) else token.decode("latin-1")
        assert text not in result.detail


def test_bad_tz_detail_names_the_value(keys: Keys) -> None:
    result = decide(hs(claims(tz="Mars/Olympus")), keys)
    assert isinstance(result, AuthError)
    assert result.reason == "bad_claims"
    assert "Mars/Olympus" in result.detail
    assert "tz" in result.detail


# --------------------------------------------------------------------------- acceptances


@pytest.mark.parametrize(
    ("alg", "kid"),
    [("HS256", "hs"), ("HS384", "hs"), ("HS512", "hs"), ("RS256", "rsa"), ("ES256", "ec"), ("EdDSA", "ed")],
)
def test_each_algorithm_accepted(keys: Keys, alg: str, kid: str) -> None:
    private: object = {"hs": SECRET, "rsa": keys.rsa, "ec": keys.ec, "ed": keys.ed}[kid]
    token = jwt.encode(claims(role="feed"), private, algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]
    result = decide(token, keys)
    assert isinstance(result, Claims), result
    assert result.sub == "alice"
    assert result.role == "feed"
    assert result.exp == NOW + 600


def test_bytes_token_accepted(keys: Keys) -> None:
    assert isinstance(decide(hs(claims()).encode("ascii"), keys), Claims)


@pytest.mark.parametrize(
    ("ring_kids", "token_kid", "selected"),
    [
        (["a"], None, "a"),  # a lone key is chosen for a token without kid
        ([None], None, None),
        ([None], "x", "missing"),  # a kid must name a key, even on a one-key ring
        (["a", "b"], "b", "b"),
        (["a", "b"], None, "missing"),
        ([None, "b"], None, "missing"),
        ([], None, "missing"),
        ([], "a", "missing"),
    ],
)
def test_keyring_select(ring_kids: list[str | None], token_kid: str | None, selected: str | None) -> None:
    ring = KeyRing(keys=tuple(VerificationKey(kid, SECRET, frozenset({"HS256"})) for kid in ring_kids))
    key = ring.select(token_kid)
    if selected == "missing":
        assert key is None
    else:
        assert key is not None
        assert key.kid == selected


def test_kid_selects_the_right_key(keys: Keys) -> None:
    ring = KeyRing(
        keys=(
            VerificationKey("one", OTHER_SECRET, frozenset({"HS256"})),
            VerificationKey("two", SECRET, frozenset({"HS256"})),
        )
    )
    assert isinstance(decide(hs(claims(), kid="two"), keys, ring=ring), Claims)
    wrong = decide(hs(claims(), kid="one"), keys, ring=ring)
    assert isinstance(wrong, AuthError)
    assert wrong.reason == "bad_signature"


def test_token_without_kid_uses_the_only_key(keys: Keys) -> None:
    ring = KeyRing(keys=(VerificationKey("rsa", keys.rsa.public_key(), frozenset({"RS256"})),))
    token = jwt.encode(claims(), keys.rsa, algorithm="RS256")
    assert isinstance(decide(token, keys, ring=ring), Claims)


# exp=NOW+delta etc.; the boundary is exactly at ``now == exp + leeway`` (accepted).
LEEWAY_EDGES: list[tuple[str, float, float, float, str | None]] = [
    ("exp", NOW - LEEWAY, NOW, LEEWAY, None),
    ("exp", NOW - LEEWAY - 1, NOW, LEEWAY, "expired"),
    ("exp", NOW, NOW + LEEWAY, LEEWAY, None),
    ("exp", NOW, NOW + LEEWAY + 0.001, LEEWAY, "expired"),
    ("exp", NOW, NOW, 0.0, None),
    ("exp", NOW, NOW + 0.001, 0.0, "expired"),
    ("exp", NOW + 0.5, NOW + 0.25, 0.0, None),  # a fractional exp is honoured
    ("nbf", NOW + LEEWAY, NOW, LEEWAY, None),
    ("nbf", NOW + LEEWAY + 1, NOW, LEEWAY, "not_yet_valid"),
    ("nbf", NOW, NOW - LEEWAY, LEEWAY, None),
    ("nbf", NOW, NOW - LEEWAY - 0.001, LEEWAY, "not_yet_valid"),
    ("iat", NOW + LEEWAY, NOW, LEEWAY, None),
    ("iat", NOW + LEEWAY + 1, NOW, LEEWAY, "not_yet_valid"),
    ("iat", NOW, NOW, 0.0, None),
    ("iat", NOW + 1, NOW, 0.0, "not_yet_valid"),
]


@pytest.mark.parametrize(("claim", "value", "now", "leeway", "reason"), LEEWAY_EDGES)
def test_leeway_boundaries(
    keys: Keys, claim: str, value: float, now: float, leeway: float, reason: str | None
) -> None:
    base = claims(iat=DROP, exp=NOW + 3600)
    base[claim] = value
    result = decide(hs(base), keys, now=now, policy=TokenPolicy(leeway_s=leeway))
    if reason is None:
        assert isinstance(result, Claims), result
    else:
        assert isinstance(result, AuthError)
        assert result.reason == reason


@pytest.mark.parametrize(("claim", "value", "now", "leeway", "reason"), LEEWAY_EDGES)
def test_verified_admits_at_another_time_as_decide_auth_would(
    keys: Keys, claim: str, value: float, now: float, leeway: float, reason: str | None
) -> None:
    """decide_verified keeps the time claims: admit() at ``now`` gives decide_auth's answer there."""
    base = claims(iat=DROP, exp=NOW + 3600)
    base[claim] = value
    token, policy = hs(base), TokenPolicy(leeway_s=leeway)
    verified = decide_verified(
        token, "alice", value - 1 if claim == "exp" else value + 1, keys.ring(), policy
    )
    assert isinstance(verified, Verified), verified
    assert verified.times == {name: float(base[name]) for name in ("exp", "nbf", "iat") if name in base}
    for username in ("alice", "bob"):
        admitted = verified.admit(username, now, leeway)
        direct = decide_auth(token, username, now, keys.ring(), policy)
        assert type(admitted) is type(direct)
        if isinstance(admitted, AuthError):
            assert isinstance(direct, AuthError)
            assert (admitted.reason, admitted.detail) == (direct.reason, direct.detail)
        else:
            assert admitted is verified.claims
    admitted = verified.admit("alice", now, leeway)
    assert (admitted.reason if isinstance(admitted, AuthError) else None) == reason


def test_decide_verified_refuses_as_decide_auth(keys: Keys) -> None:
    for username, reason in (("bob", "username_mismatch"), ("alice", None)):
        verified = decide_verified(hs(claims()), username, NOW, keys.ring(), TokenPolicy())
        assert (verified.reason if isinstance(verified, AuthError) else None) == reason


@pytest.mark.parametrize(
    ("token_claims", "policy"),
    [
        (claims(aud="bridge"), TokenPolicy(audience="bridge")),
        (claims(aud=["other", "bridge"]), TokenPolicy(audience="bridge")),
        (claims(aud="anything"), TokenPolicy()),  # aud is only checked when configured
        (claims(iss="idp"), TokenPolicy(issuer="idp")),
        (claims(iss="anyone"), TokenPolicy()),
        (claims(aud="bridge", iss="idp"), TokenPolicy(audience="bridge", issuer="idp", require_iat=True)),
        (claims(iat=DROP), TokenPolicy()),  # iat is optional unless required
        (claims(jti="abc", extra={"x": 1}), TokenPolicy()),  # unknown claims are ignored
    ],
)
def test_audience_issuer_accepted(keys: Keys, token_claims: dict[str, Any], policy: TokenPolicy) -> None:
    assert isinstance(decide(hs(token_claims), keys, policy=policy), Claims)


@pytest.mark.parametrize("tz", ["Africa/Lagos", "Africa/Casablanca", "Africa/Johannesburg", "UTC", None])
def test_valid_tz(keys: Keys, tz: str | None) -> None:
    result = decide(hs(claims(tz=tz)), keys)
    assert isinstance(result, Claims), result
    assert result.tz == tz


@pytest.mark.parametrize(
    ("sub_acl", "pub_acl"),
    [
        (["user/{sub}/#", "market/+/ticker"], None),
        ([], ["user/{sub}/alerts"]),
        ([f"t/{i}" for i in range(32)], [f"t/{i}" for i in range(32)]),
        (["#"], ["+/+"]),
    ],
)
def test_acl_claims_kept(keys: Keys, sub_acl: list[str] | None, pub_acl: list[str] | None) -> None:
    result = decide(hs(claims(sub_acl=sub_acl, pub_acl=pub_acl)), keys)
    assert isinstance(result, Claims), result
    assert result.sub_acl == (tuple(sub_acl) if sub_acl is not None else None)
    assert result.pub_acl == (tuple(pub_acl) if pub_acl is not None else None)


@pytest.mark.parametrize("sub", ["a", "a" * 128, "alice@example.com", "user-1.2_3", "ñandú", "a$"])
def test_valid_subs(keys: Keys, sub: str) -> None:
    result = decide(hs(claims(sub=sub)), keys, username=sub)
    assert isinstance(result, Claims), result
    assert result.sub == sub


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(DROP, None), (None, None), (1, 1.0), (2.5, 2.5), (0.001, 0.001), (1_000_000, 1_000_000.0)],
)
def test_rate_claim(keys: Keys, rate: object, expected: float | None) -> None:
    result = decide(hs(claims(rate=rate)), keys)
    assert isinstance(result, Claims), result
    assert result.rate == expected
    assert result.rate is None or type(result.rate) is float


def test_bad_rate_detail_names_the_claim_and_the_range(keys: Keys) -> None:
    result = decide(hs(claims(rate=-2)), keys)
    assert isinstance(result, AuthError)
    assert result.reason == "bad_claims"
    assert "rate" in result.detail
    assert "-2" in result.detail
    assert "0.001 to 1000000" in result.detail


def test_role_defaults_to_subscriber(keys: Keys) -> None:
    result = decide(hs(claims(role=DROP)), keys)
    assert isinstance(result, Claims)
    assert result.role == "subscriber"


# --------------------------------------------------------------------------- key confusion


def test_hs256_with_rsa_public_key_as_secret_is_never_accepted(keys: Keys) -> None:
    """The classic HMAC/RSA confusion: the public PEM used as an HMAC secret."""
    pem = keys.rsa_public_pem
    token = raw_token({"alg": "HS256", "kid": "rsa"}, claims(), hmac_key=pem)
    ring = KeyRing(keys=(VerificationKey("rsa", keys.rsa.public_key(), frozenset({"RS256"})),))
    result = decide(token, keys, ring=ring)
    assert isinstance(result, AuthError)
    assert result.reason == "bad_alg"
    # A misconfigured ring that also allows HS256 on the RSA key still refuses it.
    confused = KeyRing(keys=(VerificationKey("rsa", keys.rsa.public_key(), frozenset({"RS256", "HS256"})),))
    assert isinstance(decide(token, keys, ring=confused), AuthError)
    # And PyJWT itself refuses the PEM as an HMAC secret, both ways.
    with pytest.raises(jwt.InvalidKeyError):
        jwt.decode(token, pem, algorithms=["HS256"])
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode(claims(), pem, algorithm="HS256")


def test_alg_none_unsigned_token_refused_even_without_kid(keys: Keys) -> None:
    token = raw_token({"alg": "none", "typ": "JWT"}, claims())
    assert token.endswith(".")
    single = KeyRing(keys=(VerificationKey(None, SECRET, frozenset({"HS256"})),))
    for ring in (keys.ring(), single):
        result = decide(token, keys, ring=ring)
        assert isinstance(result, AuthError)
        assert result.reason == "bad_alg"


def test_one_megabyte_token_is_refused_as_too_large(keys: Keys) -> None:
    """The size check comes before any parsing (no timing assertion, only the reason)."""
    token = hs(claims(pad="x" * (1 << 20)))
    assert len(token) > 1 << 20
    result = decide(token, keys)
    assert isinstance(result, AuthError)
    assert result.reason == "too_large"
    assert "x" * 100 not in result.detail


# --------------------------------------------------------------------------- minting


@pytest.mark.parametrize(
    ("alg", "kid"),
    [("HS256", "hs"), ("HS384", "hs"), ("HS512", "hs"), ("RS256", "rsa"), ("ES256", "ec"), ("EdDSA", "ed")],
)
@pytest.mark.parametrize("role", ROLES)
def test_mint_decide_round_trip(keys: Keys, alg: str, kid: str, role: Any) -> None:
    private: object = {"hs": SECRET, "rsa": keys.rsa, "ec": keys.ec, "ed": keys.ed}[kid]
    signing = SigningKey(kid=kid, key=private, algorithm=alg)
    token = mint_token(
        signing,
        sub="bob",
        role=role,
        now=NOW,
        ttl_s=60,
        tz="Africa/Lagos",
        audience="bridge",
        issuer="idp",
        extra={"sub_acl": ["user/{sub}/#"]},
    )
    assert jwt.get_unverified_header(token)["kid"] == kid
    policy = TokenPolicy(audience="bridge", issuer="idp", require_iat=True, leeway_s=0)
    result = decide_auth(token, "bob", NOW + 60, keys.ring(), policy)
    assert result == Claims(sub="bob", role=role, tz="Africa/Lagos", sub_acl=("user/{sub}/#",), exp=NOW + 60)
    expired = decide_auth(token, "bob", NOW + 61, keys.ring(), policy)
    assert isinstance(expired, AuthError)
    assert expired.reason == "expired"


def test_mint_claims_and_headers() -> None:
    token = mint_token(
        SigningKey(None, SECRET, "HS256"), sub="carol", role="admin", now=NOW + 0.9, ttl_s=30.5
    )
    assert "kid" not in jwt.get_unverified_header(token)
    payload = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert payload == {"sub": "carol", "role": "admin", "iat": int(NOW), "exp": int(NOW + 31.4)}
    with_extra = mint_token(
        SigningKey("k", SECRET, "HS256"), sub="c", role="feed", now=NOW, ttl_s=1, extra={"exp": 5, "x": [1]}
    )
    decoded = jwt.decode(
        with_extra, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert decoded["exp"] == 5
    assert decoded["x"] == [1]


# --------------------------------------------------------------------------- totality

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_CLAIM_NAMES = st.sampled_from(
    ["sub", "role", "tz", "sub_acl", "pub_acl", "rate", "exp", "nbf", "iat", "aud", "iss", "x"]
)
_HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "b64", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.none() | st.text(max_size=300) | st.binary(max_size=300),
    username=st.none() | st.text(max_size=20),
)
def test_decide_auth_never_raises_on_arbitrary_input(
    keys: Keys, token: str | bytes | None, username: str | None
) -> None:
    result = decide(token, keys, username=username)
    assert isinstance(result, Claims | AuthError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.dictionaries(_HEADER_NAMES, _JSON, max_size=4) | _JSON,
    payload=st.dictionaries(_CLAIM_NAMES, _JSON, max_size=8) | _JSON,
    username=st.none() | st.text(max_size=10),
    now=st.floats(allow_nan=False, allow_infinity=False),
)
def test_decide_auth_never_raises_on_hmac_signed_junk(
    keys: Keys, header: object, payload: object, username: str | None, now: float
) -> None:
    """Correctly signed tokens with arbitrary headers and claims still only return."""
    token = raw_token(header, payload, hmac_key=SECRET)
    result = decide_auth(token, username, now, keys.ring(), TokenPolicy(audience="a", issuer="i"))
    assert isinstance(result, Claims | AuthError)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    overrides=st.dictionaries(_CLAIM_NAMES, _JSON, max_size=4),
    username=st.sampled_from(["alice", "bob"]) | st.none(),
)
def test_decide_auth_total_on_valid_signed_claims(
    keys: Keys, overrides: dict[str, Any], username: str | None
) -> None:
    token = raw_token({"alg": "HS256", "kid": "hs"}, claims(**overrides), hmac_key=SECRET)
    result = decide(token, keys, username=username)
    assert isinstance(result, Claims | AuthError)
    if isinstance(result, Claims):
        assert result.sub == username


def test_policy_from_config_carries_every_setting() -> None:
    """Every policy field comes from the auth section, so MQTT and HTTP cannot drift apart."""
    auth = AuthConfig(
        keys=[KeyConfig(algorithms=["HS256"], secret=SecretStr(SECRET.decode()))],
        audience="bridge",
        issuer="idp",
        leeway_s=5,
        require_iat=True,
        max_token_bytes=1024,
    )
    policy = TokenPolicy.from_config(auth)
    assert policy == TokenPolicy(
        audience="bridge", issuer="idp", leeway_s=5, require_iat=True, max_token_bytes=1024
    )
    # A field added to TokenPolicy without a config value of the same name fails here.
    for field in dataclasses.fields(TokenPolicy):
        assert getattr(policy, field.name) == getattr(auth, field.name)
        assert getattr(policy, field.name) != getattr(TokenPolicy(), field.name)
