"""bridge.cluster.link wired into the broker: several MarketBroker nodes on one real local Redis
Cluster (the session's, tests/cluster/conftest.py), real paho clients over TCP and WebSocket."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import pytest

from bridge.cluster import tickwire
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from bridge.core.tick import Tick
from bridge.errors import ClusterUnavailable
from tests.conftest import (
    DEADLINE_S,
    TEST_SECRET,
    BrokerThread,
    Client,
    bridge_config,
    make_tick,
    persistent_client,
    token_for,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def seeds(redis_cluster: RedisClusterProcesses) -> list[str]:
    """The cluster's seed addresses, every master emptied (sync: the brokers run in threads)."""
    redis_cluster.wait_ok()
    for master in redis_cluster.masters():
        master.call("FLUSHALL")
    return [f"127.0.0.1:{node.port}" for node in redis_cluster.nodes if node.alive]


@pytest.fixture
def nodes(seeds: list[str]) -> Iterator[Callable[..., BrokerThread]]:
    """Broker nodes of one cluster (``nodes("a")``), stopped after the test."""
    with ExitStack() as stack:

        def start(
            node_id: str,
            *,
            limits: dict[str, Any] | None = None,
            store: str | None = None,
            anonymous: dict[str, Any] | None = None,
            queue_max_messages: int | None = None,
            **cluster: Any,
        ) -> BrokerThread:
            extra: dict[str, Any] = {}
            if anonymous:
                keys = [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]
                extra["auth"] = {"keys": keys, "anonymous": anonymous}
            if limits:
                extra["limits"] = limits
            if store:
                extra["store"] = {"redis_url": store}
                if queue_max_messages is not None:
                    extra["store"]["queue_max_messages"] = queue_max_messages
            config = bridge_config(
                cluster={"enabled": True, "node_id": node_id, "redis_cluster_nodes": seeds, **cluster},
                **extra,
            )
            return stack.enter_context(BrokerThread(config))

        yield start


def fresh_pair() -> str:
    """A pair no other test feeds (the shared snapshots outlive a test only until flushall)."""
    return unique("P").replace("-", "").upper() + "-ZAR"


def leases(node: BrokerThread, user: str) -> int:
    """``user``'s connections counted cluster-wide, as ``node`` last saw them (its heartbeat)."""
    return node.call(lambda: node.broker.limits.count(user))


def seqs(messages: list[Any]) -> list[int]:
    return [int(json.loads(m.payload)["seq"]) for m in messages]


@pytest.mark.parametrize(
    ("tick", "qos"),
    [
        (make_tick(), 0),
        (make_tick("valr", "ETH-ZAR", last="0.5", ts="1969-12-31T23:59:59.250Z"), 1),
        (make_tick("quidax", "BTC-NGN", ts="2026-11-30T11:00:00.999Z"), 2),
    ],
)
def test_tickwire_round_trip_rebuilds_the_wire_form(tick: Tick, qos: int) -> None:
    parts = tickwire.decode(tickwire.encode(tick, qos))
    assert parts.qos == qos
    assert parts.head == tick.wire_head()
    assert tickwire.wire_tail(42) == tick.wire_tail(42)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"T1",
        b'T2 0 1 2 {"exchange":"',
        b'T1 3 1 2 {"exchange":"',
        b'T1 0 x 2 {"exchange":"',
        b'T1 0 1 1000 {"exchange":"',
        b"T1 0 1 2 [1]",
        b'T1 0 1 2 {"exchange":"' + b"x" * 5000,
    ],
)
def test_tickwire_refuses_what_is_not_a_tick(payload: bytes) -> None:
    with pytest.raises(tickwire.TickWireError):
        tickwire.decode(payload)


