"""broker_plugins.auth: the auth plugin's hooks decided table-driven, without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.anonymous import ANONYMOUS_USER, AnonymousPolicy
from bridge.auth import KeyRing, SigningKey, TokenPolicy, VerificationKey, mint_token
from bridge.cluster.limits import LocalAsyncLimits
from bridge.core.connect import Will
from bridge.core.context import ConnectionContext
from bridge.core.hooks import Admitted, ConnectRequest, Hooks, Refused
from bridge.errors import ClusterUnavailable
from bridge.limits import Lease, LimitRefusal, LocalConnectionLimits
from bridge.token_cache import TokenCache
from broker_plugins.auth import AllowAll, AnonymousAccess, JwtAuth
from tests.conftest import make_tick

NOW = 1_800_000_000.0
SECRET = b"plugin-test-secret-0123456789abcdef"
KEY = SigningKey(kid="k", key=SECRET, algorithm="HS256")
TICK = make_tick().encode()


def token(sub: str = "alice", role: Any = "subscriber", **extra: Any) -> bytes:
    return mint_token(KEY, sub=sub, role=role, now=NOW, ttl_s=600, extra=extra or None).encode()


def request(
    password: bytes | None, username: str | None = "alice", will: Will | None = None, now: float = NOW
) -> ConnectRequest:
    return ConnectRequest("c1", username, password, True, "ws", "127.0.0.1:1", now, will)


def jwt_plugin(max_per_user: int = 2, max_total: int = 3) -> JwtAuth:
    keys = KeyRing((VerificationKey("k", SECRET, frozenset({"HS256"})),))
    cache = TokenCache(keys, TokenPolicy(leeway_s=0), max_entries=16)
    return JwtAuth(
        cache, LocalAsyncLimits(LocalConnectionLimits(max_per_user, max_total)), max_topic_bytes=256
    )


@pytest.mark.parametrize(
    ("req", "code", "reason"),
    [
        (request(None), 5, "missing_token"),
        (request(b""), 5, "missing_token"),
        (request(b"not-a-jwt"), 5, "malformed"),
        (request(b"\xff\xfe"), 5, "malformed"),
        (request(token(), username="bob"), 5, "username_mismatch"),
        (request(token(), now=NOW + 601), 5, "expired"),
        (request(token(role="nobody")), 5, "bad_claims"),
        (request(token(), will=Will("user/bob/x", b"", 0, False)), 5, "will_refused"),
        (request(token(), will=Will("market/luno/XBTZAR", b"{}", 0, False)), 5, "will_refused"),
        (request(token(), will=Will("market/#", b"x", 0, False)), 5, "will_refused"),
    ],
)
def test_jwt_refusals_and_their_connack_codes(req: ConnectRequest, code: int, reason: str) -> None:
    decision = jwt_plugin().on_connect(req)
    assert isinstance(decision, Refused), decision
    assert (decision.code, decision.reason) == (code, reason)
    assert "eyJ" not in decision.detail  # never quotes the token


def test_jwt_admits_with_the_tokens_acl_and_zone() -> None:
    decision = jwt_plugin().on_connect(request(token(tz="Africa/Lagos")))
    assert isinstance(decision, Admitted)
    assert (decision.user, decision.zone, decision.claims.sub) == ("alice", "Africa/Lagos", "alice")
    assert decision.policy.subscribe == ("market/#", "user/alice/#")


@pytest.mark.parametrize(
    ("role", "will"),
    [
        ("feed", Will("market/luno/BTC-ZAR", TICK, 0, True)),
        ("service", Will("user/bob/x", b"gone", 1, False)),
    ],
)
def test_a_will_the_acl_allows_is_admitted(role: str, will: Will) -> None:
    assert isinstance(jwt_plugin().on_connect(request(token(role=role), will=will)), Admitted)


SUBSCRIBER = ConnectionContext()
SUBSCRIBER.admit(Admitted("alice", policy=jwt_plugin().on_connect(request(token())).policy))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("topic_filter", "qos", "granted"),
    [
        ("market/#", 1, 1),
        ("market/luno/XBTZAR", 0, 0),
        ("user/alice/#", 2, 2),
        ("user/bob/#", 1, 0x80),
        ("#", 0, 0x80),
        ("$SYS/#", 0, 0x80),
    ],
)
def test_jwt_subscribe_by_the_acl(topic_filter: str, qos: int, granted: int) -> None:
    assert jwt_plugin().on_subscribe(SUBSCRIBER, topic_filter, qos) == granted


@pytest.mark.parametrize(
    ("topic", "role", "allowed"),
    [
        ("market/luno/XBTZAR", "subscriber", False),
        ("market/luno/XBTZAR", "feed", True),
        ("market/+/XBTZAR", "feed", False),
        ("user/bob/x", "service", True),
        ("user/bob/x", "feed", False),
    ],
)
def test_jwt_publish_by_the_acl(topic: str, role: str, allowed: bool) -> None:
    plugin = jwt_plugin()
    admitted = plugin.on_connect(request(token(role=role)))
    assert isinstance(admitted, Admitted)
    assert plugin.on_publish(admitted, topic) is allowed


def test_a_connection_without_our_acl_may_do_nothing() -> None:
    """Fail closed: the hooks never see such a context from the broker, but if they did."""
    plugin = jwt_plugin()
    assert plugin.on_subscribe(ConnectionContext(), "market/#", 0) == 0x80
    assert plugin.on_publish(ConnectionContext(), "market/luno/XBTZAR") is False


async def test_limits_per_user_then_global_and_takeover() -> None:
    plugin = jwt_plugin(max_per_user=2, max_total=3)
    first, second = await plugin.on_lease("alice", None), await plugin.on_lease("alice", None)
    assert isinstance(first, Lease)
    assert isinstance(second, Lease)
    refused = await plugin.on_lease("alice", None)
    assert isinstance(refused, Refused)
    assert (refused.code, refused.reason) == (3, "user_limit")
    taken_over = await plugin.on_lease("alice", first)  # a user at the limit can still reconnect
    assert isinstance(taken_over, Lease)
    await plugin.on_release(first)  # late release of the taken-over connection: no slot freed
    assert isinstance(await plugin.on_lease("bob", None), Lease)
    full = await plugin.on_lease("carol", None)
    assert isinstance(full, Refused)
    assert full.reason == "global_limit"
    await plugin.on_release(second)
    await plugin.on_release(second)  # idempotent
    await plugin.on_release("not a lease")
    assert isinstance(await plugin.on_lease("carol", None), Lease)


class Unreachable(LocalAsyncLimits):
    """Cluster limits whose Redis cannot be reached (what ClusterConnectionLimits raises)."""

    async def acquire(self, user: str, *, replacing: Lease | None = None) -> Lease | LimitRefusal:
        raise ClusterUnavailable("acquire", "ConnectionError: refused")


async def test_limits_that_cannot_be_counted_refuse_the_connection() -> None:
    """Fail closed: a node that cannot reach the cluster's counts admits nobody (CONNACK 3)."""
    plugin = AllowAll(Unreachable(LocalConnectionLimits(1, 10)), max_topic_bytes=256)
    refused = await plugin.on_lease("alice", None)
    assert isinstance(refused, Refused)
    assert (refused.code, refused.reason) == (3, "cluster_unavailable")


