"""JWT auth, ACLs, connection limits and token expiry through the real broker and paho clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.auth import SigningKey, mint_token
from tests.conftest import (
    DEADLINE_S,
    TEST_KEY,
    TEST_SECRET,
    BrokerThread,
    Client,
    Transport,
    bridge_config,
    connect_packet,
    make_tick,
    persistent_client,
    token_for,
    unique,
    wait_until,
)

ClientFactory = Callable[..., Client]
TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ACCEPTED, NOT_AUTHORIZED, SERVER_UNAVAILABLE = 0, 5, 3


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("keys") / "rsa.pub.pem"
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, path


@pytest.fixture
def broker(rsa_key: tuple[rsa.RSAPrivateKey, Path]) -> Iterator[BrokerThread]:
    """A broker trusting the HS256 test key and an RS256 public key (kid 'rsa')."""
    keys = [
        {"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET},
        {"kid": "rsa", "algorithms": ["RS256"], "public_key_file": str(rsa_key[1])},
    ]
    with BrokerThread(bridge_config(auth={"keys": keys, "leeway_s": 0})) as running:
        yield running


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_signed(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _claims(sub: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "role": "subscriber", "iat": now, "exp": now + 600, **extra}


def _bad_token(kind: str, sub: str, rsa_key: tuple[rsa.RSAPrivateKey, Path]) -> tuple[str | None, str]:
    """(password, refusal reason) for each kind of bad credential."""
    now = time.time()
    if kind == "empty":
        return "", "missing_token"
    if kind == "garbage":
        return "not-a-jwt", "malformed"
    if kind == "alg_none":
        return _hand_signed({"alg": "none", "typ": "JWT"}, _claims(sub), None), "bad_alg"
    if kind == "hs256_with_rsa_public_key":
        pem = rsa_key[1].read_bytes()
        return _hand_signed({"alg": "HS256", "kid": "rsa"}, _claims(sub), pem), "bad_alg"
    if kind == "wrong_signature":
        other = SigningKey(kid="test", key=b"another-secret-that-is-long-enough-000", algorithm="HS256")
        return mint_token(other, sub=sub, role="subscriber", now=now, ttl_s=600), "bad_signature"
    if kind == "expired":
        return token_for(sub, "subscriber", now=now - 7200, ttl_s=3600), "expired"
    if kind == "not_yet_valid":
        return token_for(sub, "subscriber", nbf=int(now) + 3600), "not_yet_valid"
    if kind == "unknown_kid":
        stranger = SigningKey(kid="nobody", key=TEST_SECRET.encode(), algorithm="HS256")
        return mint_token(stranger, sub=sub, role="subscriber", now=now, ttl_s=600), "unknown_kid"
    if kind == "username_mismatch":
        return token_for("somebody-else", "subscriber"), "username_mismatch"
    if kind == "invalid_tz":
        return token_for(sub, "subscriber", tz="Mars/Olympus_Mons"), "bad_claims"
    if kind == "oversized":
        return "x" * 60_000, "too_large"
    raise AssertionError(kind)


BAD_KINDS = [
    "empty",
    "garbage",
    "alg_none",
    "hs256_with_rsa_public_key",
    "wrong_signature",
    "expired",
    "not_yet_valid",
    "unknown_kid",
    "username_mismatch",
    "invalid_tz",
    "oversized",
]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_valid_hs256_and_rs256_tokens_connect(
    broker: BrokerThread,
    clients: ClientFactory,
    transport: Transport,
    rsa_key: tuple[rsa.RSAPrivateKey, Path],
) -> None:
    hs = clients(broker.port(transport), transport=transport, role="subscriber")
    assert hs.connect() == ACCEPTED
    user = unique("rsa-user")
    rs_token = jwt.encode(_claims(user), rsa_key[0], algorithm="RS256", headers={"kid": "rsa"})
    rs = clients(broker.port(transport), transport=transport, username=user, password=rs_token)
    assert rs.connect() == ACCEPTED


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_credentials_are_refused_with_a_reason(
    broker: BrokerThread,
    clients: ClientFactory,
    rsa_key: tuple[rsa.RSAPrivateKey, Path],
    transport: Transport,
    kind: str,
) -> None:
    user = unique("mallory")
    password, reason = _bad_token(kind, user, rsa_key)
    client = clients(broker.port(transport), transport=transport, username=user, password=password)
    if kind == "oversized" and transport == "websockets":
        # The CONNECT's frame is over the pre-login message size: websockets refuses it
        # from its header with close 1009, before the broker could answer a CONNACK.
        client.paho.connect("127.0.0.1", broker.ws_port)
        client.paho.loop_start()
        assert client.disconnected.wait(DEADLINE_S)
        assert client.connack.empty()
    else:
        client.connect(expect=NOT_AUTHORIZED)
    wait_until(lambda: broker.call(lambda: broker.broker.stats.refusals[reason]) == 1, what=reason)
    assert broker.call(lambda: dict(broker.broker.sessions)) == {}
    assert broker.call(lambda: broker.broker.limits.total) == 0


def test_missing_password_is_refused(broker: BrokerThread, clients: ClientFactory) -> None:
    client = clients(broker.tcp_port, anonymous=True, username=unique("nopass"))
    client.connect(expect=NOT_AUTHORIZED)
    anonymous = clients(broker.tcp_port, anonymous=True)
    anonymous.connect(expect=NOT_AUTHORIZED)
    assert broker.call(lambda: broker.broker.stats.refusals["missing_token"]) == 2


def _raw_connect(port: int, packet: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(packet)
        return sock.recv(4)


@pytest.mark.parametrize("field", ["username", "client_id"])
def test_non_utf8_strings_close_the_connection_and_broker_keeps_serving(
    broker: BrokerThread, clients: ClientFactory, field: str
) -> None:
    # [MQTT-1.5.3-1]: ill-formed UTF-8 closes the connection (amqtt would decode it to "b'...'").
    if field == "username":
        packet = connect_packet(unique("raw"), username=b"\xff\xfe\xfd", password=token_for("x").encode())
    else:
        packet = connect_packet(b"\xff\xfe", username=b"x", password=token_for("x").encode())
    assert _raw_connect(broker.tcp_port, packet) == b""
    assert broker.call(lambda: broker.broker.stats.refusals["bad_utf8"]) == 1
    assert clients(broker.tcp_port).connect() == ACCEPTED


def test_megabyte_connect_is_closed_and_broker_keeps_serving(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    # An MQTT password holds at most 65535 bytes; a 1 MB CONNECT is malformed and must cost nothing.
    body = b"\x00\x04MQTT\x04\xc2\x00\x3c" + b"\x00\x01a" + b"\x00\x01u" + b"\xff\xff" + b"t" * 1_000_000
    remaining, length = bytearray(), len(body)
    while True:
        byte, length = length % 128, length // 128
        remaining.append(byte | (0x80 if length else 0))
        if not length:
            break
    assert _raw_connect(broker.tcp_port, b"\x10" + bytes(remaining) + body) in (b"", b"\x20\x02\x00\x05")
    assert clients(broker.tcp_port).connect() == ACCEPTED


@pytest.mark.parametrize("attack", ["wrong_password", "other_users_valid_token"])
def test_reusing_another_users_client_id_leaves_the_victim_untouched(
    broker: BrokerThread, clients: ClientFactory, attack: str
) -> None:
    client_id = unique("alice-phone")
    alice = unique("alice")
    victim = clients(
        broker.ws_port,
        transport="websockets",
        client_id=client_id,
        username=alice,
        clean_session=False,
        password=token_for(alice, "subscriber"),
    )
    victim.connect()
    assert victim.subscribe("market/#") == [0]

    mallory = unique("mallory")
    password = "wrong" if attack == "wrong_password" else token_for(mallory, "subscriber")
    username = alice if attack == "wrong_password" else mallory
    intruder = clients(broker.tcp_port, client_id=client_id, username=username, password=password)
    intruder.connect(expect=NOT_AUTHORIZED)

    assert not victim.disconnected.is_set()
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick(last="7").encode())
    (tick,) = victim.expect(1)
    assert json.loads(tick.payload)["last"] == "7"
    reason = "malformed" if attack == "wrong_password" else "client_id_owned"
    assert broker.call(lambda: broker.broker.stats.refusals[reason]) == 1


def test_subscriber_acl_is_checked_per_filter(broker: BrokerThread, clients: ClientFactory) -> None:
    user = unique("sub")
    client = clients(broker.tcp_port, username=user, password=token_for(user, "subscriber"))
    client.connect()
    codes = client.subscribe(
        [("market/#", 0), ("user/other/#", 0), (f"user/{user}/#", 1), ("#", 0), ("user/+/#", 0)]
    )
    assert codes == [0, 0x80, 1, 0x80, 0x80]
    assert broker.call(lambda: broker.broker.stats.subscribes_denied) == 3


def test_subscriber_may_not_publish_and_stays_connected(broker: BrokerThread, clients: ClientFactory) -> None:
    watcher = clients(broker.tcp_port)
    watcher.connect()
    watcher.subscribe("market/#")
    user = unique("sub")
    sneaky = clients(broker.tcp_port, username=user, password=token_for(user, "subscriber"))
    sneaky.connect()
    sneaky.publish("market/luno/BTC-ZAR", make_tick(last="666").encode())
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick(last="1").encode())
    (only,) = watcher.expect(1)
    assert json.loads(only.payload)["last"] == "1"
    assert not sneaky.disconnected.is_set()
    assert broker.call(lambda: broker.broker.stats.publishes_dropped["acl"]) == 1


def test_service_publishes_to_a_user_who_alone_receives_it(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    alice, bob = unique("alice"), unique("bob")
    a = clients(
        broker.ws_port, transport="websockets", username=alice, password=token_for(alice, "subscriber")
    )
    a.connect()
    assert a.subscribe(f"user/{alice}/#") == [0]
    b = clients(broker.tcp_port, username=bob, password=token_for(bob, "subscriber"))
    b.connect()
    assert b.subscribe(f"user/{alice}/#") == [0x80]
    service = clients(broker.tcp_port, role="service")
    service.connect()
    service.publish(f"user/{alice}/alerts", b"BTC-ZAR crossed 1.7M")
    (alert,) = a.expect(1)
    assert (alert.topic, alert.payload) == (f"user/{alice}/alerts", b"BTC-ZAR crossed 1.7M")


def test_token_acl_claims_narrow_the_role_default(broker: BrokerThread, clients: ClientFactory) -> None:
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick().encode())
    feed.publish("market/valr/BTC-ZAR", make_tick("valr").encode())
    wait_until(lambda: broker.call(lambda: len(broker.broker.retained_messages)) == 2, what="snapshots")
    user = unique("narrow")
    client = clients(
        broker.tcp_port, username=user, password=token_for(user, "subscriber", sub_acl=["market/luno/#"])
    )
    client.connect()
    assert client.subscribe([("market/valr/#", 0), ("market/luno/+", 0)]) == [0x80, 0]
    (snapshot,) = client.expect(1)
    assert snapshot.topic == "market/luno/BTC-ZAR"
    feed.publish("market/valr/BTC-ZAR", make_tick("valr", last="2").encode())
    feed.publish("market/luno/BTC-ZAR", make_tick(last="3").encode())
    (live,) = client.expect(1)
    assert (live.topic, json.loads(live.payload)["last"]) == ("market/luno/BTC-ZAR", "3")


def test_eleventh_connection_of_one_user_is_refused_at_once(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    user = unique("busy")
    token = token_for(user, "subscriber")
    for _ in range(10):
        assert clients(broker.tcp_port, username=user, password=token).connect() == ACCEPTED
    eleventh = clients(broker.ws_port, transport="websockets", username=user, password=token)
    eleventh.connect(expect=SERVER_UNAVAILABLE)
    assert broker.call(lambda: broker.broker.stats.refusals["user_limit"]) == 1
    assert broker.call(lambda: broker.broker.connections_by_user()[user]) == 10
    # Another user is not affected.
    assert clients(broker.tcp_port, role="subscriber").connect() == ACCEPTED


def test_limits_are_counted_exactly_through_every_way_out(clients: ClientFactory) -> None:
    config = bridge_config(
        limits={"max_connections_per_user": 2, "max_connections": 3}, broker={"connect_timeout_s": 5}
    )
    with BrokerThread(config) as running:
        user = unique("counted")
        token = token_for(user, "subscriber")

        def total() -> int:
            return running.call(lambda: running.broker.limits.total)

        first = clients(running.tcp_port, username=user, password=token, client_id=unique("a"))
        first.connect()
        second = clients(running.tcp_port, username=user, password=token, client_id=unique("b"))
        second.connect()
        clients(running.tcp_port, username=user, password=token).connect(expect=SERVER_UNAVAILABLE)

        # Takeover of one's own client id at the limit is a replacement, not a third connection.
        again = clients(
            running.ws_port, transport="websockets", username=user, password=token, client_id=first.client_id
        )
        again.connect()
        assert first.disconnected.wait(DEADLINE_S)
        wait_until(lambda: total() == 2, what="takeover counted once")

        # Global limit: one more user fits, the next does not.
        clients(running.tcp_port, role="subscriber").connect()
        clients(running.tcp_port, role="subscriber").connect(expect=SERVER_UNAVAILABLE)
        assert running.call(lambda: running.broker.stats.refusals["global_limit"]) == 1

        # Clean disconnect frees a slot.
        second.close()
        wait_until(lambda: total() == 2, what="clean disconnect released")
        # Abrupt drop frees a slot.
        raw_user = unique("raw")
        sock = socket.create_connection(("127.0.0.1", running.tcp_port), timeout=DEADLINE_S)
        sock.sendall(
            connect_packet(raw_user, username=raw_user.encode(), password=token_for(raw_user).encode())
        )
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        wait_until(lambda: total() == 3, what="raw client counted")
        sock.close()
        wait_until(lambda: total() == 2, what="abrupt drop released")
        # Keep-alive timeout frees a slot.
        silent = unique("silent")
        sock = socket.create_connection(("127.0.0.1", running.tcp_port), timeout=DEADLINE_S)
        sock.sendall(
            connect_packet(silent, keepalive=1, username=silent.encode(), password=token_for(silent).encode())
        )
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        assert sock.recv(4) == b""  # dropped after 1.5 s of silence
        sock.close()
        wait_until(lambda: total() == 2, what="keep-alive release")
        assert running.call(lambda: running.broker.stats.keepalive_timeouts) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_expiring_mid_session_disconnects_the_client(
    broker: BrokerThread, clients: ClientFactory, transport: Transport
) -> None:
    user = unique("short")
    client = clients(
        broker.port(transport),
        transport=transport,
        username=user,
        password=token_for(user, "subscriber", ttl_s=1),
    )
    client.connect()
    assert client.subscribe("market/#") == [0]
    assert client.disconnected.wait(DEADLINE_S)
    wait_until(lambda: broker.call(lambda: broker.broker.stats.token_expiries) == 1, what="expiry counted")
    assert broker.call(lambda: broker.broker.limits.total) == 0


def test_persistent_session_is_bound_to_its_user_after_disconnect(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    client_id = unique("shared-id")
    alice = unique("alice")
    first = persistent_client(clients, broker.tcp_port, alice, client_id)
    first.connect()
    first.subscribe("market/#")
    first.close()
    wait_until(lambda: client_id not in broker.call(lambda: dict(broker.broker._connections)), what="offline")
    mallory = unique("mallory")
    persistent_client(clients, broker.tcp_port, mallory, client_id).connect(expect=NOT_AUTHORIZED)
    back = persistent_client(clients, broker.tcp_port, alice, client_id)
    back.connect()
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick().encode())
    assert back.expect(1)[0].topic == "market/luno/BTC-ZAR"


class Clock:
    """The broker's clock: wall time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.parametrize(("cache_size", "verified_in_full"), [(10_000, 1), (0, 4)])
