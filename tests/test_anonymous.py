"""Public read-only access: the pure decisions (table-driven), the config, and a real broker
with paho clients over TCP and WebSocket."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bridge.acl import acl_for
from bridge.anonymous import (
    ANONYMOUS_CLIENT_PREFIX,
    ANONYMOUS_USER,
    AnonymousPolicy,
    decide_anonymous,
    sub_acl_problem,
)
from bridge.auth import Claims, KeyRing, TokenPolicy, VerificationKey, decide_auth
from bridge.core.hooks import Admitted, ConnectRequest, Refused
from bridge.errors import AuthError, ConfigError
from bridge.metrics import MetricsRegistry
from tests.conftest import (
    TEST_KEY,
    BrokerThread,
    Client,
    Transport,
    bridge_config,
    make_tick,
    token_for,
    unique,
    wait_until,
)

ClientFactory = Callable[..., Client]
TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ACCEPTED, SERVER_UNAVAILABLE, NOT_AUTHORIZED = 0, 3, 5
REFUSED = 0x80
POLICY = AnonymousPolicy.of(["market/#"], "Africa/Nairobi")


def _request(password: bytes | None, *, username: str | None = None, clean: bool = True) -> ConnectRequest:
    return ConnectRequest("c1", username, password, clean, "ws", "127.0.0.1", 0.0)


# -- pure decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("market/#", True),
        ("market/luno/+", True),
        ("market", True),
        ("news/#", True),
        ("#", False),
        ("+/#", False),
        ("+/alice/#", False),
        ("user/#", False),
        ("user/alice/#", False),
        ("user", False),
        ("service/#", False),
        ("$SYS/#", False),
        ("market/#/x", False),  # not a valid filter
        ("", False),
        ("market/\x00", False),
    ],
)
def test_which_filters_anonymous_clients_may_be_granted(topic_filter: str, allowed: bool) -> None:
    assert (sub_acl_problem(topic_filter) is None) is allowed


def test_a_policy_with_a_private_filter_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="user"):
        AnonymousPolicy.of(["market/#", "user/#"], "UTC")


@pytest.mark.parametrize(
    ("req", "outcome"),
    [
        (_request(None), "admitted"),
        (_request(b""), "admitted"),
        (_request(None, username="alice"), "admitted"),  # a username alone is no credential
        (_request(b"a.token"), None),  # a password is a token: the JWT plugin decides
        (_request(None, clean=False), "anonymous_persistent"),
    ],
)
def test_decide_anonymous(req: ConnectRequest, outcome: str | None) -> None:
    decision = decide_anonymous(req, POLICY)
    if outcome is None:
        assert decision is None
    elif outcome == "admitted":
        assert isinstance(decision, Admitted)
        assert (decision.user, decision.zone, decision.claims) == (ANONYMOUS_USER, "Africa/Nairobi", None)
        assert decision.client_id == ANONYMOUS_CLIENT_PREFIX + "c1"
    else:
        assert isinstance(decision, Refused)
        assert (decision.code, decision.reason) == (NOT_AUTHORIZED, outcome)


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        ("subscribe", "market/#", True),
        ("subscribe", "market/luno/BTC-ZAR", True),
        ("subscribe", "#", False),
        ("subscribe", "user/#", False),
        ("subscribe", "user/alice/#", False),
        ("subscribe", "+/alice/inbox", False),
        ("subscribe", "service/#", False),
        ("subscribe", "$SYS/#", False),
        ("publish", "market/luno/BTC-ZAR", False),
        ("publish", "user/alice/x", False),
        ("receive", "market/luno/BTC-ZAR", True),
        ("receive", "user/alice/x", False),
    ],
)
def test_the_anonymous_acl_is_read_only_and_public(action: str, topic: str, allowed: bool) -> None:
    acl = POLICY.acl
    check = {"subscribe": acl.may_subscribe, "publish": acl.may_publish, "receive": acl.may_receive}[action]
    assert check(topic) is allowed


def test_no_token_can_carry_the_anonymous_identity() -> None:
    keys = KeyRing((VerificationKey(kid="test", key=TEST_KEY.key, algorithms=frozenset({"HS256"})),))
    token = token_for(ANONYMOUS_USER, "admin")
    decision = decide_auth(token, ANONYMOUS_USER, time.time(), keys, TokenPolicy())
    assert isinstance(decision, AuthError)
    assert decision.reason == "bad_claims"
    # And a real user's ACL never names the anonymous identity's namespace.
    claims = Claims(sub="alice", role="subscriber", exp=time.time() + 60)
    assert ANONYMOUS_USER not in "".join(acl_for(claims).subscribe)


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anonymous", "field"),
    [
        ({"enabled": True, "sub_acl": ["market/#", "user/#"]}, "auth.anonymous.sub_acl"),
        ({"enabled": True, "sub_acl": ["#"]}, "auth.anonymous.sub_acl"),
        ({"enabled": True, "sub_acl": []}, "auth.anonymous.sub_acl"),
        ({"enabled": True, "tz": "Mars/Olympus_Mons"}, "auth.anonymous.tz"),
        ({"enabled": True, "max_connections": -1}, "auth.anonymous.max_connections"),
        ({"enabled": True, "guest": True}, "auth.anonymous.guest"),
    ],
)
def test_a_bad_anonymous_config_fails_at_startup_naming_the_field(
    tmp_path: Any, anonymous: dict[str, Any], field: str
) -> None:
    from bridge.config import load_config  # noqa: PLC0415

    path = tmp_path / "bridge.yaml"
    secret = "0123456789abcdef0123456789abcdef"
    path.write_text(
        json.dumps({"auth": {"keys": [{"secret": secret, "algorithms": ["HS256"]}], "anonymous": anonymous}})
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.field == field
    assert "\n" not in str(raised.value)


def test_anonymous_access_needs_auth() -> None:
    with pytest.raises(ValueError, match=r"anonymous\.enabled needs auth"):
        bridge_config(auth={"enabled": False, "anonymous": {"enabled": True}})


def test_anonymous_access_is_off_by_default() -> None:
    config = bridge_config()
    assert config.auth.anonymous.enabled is False
    assert (config.auth.anonymous.sub_acl, config.auth.anonymous.tz) == (["market/#"], "UTC")
    assert config.auth.anonymous.max_connections == 1000


# -- a real broker ----------------------------------------------------------------------------


def _public_broker(**anonymous: Any) -> BrokerThread:
    settings = {"enabled": True, "tz": "Africa/Nairobi", "max_connections": 2, **anonymous}
    auth = {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_KEY.key.decode()}]}
    return BrokerThread(bridge_config(auth={**auth, "anonymous": settings}))


@pytest.fixture
def public() -> Iterator[BrokerThread]:
    with _public_broker() as running:
        yield running


@pytest.fixture
def private() -> Iterator[BrokerThread]:
    with BrokerThread(bridge_config()) as running:
        yield running


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("username", [None, "alice"])
def test_without_anonymous_access_no_password_is_not_authorized(
    private: BrokerThread, clients: ClientFactory, transport: Transport, username: str | None
) -> None:
    """CONNACK 5 (not authorized, ``missing_token``): public access is off."""
    client = clients(private.port(transport), transport=transport, anonymous=True, username=username)
    client.connect(expect=NOT_AUTHORIZED)
    assert private.call(lambda: private.broker.stats.refusals["missing_token"]) == 1
    assert private.call(lambda: private.broker.limits.total) == 0


def _anonymous(broker: BrokerThread, clients: ClientFactory, transport: Transport, **kwargs: Any) -> Client:
    client = clients(broker.port(transport), transport=transport, anonymous=True, **kwargs)
    client.connect()
    return client


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_anonymous_clients_read_market_data_in_the_configured_zone(
    public: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    viewer = _anonymous(public, clients, transport)
    assert viewer.subscribe("market/#") == [0]
    feed = clients(public.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick().encode())
    tick = json.loads(viewer.expect(1)[0].payload)
    # make_tick's ts is 11:00Z; Nairobi is UTC+3.
    assert (tick["ts"], tick["tz"]) == ("2026-11-30T14:00:00.000+03:00", "Africa/Nairobi")
    rows = public.call(public.broker.connection_list)
    assert [row["user"] for row in rows if row["client_id"].startswith(ANONYMOUS_CLIENT_PREFIX)] == [
        ANONYMOUS_USER
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_anonymous_clients_get_no_private_topics(
    public: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    viewer = _anonymous(public, clients, transport)
    assert viewer.subscribe([("user/#", 0), ("market/luno/+", 0), ("#", 0), ("+/alice/#", 0)]) == [
        REFUSED,
        0,
        REFUSED,
        REFUSED,
    ]
    assert viewer.subscribe("service/#") == [REFUSED]
    # A message for a user never reaches the anonymous client.
    user = unique("alice")
    service = clients(public.tcp_port, role="service")
    service.connect()
    service.publish(f"user/{user}/inbox", b"secret", qos=1)
    feed = clients(public.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/ETH-ZAR", make_tick(pair="ETH-ZAR").encode())
    (only,) = viewer.expect(1)
    assert only.topic == "market/luno/ETH-ZAR"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_anonymous_publishes_are_dropped_and_counted(
    public: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    trader = clients(public.tcp_port, role="subscriber")
    trader.connect()
    assert trader.subscribe("market/#") == [0]
    mallory = _anonymous(public, clients, transport)
    mallory.publish("market/luno/BTC-ZAR", make_tick(last="1").encode())
    mallory.publish("market/luno/BTC-ZAR", make_tick(last="2").encode(), qos=1)
    wait_until(lambda: public.call(lambda: public.broker.stats.publishes_dropped["acl"]) == 2, what="drops")
    feed = clients(public.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick(last="3").encode())
    (first,) = trader.expect(1)
    assert json.loads(first.payload)["last"] == "3"  # the anonymous ticks never arrived


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_anonymous_wills_and_persistent_sessions_are_refused(
    public: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    with_will = clients(public.port(transport), transport=transport, anonymous=True)
    with_will.paho.will_set("market/luno/BTC-ZAR", make_tick().encode())
    with_will.connect(expect=NOT_AUTHORIZED)
    persistent = clients(public.port(transport), transport=transport, anonymous=True, clean_session=False)
    persistent.connect(expect=NOT_AUTHORIZED)
    refusals = public.call(lambda: dict(public.broker.stats.refusals))
    assert (refusals["will_refused"], refusals["anonymous_persistent"]) == (1, 1)
    assert public.call(lambda: dict(public.broker.sessions)) == {}


def test_anonymous_connections_have_their_own_cap(public: BrokerThread, clients: ClientFactory) -> None:
    first = _anonymous(public, clients, "websockets")
    _anonymous(public, clients, "tcp")
    third = clients(public.ws_port, transport="websockets", anonymous=True)
    third.connect(expect=SERVER_UNAVAILABLE)
    assert public.call(lambda: public.broker.stats.refusals["anonymous_limit"]) == 1
    # The JWT users' limits are apart: a token still gets in, and counts only there.
    clients(public.tcp_port, role="subscriber").connect()
    assert public.call(lambda: public.broker.limits.total) == 1
    assert public.broker.anonymous is not None
    assert public.call(lambda: public.broker.anonymous.connections) == 2  # type: ignore[union-attr]
    first.close()
    wait_until(lambda: public.call(lambda: public.broker.anonymous.connections) == 1, what="release")  # type: ignore[union-attr]
    _anonymous(public, clients, "websockets")
    metrics = public.call(lambda: MetricsRegistry(public.broker).render().decode())
    assert "mb_anonymous_connections 2.0" in metrics
    assert "mb_anonymous_connects_total 3.0" in metrics


def test_a_zero_cap_admits_no_anonymous_client(clients: ClientFactory) -> None:
    with _public_broker(max_connections=0) as broker:
        clients(broker.tcp_port, anonymous=True).connect(expect=SERVER_UNAVAILABLE)


def test_anonymous_clients_cannot_take_over_a_users_client_id(
    public: BrokerThread, clients: ClientFactory
) -> None:
    """Same client id as a logged-in user: both stay connected, apart (it was a takeover, or
    a refusal because the id is the user's)."""
    client_id = unique("phone")
    owner = clients(public.tcp_port, role="subscriber", client_id=client_id)
    owner.connect()
    squatter = _anonymous(public, clients, "websockets", client_id=client_id)
    assert squatter.subscribe("market/#") == [0]
    # A takeover closes the old connection before the new one's CONNACK: the owner's
    # SUBSCRIBE is answered only if it is still connected.
    assert owner.subscribe("market/#") == [0]
    assert not owner.disconnected.is_set()
    ids = {row["client_id"] for row in public.call(public.broker.connection_list)}
    assert ids == {client_id, ANONYMOUS_CLIENT_PREFIX + client_id}


def test_anonymous_clients_cannot_squat_a_users_client_id(
    public: BrokerThread, clients: ClientFactory
) -> None:
    """An anonymous client holding an id first does not lock its user out of it."""
    client_id = unique("phone")
    _anonymous(public, clients, "tcp", client_id=client_id)
    user = unique("alice")
    owner = clients(
        public.tcp_port, client_id=client_id, username=user, password=token_for(user, "subscriber")
    )
    owner.connect(expect=ACCEPTED)
    assert owner.subscribe(f"user/{user}/#") == [0]


def test_tokens_still_log_in_next_to_anonymous_access(public: BrokerThread, clients: ClientFactory) -> None:
    bad = clients(public.tcp_port, username="alice", password="not-a-jwt")
    bad.connect(expect=NOT_AUTHORIZED)
    user = unique("alice")
    good = clients(
        public.ws_port, transport="websockets", username=user, password=token_for(user, "subscriber")
    )
    good.connect()
    assert good.subscribe(f"user/{user}/#") == [0]
    assert public.call(lambda: public.broker.anonymous.admitted) == 0  # type: ignore[union-attr]
