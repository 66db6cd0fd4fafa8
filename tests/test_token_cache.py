"""bridge.token_cache: hits, misses, expiry, LRU eviction, refusals never remembered; always decide_auth's answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.auth import Claims, KeyRing, TokenPolicy, VerificationKey, decide_auth
from bridge.errors import AuthError
from bridge.token_cache import TokenCache

NOW = 1_700_000_000.0
LEEWAY = 30.0
SECRET = b"0123456789abcdef" * 4
RING = KeyRing(keys=(VerificationKey("hs", SECRET, frozenset({"HS256"})),))
POLICY = TokenPolicy(leeway_s=LEEWAY)


def token(sub: str, *, exp: float = NOW + 3600, secret: bytes = SECRET, **extra: Any) -> str:
    claims = {"sub": sub, "role": "subscriber", "iat": int(NOW) - 60, "exp": exp, **extra}
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "hs"})


def one_byte_off(text: str) -> str:
    """The token with one character of its payload changed (its signature no longer matches)."""
    at = text.index(".") + 5
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


ALICE = token("alice")
TOKENS: dict[str, str | bytes | None] = {
    "alice": ALICE,
    "alice-bytes": ALICE.encode(),  # the same token bytes: the same entry
    "alice-one-byte-off": one_byte_off(ALICE),
    "alice-other-exp": token("alice", exp=NOW + 3599),  # alice again, another token
    "bob": token("bob"),
    "carol": token("carol"),
    "short-lived": token("alice", exp=NOW + 60),  # expired for good after NOW + 90
    "nbf": token("alice", nbf=NOW),  # valid from NOW - 30 (leeway)
    "iat": token("alice", iat=NOW),  # iat is checked like nbf
    "wrong-secret": token("alice", secret=b"x" * 64),
    "garbage": "not a token",
    "empty": "",
    "none": None,
    "non-ascii": ALICE + "é",
    "too-large": "a" * 10_000,
}


@dataclass(frozen=True)
class Step:
    """Present ``token`` as ``username`` at NOW + ``at``: ``expect`` ("ok" or a refusal reason),
    decided from the cache (``hit``) or verified in full."""

    token: str
    username: str | None
    at: float
    expect: str
    hit: bool


def ok(name: str, at: float = 0, *, hit: bool, username: str = "alice") -> Step:
    return Step(name, username, at, "ok", hit)


def refused(name: str, reason: str, at: float = 0, *, hit: bool, username: str | None = "alice") -> Step:
    return Step(name, username, at, reason, hit)


# (case, max_entries, steps, tokens remembered at the end)
SCENARIOS: list[tuple[str, int, list[Step], int]] = [
    ("hit", 10, [ok("alice", hit=False), ok("alice", 1, hit=True), ok("alice", 3000, hit=True)], 1),
    ("str-and-bytes-are-one-token", 10, [ok("alice", hit=False), ok("alice-bytes", hit=True)], 1),
    ("another-token-misses", 10, [ok("alice", hit=False), ok("bob", hit=False, username="bob")], 2),
    ("same-sub-other-token-misses", 10, [ok("alice", hit=False), ok("alice-other-exp", hit=False)], 2),
    (
        "one-byte-off-misses-and-is-refused",
        10,
        [ok("alice", hit=False), refused("alice-one-byte-off", "bad_signature", hit=False)],
        1,
    ),
    (
        "expires-at-exp-plus-leeway",
        10,
        [
            ok("short-lived", hit=False),
            ok("short-lived", 60 + LEEWAY, hit=True),  # the last instant it is valid
            refused("short-lived", "expired", 60 + LEEWAY + 0.001, hit=True),  # and dropped
            refused("short-lived", "expired", 60 + LEEWAY + 0.001, hit=False),  # refusals are not remembered
        ],
        0,
    ),
    (
        "nbf-in-the-future-on-a-hit",
        10,
        [
            ok("nbf", hit=False),
            refused("nbf", "not_yet_valid", -LEEWAY - 0.001, hit=True),  # the clock stepped back
            ok("nbf", -LEEWAY, hit=True),  # kept: the token is valid again now
        ],
        1,
    ),
    (
        "iat-in-the-future-on-a-hit",
        10,
        [ok("iat", hit=False), refused("iat", "not_yet_valid", -LEEWAY - 1, hit=True), ok("iat", hit=True)],
        1,
    ),
    (
        "username-mismatch-on-a-hit",
        10,
        [
            ok("alice", hit=False),
            refused("alice", "username_mismatch", hit=True, username="bob"),
            refused("alice", "username_mismatch", hit=True, username=None),
            refused("alice", "username_mismatch", hit=True, username="Alice"),
            ok("alice", hit=True),  # still the owner's
        ],
        1,
    ),
    (
        "expired-beats-username-on-a-hit",
        10,
        [ok("short-lived", hit=False), refused("short-lived", "expired", 1000, hit=True, username="bob")],
        0,
    ),
    (
        "refusals-are-never-remembered",
        10,
        [
            refused("alice", "username_mismatch", hit=False, username="bob"),
            refused("alice", "username_mismatch", hit=False, username="bob"),
            refused("nbf", "not_yet_valid", -LEEWAY - 1, hit=False),
            refused("nbf", "not_yet_valid", -LEEWAY - 1, hit=False),
            refused("wrong-secret", "bad_signature", hit=False),
            refused("wrong-secret", "bad_signature", hit=False),
            refused("garbage", "malformed", hit=False),
            refused("garbage", "malformed", hit=False),
            refused("empty", "missing_token", hit=False),
            refused("none", "missing_token", hit=False),
            refused("non-ascii", "malformed", hit=False),
            refused("too-large", "too_large", hit=False),
        ],
        0,
    ),
    (
        "accepted-after-refused",
        10,
        [
            refused("alice", "username_mismatch", hit=False, username="bob"),
            ok("alice", hit=False),
            ok("alice", hit=True),
        ],
        1,
    ),
    (
        "lru-eviction-order",
        2,
        [
            ok("alice", hit=False),
            ok("bob", hit=False, username="bob"),
            ok("alice", hit=True),  # alice is now the most recently used
            ok("carol", hit=False, username="carol"),  # evicts bob, the least recently used
            ok("alice", hit=True),
            ok("bob", hit=False, username="bob"),  # evicts carol
            ok("alice", hit=True),
            ok("carol", hit=False, username="carol"),  # evicts bob
            ok("bob", hit=False, username="bob"),  # evicts alice
            ok("alice", hit=False),
        ],
        2,
    ),
    (
        "a-refused-hit-counts-as-use",
        2,
        [
            ok("alice", hit=False),
            ok("bob", hit=False, username="bob"),
            refused("alice", "username_mismatch", hit=True, username="bob"),  # alice most recent
            ok("carol", hit=False, username="carol"),  # evicts bob
            ok("alice", hit=True),
        ],
        2,
    ),
    (
        "size-one",
        1,
        [ok("alice", hit=False), ok("bob", hit=False, username="bob"), ok("alice", hit=False)],
        1,
    ),
    ("size-zero-disables", 0, [ok("alice", hit=False), ok("alice", hit=False), ok("alice", 1, hit=False)], 0),
]


def decision_key(decision: Claims | AuthError) -> tuple[str, object]:
    """Comparable form: AuthError has no value equality."""
    if isinstance(decision, AuthError):
        return (decision.reason, decision.detail)
    return ("ok", decision)


@pytest.mark.parametrize(
    ("max_entries", "steps", "remembered"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
def test_scenarios(max_entries: int, steps: list[Step], remembered: int) -> None:
    cache = TokenCache(RING, POLICY, max_entries=max_entries)
    for index, step in enumerate(steps):
        hits, misses = cache.hits, cache.misses
        presented = TOKENS[step.token]
        now = NOW + step.at
        decision = cache.decide(presented, step.username, now)
        where = f"step {index} {step}"
        if step.expect == "ok":
            assert isinstance(decision, Claims), f"{where}: {decision}"
            assert decision.sub == step.username
        else:
            assert isinstance(decision, AuthError), where
            assert decision.reason == step.expect, where
        assert (cache.hits - hits, cache.misses - misses) == ((1, 0) if step.hit else (0, 1)), where
        # Whatever the cache holds, its answer is decide_auth's, detail included.
        assert decision_key(decision) == decision_key(
            decide_auth(presented, step.username, now, RING, POLICY)
        )
    assert len(cache) == remembered


def test_a_hit_returns_the_claims_verified_once() -> None:
    cache = TokenCache(RING, POLICY, max_entries=10)
    first = cache.decide(TOKENS["alice"], "alice", NOW)
    again = cache.decide(TOKENS["alice"], "alice", NOW + 1)
    assert isinstance(first, Claims)
    assert again is first  # not verified and validated again


def test_the_key_is_a_digest_whatever_the_token_size() -> None:
    big = token("alice", pad="x" * 5000)
    cache = TokenCache(RING, POLICY, max_entries=10)
    assert isinstance(cache.decide(big, "alice", NOW), Claims)
    assert [len(key) for key in cache._entries] == [32]


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        TokenCache(RING, POLICY, max_entries=-1)


def test_a_cache_keeps_its_keys_and_policy() -> None:
    cache = TokenCache(RING, TokenPolicy(audience="bridge"), max_entries=10)
    assert cache.keys is RING
    assert cache.policy == TokenPolicy(audience="bridge")
    # Its policy decides: the token has no aud, so it is refused and not remembered.
    assert isinstance(cache.decide(TOKENS["alice"], "alice", NOW), AuthError)
    assert len(cache) == 0


NAMES = sorted(TOKENS)
Present = tuple[str, str | None, float]


@settings(max_examples=200, deadline=None)
@given(
    max_entries=st.integers(0, 3),
    steps=st.lists(
        st.tuples(
            st.sampled_from(NAMES),
            st.sampled_from(["alice", "bob", "carol", None]),
            st.sampled_from(
                [-3600.0, -LEEWAY - 1, -LEEWAY, 0.0, 60 + LEEWAY, 61 + LEEWAY, 3600 + LEEWAY, 9999.0]
            ),
        ),
        max_size=30,
    ),
)
def test_always_decides_as_decide_auth(max_entries: int, steps: list[Present]) -> None:
    """Any order of tokens, users and times (the clock may step back): the cache never changes an answer."""
    cache = TokenCache(RING, POLICY, max_entries=max_entries)
    decide: Callable[[str | bytes | None, str | None, float], Claims | AuthError] = cache.decide
    for name, username, at in steps:
        presented = TOKENS[name]
        got = decide(presented, username, NOW + at)
        assert decision_key(got) == decision_key(decide_auth(presented, username, NOW + at, RING, POLICY))
        assert len(cache) <= max_entries