def test_a_token_seen_before_is_not_verified_again_yet_never_accepted_past_exp_or_for_another_user(
    clients: ClientFactory, cache_size: int, verified_in_full: int
) -> None:
    clock = Clock()
    keys = [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]
    config = bridge_config(auth={"keys": keys, "leeway_s": 0, "token_cache_size": cache_size})
    with BrokerThread(config, clock=clock) as running:
        user = unique("storm")
        token = token_for(user, "subscriber", ttl_s=600)
        for _ in range(2):  # a reconnect with the same token
            client = clients(running.tcp_port, username=user, password=token)
            client.connect()
            client.close()
        clients(running.tcp_port, username=unique("other"), password=token).connect(expect=NOT_AUTHORIZED)
        clock.offset = 601  # past exp (leeway 0): refused, cached or not
        clients(running.tcp_port, username=user, password=token).connect(expect=NOT_AUTHORIZED)
        tokens = running.broker.tokens
        assert tokens is not None
        counts = running.call(lambda: (tokens.hits, tokens.misses, len(tokens)))
        refusals = running.call(lambda: dict(running.broker.stats.refusals))
    assert counts == (4 - verified_in_full, verified_in_full, 0)  # the expired token was dropped
    assert refusals == {"username_mismatch": 1, "expired": 1}


def test_signing_key_in_conftest_matches_the_config() -> None:
    # Guards the fixtures themselves: the test key is what bridge_config trusts.
    keys = bridge_config().auth.keys
    assert keys[0].secret is not None
    assert keys[0].secret.get_secret_value().encode() == TEST_KEY.key
