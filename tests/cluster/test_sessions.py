"""bridge.cluster.sessions: when a node may expire a persistent session, table-driven; and the
rule at work on broker nodes sharing one store (a restarted node never expires a session
another node holds)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bridge.cluster.sessions import Verdict, shared_verdict
from bridge.core.store import SessionRecord
from tests.cluster.test_link import nodes, seeds  # noqa: F401 - fixtures
from tests.conftest import BrokerThread, Client, bridge_config, token_for, unique, wait_until

pytestmark = pytest.mark.timeout(90)
EXPIRY = 100.0
NOW = 10_000.0


@pytest.mark.parametrize(
    ("record", "alive", "verdict"),
    [
        (None, False, "gone"),
        (None, True, "gone"),
        (SessionRecord("c", "u", {}, None), True, "keep"),  # connected on a live node
        (SessionRecord("c", "u", {}, None), False, "orphaned"),  # its node died
        (SessionRecord("c", "u", {}, NOW - EXPIRY), False, "expire"),
        (SessionRecord("c", "u", {}, NOW - EXPIRY + 1), False, "keep"),  # resumed meanwhile
        (SessionRecord("c", "u", {}, NOW - 5 * EXPIRY), True, "expire"),
    ],
)
def test_shared_verdict(record: SessionRecord | None, alive: bool, verdict: Verdict) -> None:
    assert shared_verdict(record, holder_alive=alive, now=NOW, expiry_s=EXPIRY) == verdict


def test_a_restarted_node_never_expires_a_session_live_on_another(
    nodes: Callable[..., BrokerThread],  # noqa: F811
    clients: Callable[..., Client],
    redis_url: str,
    seeds: list[str],  # noqa: F811
) -> None:
    b = nodes("b", store=redis_url)
    user, cid = unique("kim"), unique("phone")
    phone = clients(
        b.tcp_port, client_id=cid, clean_session=False, username=user, password=token_for(user, "subscriber")
    )
    phone.connect()
    assert phone.subscribe(f"user/{user}/#", qos=1) == [1]
    # Node c starts while the phone is live on b: it restores the session as a copy. Its clock
    # then runs a week ahead, so its copy looks expired.
    ahead = [0.0]
    config = bridge_config(
        cluster={"enabled": True, "node_id": "c", "redis_cluster_nodes": seeds},
        store={"redis_url": redis_url},
    )
    with BrokerThread(config, clock=lambda: time.time() + ahead[0]) as c:
        assert c.call(lambda: cid in c.broker._sessions)
        ahead[0] = config.broker.session_expiry_s + 60
        assert c.run(c.broker.expire_sessions()) == 0
        store = c.broker.store
        assert store is not None
        records = c.run(store.user_sessions(user))
        assert [(r.client_id, r.disconnected_at) for r in records] == [(cid, None)]
        # Still the user's mailbox session: a message sent on c is stored and reaches b's phone.
        assert c.run(c.broker.send_to_user(user, "alerts", b"still here")).stored is not None
        assert phone.expect(1)[0].payload == b"still here"
        # Once the phone leaves for good, the store's time decides: c expires it.
        phone.close()
        wait_until(
            lambda: [r.disconnected_at is not None for r in c.run(store.user_sessions(user))] == [True],
            what="b saved it as disconnected",
        )
        # (c's copy counted from its last look, when the store said "connected".)
        ahead[0] += config.broker.session_expiry_s
        assert c.run(c.broker.expire_sessions()) == 1
        assert c.run(store.user_sessions(user)) == []