@pytest.mark.parametrize(
    ("req", "user"),
    [(request(None), "alice"), (request(b"anything", username=None), "c1")],
)
async def test_allow_all_admits_anyone(req: ConnectRequest, user: str) -> None:
    plugin = AllowAll(LocalAsyncLimits(LocalConnectionLimits(1, 10)), max_topic_bytes=256)
    decision = plugin.on_connect(req)
    assert isinstance(decision, Admitted)
    assert decision.user == user
    assert decision.claims is None
    assert plugin.on_subscribe(decision, "#", 2) == 2
    assert plugin.on_publish(decision, "anything/at/all") is True
    assert isinstance(await plugin.on_lease(user, None), Lease)
    assert isinstance(await plugin.on_lease(user, None), Refused)


@pytest.mark.parametrize(
    ("will", "admitted"),
    [
        (Will("market/luno/BTC-ZAR", TICK, 0, False), True),
        (Will("market/luno/XBTZAR", b"not a tick", 0, False), False),
        (Will("$SYS/x", b"", 0, False), False),
        (Will("a" * 300, b"", 0, False), False),
    ],
)
def test_allow_all_holds_the_will_to_the_publish_rules(will: Will, admitted: bool) -> None:
    plugin = AllowAll(LocalAsyncLimits(LocalConnectionLimits(1, 10)), max_topic_bytes=256)
    assert isinstance(plugin.on_connect(request(None, will=will)), Admitted) is admitted


