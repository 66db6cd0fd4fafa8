"""Health, readiness, metrics and the admin API: real HTTP requests to a real broker."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import (
    TEST_SECRET,
    BrokerThread,
    Client,
    bridge_config,
    go_offline,
    make_tick,
    persistent_client,
    token_for,
    unique,
    wait_until,
)
from tests.redis_server import RedisProcess

ClientFactory = Callable[..., Client]


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(bridge_config(), http=True) as running:
        yield running


@pytest.fixture
def http(broker: BrokerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=broker.http_url, timeout=10) as client:
        yield client


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(unique('ops'), 'admin')}"}


def _metric(text: str, name: str, **labels: str) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{{{re.escape(label)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_the_dashboard_config_says_503_while_the_broker_drains(
    broker: BrokerThread, http: httpx.Client
) -> None:
    """A graceful stop closes the WebSocket listener before the HTTP server: the page must be
    told to retry, not that the listener is off."""
    before = http.get("/dashboard/config.json")
    assert before.status_code == 200
    assert before.json()["ws"]["port"] == broker.ws_port
    broker.run(broker.broker.drain(0.1))
    during = http.get("/dashboard/config.json")
    assert (during.status_code, during.json()["error"]) == (503, "unavailable")
    assert "shutting down" in during.json()["detail"]


def test_healthz_and_readyz(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_readyz_follows_redis_going_away_and_coming_back(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        with (
            BrokerThread(bridge_config(store={"redis_url": redis.url}), http=True) as running,
            httpx.Client(base_url=running.http_url, timeout=10) as http,
        ):
            assert http.get("/readyz").status_code == 200
            redis.stop()
            unready = http.get("/readyz")
            assert unready.status_code == 503
            assert "store unreachable" in unready.json()["reason"]
            redis.start()
            wait_until(lambda: http.get("/readyz").status_code == 200, what="ready again")
    finally:
        redis.stop()


def test_a_cluster_node_is_unready_while_its_redis_is_not_answering(tmp_path: Path) -> None:
    """The cluster's Redis here is one server (sharded pub/sub works there too), paused."""
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    config = bridge_config(
        cluster={"enabled": True, "node_id": "n7", "redis_url": redis.url, "lease_ttl_s": 3}
    )
    try:
        with (
            BrokerThread(config, http=True) as running,
            httpx.Client(base_url=running.http_url, timeout=10) as http,
        ):
            assert http.get("/readyz").status_code == 200
            metrics = http.get("/metrics").text
            assert _metric(metrics, "mb_cluster_ready", node="n7") == 1
            assert 'mb_connections{node="n7"}' in metrics  # every family labelled with the node
            admin = http.get("/admin/connections", headers=_admin()).json()
            assert (admin["node"], admin["cluster_nodes"]) == ("n7", ["n7"])
            probe = Client(
                running.tcp_port, client_id="probe-1", username="u2", password=token_for("u2", "subscriber")
            )
            probe.connect()
            try:
                # The cluster-wide list, each connection with its node.
                wait_until(
                    lambda: (
                        [
                            (c["client_id"], c["node"])
                            for c in http.get("/admin/connections", headers=_admin()).json()["connections"]
                        ]
                        == [("probe-1", "n7")]
                    ),
                    what="the connection listed with its node",
                )
            finally:
                probe.close()
            with redis.paused():
                wait_until(lambda: http.get("/readyz").status_code == 503, what="unready", timeout=20)
                assert http.get("/readyz").json()["reason"].startswith("cluster: ")
                sub = Client(running.tcp_port, username="u1", password=token_for("u1", "subscriber"))
                try:
                    sub.connect(expect=3)  # fail closed: nobody is admitted uncounted
                finally:
                    sub.close()
            wait_until(lambda: http.get("/readyz").status_code == 200, what="ready again", timeout=20)
    finally:
        redis.stop()