def test_a_tick_fed_on_one_node_reaches_every_node_once_in_seq_order(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    a, b = nodes("a"), nodes("b")
    exchange, pair = "luno", fresh_pair()
    topic = f"market/{exchange}/{pair}"
    on_b = clients(b.tcp_port)
    on_b.connect()
    on_a = clients(a.ws_port, transport="websockets")
    on_a.connect()
    for sub in (on_a, on_b):
        assert sub.subscribe(topic) == [0]
    feed = clients(a.tcp_port, role="feed")
    feed.connect()
    for i in range(30):
        feed.publish(topic, make_tick(exchange, pair, last=str(i + 1)).encode())
    for sub in (on_a, on_b):
        got = sub.expect(30)
        assert seqs(got) == list(range(1, 31))
        assert [json.loads(m.payload)["last"] for m in got] == [str(i + 1) for i in range(30)]
        assert sub.messages.empty()  # and nothing twice
    # In-process publishing (feeds inside the node) takes the same path and returns the seq.
    sent = a.run(a.broker.publish_tick(make_tick(exchange, pair, last="99")))
    assert sent.seq == 31
    assert seqs(on_b.expect(1)) == [31]


def test_two_feeds_on_two_nodes_give_one_increasing_seq_everywhere(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    exchange, pair = "valr", fresh_pair()
    topic = f"market/{exchange}/{pair}"
    subs = []
    for node in (a, b, c):
        sub = clients(node.tcp_port)
        sub.connect()
        assert sub.subscribe(topic) == [0]
        subs.append(sub)
    feeds = []
    for node in (a, b):
        feed = clients(node.tcp_port, role="feed")
        feed.connect()
        feeds.append(feed)
    for i in range(40):
        for n, feed in enumerate(feeds):
            feed.publish(topic, make_tick(exchange, pair, last=f"{n + 1}{i}").encode())
    for sub in subs:
        seen: list[int] = []
        # Two nodes feeding one topic within a round trip may conflate (latest value wins), so
        # count is not fixed; order and the last one are.
        while not seen or seen[-1] < 80:
            seen += seqs(sub.expect(1))
        assert seen == sorted(set(seen)), "seq went backwards or repeated"
        assert seen[-1] == 80


def test_a_freshly_started_node_serves_the_shared_snapshot_at_once(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    a = nodes("a")
    exchange, pair = "quidax", fresh_pair()
    topic = f"market/{exchange}/{pair}"
    for i in range(5):
        a.run(a.broker.publish_tick(make_tick(exchange, pair, last=str(i + 1))))
    c = nodes("c")
    sub = clients(c.ws_port, transport="websockets")
    sub.connect()
    assert sub.subscribe(topic) == [0]
    (retained,) = sub.expect(1)
    assert retained.retain
    assert json.loads(retained.payload)["seq"] == 5
    assert json.loads(retained.payload)["last"] == "5"
    # The instant survives the trip through Redis (the text is in the subscriber's zone).
    assert datetime.fromisoformat(json.loads(retained.payload)["ts"]) == make_tick(exchange, pair).ts


def test_a_node_that_cannot_reach_redis_does_not_start() -> None:
    config = bridge_config(cluster={"enabled": True, "node_id": "x", "redis_url": "redis://127.0.0.1:1"})
    thread = BrokerThread(config)
    try:
        with pytest.raises(ClusterUnavailable, match="join the cluster"):
            thread.__enter__()
    finally:
        thread.stop()


def test_connection_limits_count_across_nodes(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    limits = {"max_connections_per_user": 2, "max_connections": 3}
    a, b = nodes("a", limits=limits), nodes("b", limits=limits)
    alice = unique("alice")
    clients(a.tcp_port, username=alice, password=token_for(alice, "subscriber")).connect()
    clients(
        b.ws_port, transport="websockets", username=alice, password=token_for(alice, "subscriber")
    ).connect()
    third = clients(a.tcp_port, username=alice, password=token_for(alice, "subscriber"))
    third.connect(expect=3)  # user_limit: 2 held, one on each node
    clients(b.tcp_port).connect()
    full = clients(a.tcp_port)
    full.connect(expect=3)  # global_limit: 3 in the cluster
    assert a.call(lambda: a.broker.stats.refusals["user_limit"]) == 1
    assert a.call(lambda: a.broker.stats.refusals["global_limit"]) == 1


def test_a_client_id_stays_its_users_cluster_wide(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    a, b = nodes("a"), nodes("b")
    cid = unique("cid")
    first = clients(a.tcp_port, client_id=cid)
    first.connect()
    first.close()
    other = clients(b.tcp_port, client_id=cid)  # another user
    other.connect(expect=5)
    assert b.call(lambda: b.broker.stats.refusals["client_id_owned"]) == 1


def test_the_same_client_id_on_another_node_takes_the_connection_over(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    a, b = nodes("a"), nodes("b")
    user, cid = unique("bob"), unique("cid")
    on_a = clients(a.tcp_port, client_id=cid, username=user, password=token_for(user, "subscriber"))
    on_a.connect()
    on_b = clients(
        b.ws_port,
        transport="websockets",
        client_id=cid,
        username=user,
        password=token_for(user, "subscriber"),
    )
    on_b.connect()
    assert on_a.disconnected.wait(DEADLINE_S), "node a did not close the taken-over connection"
    on_a.close()  # no automatic reconnect taking it back
    wait_until(lambda: a.call(lambda: len(a.broker.connection_list())) == 0, what="a released it")
    assert [c["client_id"] for c in b.call(b.broker.connection_list)] == [cid]
    assert not on_b.disconnected.is_set()
    # The lease moved with the connection: one counted for the user, seen from either node.
    wait_until(lambda: leases(a, user) == leases(b, user) == 1, what="one lease")


def test_a_persistent_session_moves_to_another_node_with_its_backlog(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_url: str
) -> None:
    """The store is the shared Redis: B resumes A's session (subscriptions, offline queue)."""
    a, b = nodes("a", store=redis_url), nodes("b", store=redis_url)
    user, cid = unique("carol"), unique("phone")
    phone = persistent_client(clients, a.tcp_port, user, cid)
    phone.connect()
    assert phone.subscribe(f"user/{user}/#", qos=1) == [1]
    phone.close()
    wait_until(
        lambda: cid not in [c["client_id"] for c in a.call(a.broker.connection_list)], what="a saw it go"
    )
    assert a.run(a.broker.send_to_user(user, "alerts", b"while away")).stored is not None
    again = persistent_client(clients, b.ws_port, user, cid, transport="websockets")
    again.connect()
    assert again.session_present
    (backlog,) = again.expect(1)
    assert (backlog.topic, backlog.payload) == (f"user/{user}/alerts", b"while away")
    # Live on B now: B's own sends reach it at once, through the resumed subscription.
    assert b.run(b.broker.send_to_user(user, "alerts", b"live")).delivered == 1
    assert again.expect(1)[0].payload == b"live"


def test_a_takeover_across_nodes_keeps_the_session(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_url: str
) -> None:
    a, b = nodes("a", store=redis_url), nodes("b", store=redis_url)
    user, cid = unique("dave"), unique("phone")

    def phone(node: BrokerThread) -> Client:
        return persistent_client(clients, node.tcp_port, user, cid)

    first = phone(a)
    first.connect()
    assert first.subscribe(f"user/{user}/#", qos=1) == [1]
    second = phone(b)
    second.connect()
    assert second.session_present
    assert first.disconnected.wait(DEADLINE_S)
    first.close()
    # A forgot it (the session is B's now); B delivers to it.
    wait_until(lambda: a.call(lambda: cid in a.broker._sessions) is False, what="a forgot the session")
    assert b.run(b.broker.send_to_user(user, "alerts", b"after takeover")).delivered == 1
    assert second.expect(1)[0].payload == b"after takeover"


def test_anonymous_connections_count_against_their_own_cap_cluster_wide(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_cluster: RedisClusterProcesses
) -> None:
    public = {"enabled": True, "max_connections": 2}
    limits = {"max_connections": 1}
    a, b = nodes("a", limits=limits, anonymous=public), nodes("b", limits=limits, anonymous=public)
    clients(a.tcp_port, anonymous=True).connect()
    clients(b.ws_port, transport="websockets", anonymous=True).connect()
    clients(a.ws_port, transport="websockets", anonymous=True).connect(expect=3)  # one on each node
    assert a.call(lambda: a.broker.stats.refusals["anonymous_limit"]) == 1
    # The JWT users' limit (1 in the cluster) is apart from the two anonymous connections.
    user = unique("alice")
    clients(b.tcp_port, username=user, password=token_for(user, "subscriber")).connect()
    # Anonymous client ids are not recorded in Redis (a key per CONNECT, kept for a week).
    recorded: list[str] = []
    for master in redis_cluster.masters():
        found = master.call("KEYS", "mb:cid:*")
        assert isinstance(found, list)
        recorded += [str(key) for key in found]
    assert recorded  # alice's
    assert not [key for key in recorded if "anonymous" in key]


# -- user messages anywhere (issue 15, item 4) ------------------------------------------------


def _envelope(payload: str, priority: str = "NORMAL") -> bytes:
    return json.dumps({"mb_envelope": 1, "payload": payload, "priority": priority, "ttl_s": 600}).encode()


def _queued(node: BrokerThread, user: str) -> int:
    store = node.broker.store
    assert store is not None
    count, _ = node.run(store.queue_size(user))
    return count


def test_a_message_sent_on_one_node_reaches_a_persistent_session_live_on_another(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_url: str
) -> None:
    a, b = nodes("a", store=redis_url), nodes("b", store=redis_url)
    user, cid = unique("erin"), unique("phone")
    phone = persistent_client(clients, b.ws_port, user, cid, transport="websockets")
    phone.connect()
    assert phone.subscribe(f"user/{user}/#", qos=1) == [1]
    wait_until(lambda: leases(a, user) == 1, what="a sees the user's lease")
    # Sent on A, where the user has no connection and never had a session.
    result = a.run(a.broker.send_to_user(user, "alerts", b"from a"))
    assert result.stored is not None  # the shared mailbox holds it until the phone's PUBACK
    assert result.delivered == 1  # one node reached
    (message,) = phone.expect(1)
    assert (message.topic, message.payload, message.qos) == (f"user/{user}/alerts", b"from a", 1)
    # Gone from the shared mailbox once acknowledged.
    wait_until(lambda: _queued(a, user) == 0, what="the acknowledged message left the store")
    assert a.call(lambda: a.broker.cluster and a.broker.cluster.mail_forwarded) == 1


def test_a_service_publish_on_one_node_reaches_clean_and_persistent_sessions_on_others(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_url: str
) -> None:
    a, b, c = nodes("a", store=redis_url), nodes("b", store=redis_url), nodes("c", store=redis_url)
    user = unique("frank")
    persistent = persistent_client(clients, b.tcp_port, user, unique("phone"))
    persistent.connect()
    assert persistent.subscribe(f"user/{user}/fills", qos=1) == [1]
    dashboard = clients(
        c.ws_port, transport="websockets", username=user, password=token_for(user, "subscriber")
    )
    dashboard.connect()
    assert dashboard.subscribe(f"user/{user}/#", qos=1) == [1]
    wait_until(lambda: leases(a, user) == 2, what="a sees both leases")
    service_user = unique("svc")
    service = clients(a.tcp_port, username=service_user, password=token_for(service_user, "service"))
    service.connect()
    for index in range(5):
        service.publish(f"user/{user}/fills", _envelope(f"fill{index}"), qos=1)
    service.publish(f"user/{user}/news", _envelope("news"), qos=1)
    # In order, once each: the persistent one from the shared mailbox, the clean one directly.
    assert [m.payload for m in persistent.expect(5)] == [f"fill{i}".encode() for i in range(5)]
    got = [m.payload for m in dashboard.expect(6)]
    assert sorted(got) == sorted([f"fill{i}".encode() for i in range(5)] + [b"news"])
    assert [p for p in got if p != b"news"] == [f"fill{i}".encode() for i in range(5)]
    # The fills left the store on the persistent session's PUBACKs; news was never stored
    # (no persistent session of the user takes it).
    wait_until(lambda: _queued(a, user) == 0, what="the store emptied")


def test_a_message_for_clean_sessions_on_another_node_only_is_delivered_not_stored(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_url: str
) -> None:
    a, b = nodes("a", store=redis_url), nodes("b", store=redis_url)
    user = unique("gina")
    tab = clients(b.tcp_port, username=user, password=token_for(user, "subscriber"))
    tab.connect()
    assert tab.subscribe(f"user/{user}/#", qos=1) == [1]
    wait_until(lambda: leases(a, user) == 1, what="a sees the user's lease")
    result = a.run(a.broker.send_to_user(user, "ping", b"now"))
    assert (result.stored, result.delivered) == (None, 1)
    assert tab.expect(1)[0].payload == b"now"
    # Nobody anywhere: dropped and counted, not stored.
    tab.close()
    wait_until(lambda: leases(a, user) == 0, what="a sees the lease go")
    result = a.run(a.broker.send_to_user(user, "ping", b"lost"))
    assert (result.stored, result.delivered) == (None, 0)
    assert a.call(lambda: a.broker.stats.publishes_dropped["no_subscriber"]) >= 1


def test_evictions_notify_the_service_on_its_own_node(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client], redis_url: str
) -> None:
    """The queue is full: the service publishing on A hears of the eviction on A, though the
    user's session was made on B."""
    a = nodes("a", store=redis_url, queue_max_messages=3)
    b = nodes("b", store=redis_url, queue_max_messages=3)
    user, cid = unique("hank"), unique("phone")
    phone = persistent_client(clients, b.tcp_port, user, cid)
    phone.connect()
    assert phone.subscribe(f"user/{user}/#", qos=1) == [1]
    phone.close()
    service_user = unique("svc")
    service = clients(a.tcp_port, username=service_user, password=token_for(service_user, "service"))
    service.connect()
    assert service.subscribe(f"service/{service_user}/#", qos=1) == [1]
    for index in range(3):
        service.publish(f"user/{user}/a", _envelope(f"low{index}", "LOW"), qos=1)
    service.publish(f"user/{user}/a", _envelope("urgent", "URGENT"), qos=1)
    (notice,) = service.expect(1)
    body = json.loads(notice.payload)
    assert notice.topic == f"service/{service_user}/evictions"
    assert (body["user"], body["reason"], len(body["evicted"])) == (user, "queue_full", 1)


def test_the_connection_list_is_cluster_wide_on_every_node(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    a, b = nodes("a"), nodes("b")
    user = unique("ivan")
    on_a = clients(a.tcp_port, client_id=unique("ca"), username=user, password=token_for(user, "subscriber"))
    on_b = clients(
        b.ws_port,
        transport="websockets",
        client_id=unique("cb"),
        username=user,
        password=token_for(user, "subscriber", tz="Africa/Nairobi"),
    )
    on_a.connect()
    on_b.connect()

    def listed(node: BrokerThread) -> set[tuple[str, str, str | None]]:
        listing = node.run(node.broker.cluster_connections())
        assert listing is not None
        return {(name, c["client_id"], c["tz"]) for name, entries in listing.items() for c in entries}

    both = {("a", on_a.client_id, "UTC"), ("b", on_b.client_id, "Africa/Nairobi")}
    wait_until(lambda: listed(a) == both, what="both connections listed on a")
    wait_until(lambda: listed(b) == both, what="both connections listed on b")
    on_b.close()
    wait_until(lambda: listed(a) == {("a", on_a.client_id, "UTC")}, what="b's connection left the list")


def test_a_takeover_from_another_node_at_the_user_limit_moves_the_slot(
    nodes: Callable[..., BrokerThread], clients: Callable[..., Client]
) -> None:
    limits = {"max_connections_per_user": 2}
    a, b = nodes("a", limits=limits), nodes("b", limits=limits)
    user, cid = unique("judy"), unique("phone")
    token = token_for(user, "subscriber")
    first = clients(a.tcp_port, client_id=cid, username=user, password=token)
    first.connect()
    clients(a.ws_port, transport="websockets", username=user, password=token).connect()
    # At the limit: a new client id is refused, the same client id on B takes A's slot over.
    clients(b.tcp_port, username=user, password=token).connect(expect=3)
    moved = clients(b.tcp_port, client_id=cid, username=user, password=token)
    moved.connect()
    assert first.disconnected.wait(DEADLINE_S)
    wait_until(lambda: leases(b, user) == 2, what="still two leases counted")
    clients(a.tcp_port, username=user, password=token).connect(expect=3)