def test_the_plugins_attach_to_every_hook_they_serve() -> None:
    hooks = Hooks([jwt_plugin()])
    assert (len(hooks.connect), len(hooks.subscribe), len(hooks.publish), len(hooks.deliver)) == (1, 1, 1, 0)
    assert (len(hooks.lease), len(hooks.release)) == (1, 1)


def public_hooks(cap: int = 1) -> tuple[Hooks, AnonymousAccess]:
    anonymous = AnonymousAccess(
        AnonymousPolicy.of(["market/#"], "Africa/Lagos"),
        LocalAsyncLimits(LocalConnectionLimits(cap, cap)),
        max_topic_bytes=256,
    )
    return Hooks([anonymous, jwt_plugin(max_per_user=1, max_total=1)]), anonymous


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        (request(None), ANONYMOUS_USER),
        (request(b"", username=None), ANONYMOUS_USER),
        (request(token()), "alice"),  # a token goes on to the JWT plugin
        (request(b"not-a-jwt"), "malformed"),  # and a bad one is refused there, not made anonymous
        (request(None, will=Will("market/luno/BTC-ZAR", TICK, 0, False)), "will_refused"),
    ],
)
def test_anonymous_access_before_the_jwt_plugin(req: ConnectRequest, expected: str) -> None:
    hooks, _ = public_hooks()
    decision = hooks.on_connect(req)
    if isinstance(decision, Refused):
        assert decision.reason == expected
        assert decision.code == 5
    else:
        assert isinstance(decision, Admitted)
        assert decision.user == expected


async def test_anonymous_leases_are_counted_apart_from_the_jwt_users() -> None:
    hooks, anonymous = public_hooks(cap=1)
    viewer = hooks.on_connect(request(None))
    assert isinstance(viewer, Admitted)
    assert hooks.on_subscribe(viewer, "market/#", 1) == 1
    assert hooks.on_subscribe(viewer, "user/#", 0) == 0x80
    assert hooks.on_publish(viewer, "market/luno/BTC-ZAR") is False
    public = await hooks.on_lease(ANONYMOUS_USER, None)
    assert isinstance(public, Lease)
    full = await hooks.on_lease(ANONYMOUS_USER, None)
    assert isinstance(full, Refused)
    assert (full.code, full.reason) == (3, "anonymous_limit")
    # The JWT limit (1 in total) is untouched by the anonymous connection.
    alice = await hooks.on_lease("alice", None)
    assert isinstance(alice, Lease)
    assert (anonymous.connections, anonymous.admitted) == (1, 1)
    await hooks.on_release(alice)  # every release plugin sees it; only its limiter counts it
    assert anonymous.connections == 1
    await hooks.on_release(public)
    assert anonymous.connections == 0
    assert isinstance(await hooks.on_lease(ANONYMOUS_USER, None), Lease)


async def test_anonymous_lease_fails_closed_when_uncountable() -> None:
    anonymous = AnonymousAccess(
        AnonymousPolicy.of(["market/#"], "UTC"), Unreachable(LocalConnectionLimits(1, 1)), max_topic_bytes=256
    )
    refused = await anonymous.on_lease(ANONYMOUS_USER, None)
    assert isinstance(refused, Refused)
    assert refused.reason == "cluster_unavailable"
    assert await anonymous.on_lease("alice", None) is None