def test_readyz_and_admin_api_answer_in_time_while_redis_is_hung(
    tmp_path: Path, clients: ClientFactory
) -> None:
    """A SIGSTOPped Redis answers nothing: readiness says so within a second, a message that
    must be stored gets its 503 at store.call_timeout_s, and all is well after SIGCONT."""
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        config = bridge_config(store={"redis_url": redis.url})
        deadline = config.store.call_timeout_s
        with (
            BrokerThread(config, http=True) as running,
            httpx.Client(base_url=running.http_url, timeout=30) as http,
        ):
            user, phone_id = unique("alice"), unique("phone")
            go_offline(running, clients, user, phone_id)
            message = {"topic": "alerts", "payload": "during"}
            with redis.paused():
                started = time.monotonic()
                unready = http.get("/readyz")
                readyz_s = time.monotonic() - started
                started = time.monotonic()
                refused = http.post(f"/admin/users/{user}/messages", headers=_admin(), json=message)
                post_s = time.monotonic() - started
            print(f"redis hung: /readyz answered in {readyz_s:.2f}s, admin POST in {post_s:.2f}s")
            assert unready.status_code == 503
            assert "did not answer ping" in unready.json()["reason"]
            assert readyz_s < 1.0
            assert (refused.status_code, refused.json()["error"]) == (503, "unavailable")
            assert "did not answer enqueue" in refused.json()["detail"]
            assert deadline - 0.1 < post_s < deadline + 1.5

            assert _metric(http.get("/metrics").text, "mb_store_call_failures_total", kind="timeout") >= 2

            # Recovered without a restart.
            wait_until(lambda: http.get("/readyz").status_code == 200, what="ready again")
            accepted = http.post(
                f"/admin/users/{user}/messages",
                headers=_admin(),
                json={"topic": "alerts", "payload": "after"},
            )
            assert (accepted.status_code, accepted.json()["stored"]) == (202, True)
    finally:
        redis.stop()


def test_readyz_turns_503_as_soon_as_draining_starts(broker: BrokerThread, http: httpx.Client) -> None:
    broker.run(broker.broker.drain(1.0))
    unready = http.get("/readyz")
    assert (unready.status_code, unready.json()["reason"]) == (503, "shutting down")
    assert http.get("/healthz").status_code == 200


def test_metrics_change_as_traffic_flows(
    broker: BrokerThread, http: httpx.Client, clients: ClientFactory
) -> None:
    before = http.get("/metrics").text
    assert "# TYPE mb_connections gauge" in before
    sub = clients(broker.tcp_port, role="subscriber")
    sub.connect()
    sub.subscribe("market/#")
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick().encode())
    feed.publish("market/luno/BTC-ZAR", b"not a tick")
    sub.expect(1)
    clients(broker.tcp_port, username="x", password="garbage").connect(expect=5)
    wait_until(
        lambda: _metric(http.get("/metrics").text, "mb_drops_total", reason="invalid_tick:not_json") == 1,
        what="the bad tick counted",
    )
    after = http.get("/metrics").text
    assert _metric(after, "mb_connections") == 2
    assert _metric(after, "mb_listener_connections", listener="tcp") == 2
    assert _metric(after, "mb_ticks_accepted_total") == _metric(before, "mb_ticks_accepted_total") + 1
    assert _metric(after, "mb_messages_in_total", topic_class="market") == 2
    assert _metric(after, "mb_messages_out_total", topic_class="market") == 1
    assert _metric(after, "mb_drops_total", reason="invalid_tick:not_json") == 1
    assert _metric(after, "mb_refusals_total", reason="malformed") == 1
    # Three tokens verified in full; the two accepted are remembered, the garbage is not.
    assert (
        _metric(after, "mb_token_cache_total", outcome="miss")
        - _metric(before, "mb_token_cache_total", outcome="miss")
        == 3
    )
    assert _metric(after, "mb_token_cache_entries") - _metric(before, "mb_token_cache_entries") == 2
    assert _metric(after, "mb_fanout_seconds_count") >= 1
    assert "mb_event_loop_lag_seconds_bucket" in after
    for sample in (
        'mb_sessions_deleted_total{reason="evicted"} 0.0',
        'mb_sessions_deleted_total{reason="expired"} 0.0',
        'mb_offline_total{outcome="purged"} 0.0',
    ):
        assert sample in after


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not-a-jwt"}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
        ({"Authorization": f"Bearer {token_for('eve', 'subscriber')}"}, 403),
        ({"Authorization": f"Bearer {token_for('svc', 'service')}"}, 403),
        ({"Authorization": f"Bearer {token_for('old', 'admin', ttl_s=-3600)}"}, 401),
    ],
)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/connections", None),
        ("GET", "/admin/users/alice/subscriptions", None),
        ("POST", "/admin/users/alice/messages", {"topic": "a", "payload": "x"}),
        ("PUT", "/admin/users/alice/tz", {"tz": "Africa/Lagos"}),
        ("GET", "/admin/config", None),
    ],
)
def test_admin_api_needs_an_admin_token(
    http: httpx.Client, headers: dict[str, str], status: int, method: str, path: str, body: Any
) -> None:
    response = http.request(method, path, headers=headers, json=body)
    assert response.status_code == status
    assert response.json()["error"] == ("unauthorized" if status == 401 else "forbidden")


def _admin_token(sub: str, *, iat: bool) -> str:
    """An admin token with or without ``iat`` (mint_token always sets it)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "role": "admin", "exp": now + 600}
    if iat:
        claims["iat"] = now
    return jwt.encode(claims, TEST_SECRET, algorithm="HS256", headers={"kid": "test"})


def test_admin_api_requires_iat_when_mqtt_does(clients: ClientFactory) -> None:
    auth = {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}], "require_iat": True}
    with (
        BrokerThread(bridge_config(auth=auth), http=True) as running,
        httpx.Client(base_url=running.http_url, timeout=10) as http,
    ):
        sub = unique("ops")
        without, with_iat = _admin_token(sub, iat=False), _admin_token(sub, iat=True)
        # The same token over MQTT: the reference the admin API must agree with.
        clients(running.tcp_port, username=sub, password=without).connect(expect=5)
        clients(running.tcp_port, username=sub, password=with_iat).connect()
        message = {"topic": "alerts", "payload": "hi"}
        for token, get_status, post_status in ((without, 401, 401), (with_iat, 200, 202)):
            headers = {"Authorization": f"Bearer {token}"}
            got = http.get("/admin/connections", headers=headers)
            posted = http.post("/admin/users/x/messages", headers=headers, json=message)
            assert (got.status_code, posted.status_code) == (get_status, post_status)
            if get_status == 401:
                assert got.json()["detail"] == posted.json()["detail"] == "token refused: missing_claim"


def test_connections_show_pool_health(
    broker: BrokerThread, http: httpx.Client, clients: ClientFactory
) -> None:
    user = unique("alice")
    for _ in range(2):
        clients(
            broker.ws_port,
            transport="websockets",
            username=user,
            password=token_for(user, "subscriber", tz="Africa/Lagos"),
        ).connect()
    body = http.get("/admin/connections", headers=_admin()).json()
    assert body["total"] == 2
    assert body["per_user"] == {user: 2}
    assert body["limits"] == {"max_connections": 10000, "max_connections_per_user": 10}
    assert body["per_listener"] == {"ws": 2, "tcp": 0}
    assert {c["tz"] for c in body["connections"]} == {"Africa/Lagos"}


def test_user_subscriptions_are_listed(
    broker: BrokerThread, http: httpx.Client, clients: ClientFactory
) -> None:
    user, phone_id = unique("alice"), unique("phone")
    phone = persistent_client(clients, broker.tcp_port, user, phone_id)
    phone.connect()
    phone.subscribe(f"user/{user}/#", qos=1)
    got = http.get(f"/admin/users/{user}/subscriptions", headers=_admin())
    assert (got.status_code, got.json()) == (200, {phone_id: {f"user/{user}/#": 1}})


def test_send_message_delivers_or_stores_then_202(
    broker: BrokerThread, http: httpx.Client, clients: ClientFactory
) -> None:
    user, phone_id = unique("alice"), unique("phone")
    phone = persistent_client(clients, broker.tcp_port, user, phone_id)
    phone.connect()
    phone.subscribe(f"user/{user}/#", qos=1)
    online = http.post(
        f"/admin/users/{user}/messages",
        headers=_admin(),
        json={"topic": "alerts", "payload": "hello", "priority": "HIGH"},
    )
    # Online with a persistent session: in the mailbox first (durable), delivered from there.
    assert (online.status_code, online.json()) == (202, {"delivered": 1, "stored": True, "evicted": []})
    assert phone.expect(1)[0].payload == b"hello"
    store = broker.broker.store
    assert store is not None
    wait_until(lambda: broker.run(store.queue_size(user))[0] == 0, what="removed once acknowledged")
    phone.close()
    wait_until(lambda: phone_id not in broker.call(lambda: dict(broker.broker._connections)), what="offline")
    offline = http.post(
        f"/admin/users/{user}/messages",
        headers=_admin(),
        json={
            "topic": f"user/{user}/bin",
            "payload_b64": base64.b64encode(b"\x00\x01").decode(),
            "ttl_s": 60,
        },
    )
    assert (offline.status_code, offline.json()["stored"]) == (202, True)
    back = persistent_client(clients, broker.tcp_port, user, phone_id)
    back.connect()
    assert back.expect(1)[0].payload == b"\x00\x01"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"topic": "a"}, ""),
        ({"topic": "a", "payload": "x", "payload_b64": "AA=="}, ""),
        ({"topic": "a", "payload": "x", "priority": "SOON"}, "priority"),
        ({"topic": "a", "payload": "x", "ttl_s": -1}, "ttl_s"),
        ({"topic": "a", "payload": "x", "extra": 1}, "extra"),
        ({"payload": "x"}, "topic"),
        ({"topic": "user/bob/x", "payload": "x"}, None),
        ({"topic": "a/+", "payload": "x"}, None),
        ({"topic": "a", "payload_b64": "***"}, None),
    ],
)
def test_bad_message_bodies_get_json_errors(
    http: httpx.Client, body: dict[str, Any], field: str | None
) -> None:
    response = http.post("/admin/users/alice/messages", headers=_admin(), json=body)
    assert response.status_code == 422
    error = response.json()
    assert error["error"] == "invalid_request"
    if field is not None:
        assert field in [problem["field"] for problem in error["detail"]]


def test_send_message_is_503_when_the_store_is_down(tmp_path: Path, clients: ClientFactory) -> None:
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        with (
            BrokerThread(bridge_config(store={"redis_url": redis.url}), http=True) as running,
            httpx.Client(base_url=running.http_url, timeout=20) as http,
        ):
            user, phone_id = unique("alice"), unique("phone")
            go_offline(running, clients, user, phone_id)
            redis.stop()
            response = http.post(
                f"/admin/users/{user}/messages", headers=_admin(), json={"topic": "a", "payload": "x"}
            )
            assert (response.status_code, response.json()["error"]) == (503, "unavailable")
    finally:
        redis.stop()


def test_set_tz_applies_to_live_connections(
    broker: BrokerThread, http: httpx.Client, clients: ClientFactory
) -> None:
    user = unique("alice")
    sub = clients(broker.tcp_port, username=user, password=token_for(user, "subscriber", tz="Africa/Lagos"))
    sub.connect()
    sub.subscribe("market/#")
    assert (
        http.put(f"/admin/users/{user}/tz", headers=_admin(), json={"tz": "Africa/Nairobi"}).status_code
        == 200
    )
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    feed.publish("market/luno/BTC-ZAR", make_tick().encode())
    assert json.loads(sub.expect(1)[0].payload)["tz"] == "Africa/Nairobi"
    bad = http.put(f"/admin/users/{user}/tz", headers=_admin(), json={"tz": "Mars/Base"})
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid_request")


def test_config_is_shown_with_secrets_redacted(http: httpx.Client) -> None:
    response = http.get("/admin/config", headers=_admin())
    assert response.status_code == 200
    assert TEST_SECRET not in response.text
    assert response.json()["auth"]["keys"][0]["secret"] == "**********"
    assert response.json()["limits"]["max_connections_per_user"] == 10


def test_config_hides_the_store_password_and_feed_credentials(tmp_path: Path) -> None:
    redis_password, feed_secret = "s3cret-redis-Pa55", "s3cret-feed-Pa55"
    redis = RedisProcess(tmp_path / "redis", password=redis_password)
    redis.start()
    try:
        config = bridge_config(
            store={"redis_url": redis.url},
            feeds=[{"kind": "luno", "base_url": f"https://ops:{feed_secret}@api.luno.example/"}],
        )
        with (
            BrokerThread(config, http=True) as running,
            httpx.Client(base_url=running.http_url, timeout=10) as http,
        ):
            assert http.get("/readyz").status_code == 200  # the password really is in use
            response = http.get("/admin/config", headers=_admin())
            assert response.status_code == 200
            for secret in (redis_password, feed_secret, TEST_SECRET):
                assert secret not in response.text
            body = response.json()
            assert body["store"]["redis_url"] == f"redis://:***@127.0.0.1:{redis.port}/0"
            assert body["feeds"][0]["base_url"] == "https://ops:***@api.luno.example/"
            assert body["auth"]["keys"][0]["secret"] == "**********"
    finally:
        redis.stop()


def test_openapi_documents_the_api(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/admin/connections", "/admin/users/{user}/messages"} <= set(
        paths
    )


def test_no_token_text_ever_reaches_the_logs(
    broker: BrokerThread, http: httpx.Client, clients: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = unique("alice")
    good = token_for(user, "subscriber")
    clients(broker.tcp_port, username=user, password=good).connect()
    expired = token_for(user, "subscriber", ttl_s=-3600)
    clients(broker.tcp_port, username=user, password=expired).connect(expect=5)
    clients(broker.tcp_port, username="mallory", password=good).connect(expect=5)
    admin_token = _admin()["Authorization"].split()[1]
    http.get("/admin/connections", headers={"Authorization": f"Bearer {admin_token}"})
    http.get("/admin/connections", headers={"Authorization": f"Bearer {good}"})
    assert "refused" in caplog.text
    for secret in (good, expired, admin_token, TEST_SECRET):
        assert secret not in caplog.text
        # Nor a recognisable piece of it (e.g. the signature).
        assert secret.split(".")[-1] not in caplog.text
