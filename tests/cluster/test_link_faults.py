"""Faults of wired cluster nodes, with real processes: a node killed with SIGKILL (a real
``market-bridge run``), and a Redis Cluster master failing over while ticks flow."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml

from bridge import redis_keys as keys
from bridge.cluster.bus import partition_of
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from tests.conftest import (
    DEADLINE_S,
    TEST_SECRET,
    BrokerThread,
    Client,
    Proc,
    bridge_config,
    make_tick,
    token_for,
    unique,
    wait_until,
)
from tests.redis_server import RedisProcess

pytestmark = pytest.mark.timeout(120)
LEASE_TTL_S = 3.0


@pytest.fixture
def seeds(redis_cluster: RedisClusterProcesses) -> list[str]:
    redis_cluster.wait_ok()
    for master in redis_cluster.masters():
        master.call("FLUSHALL")
    return [f"127.0.0.1:{node.port}" for node in redis_cluster.nodes if node.alive]


def cluster_section(node_id: str, seeds: list[str]) -> dict[str, Any]:
    return {"enabled": True, "node_id": node_id, "redis_cluster_nodes": seeds, "lease_ttl_s": LEASE_TTL_S}


def test_a_killed_nodes_leases_free_and_its_clients_resume_elsewhere(
    seeds: list[str],
    redis_url: str,
    procs: Callable[..., Proc],
    clients: Callable[..., Client],
    tmp_path: Path,
) -> None:
    limits = {"max_connections_per_user": 1}
    config = {
        "listeners": {"ws": {"port": 0}, "tcp": {"port": 0}},
        "http": {"port": 0},
        "feeds": [],
        "store": {"redis_url": redis_url},
        "auth": {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]},
        "limits": limits,
        "cluster": cluster_section("victim", seeds),
    }
    path = tmp_path / "victim.yaml"
    path.write_text(yaml.safe_dump(config))
    victim = procs("run", "--config", str(path))
    port = int(victim.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1))
    with BrokerThread(
        bridge_config(
            store={"redis_url": redis_url}, limits=limits, cluster=cluster_section("survivor", seeds)
        )
    ) as survivor:
        topic = "market/luno/BTC-ZAR"
        survivor.run(survivor.broker.publish_tick(make_tick(last="7")))
        user, cid = unique("erin"), unique("phone")

        def phone(on: int) -> Client:
            return clients(
                on, client_id=cid, clean_session=False, username=user, password=token_for(user, "subscriber")
            )

        first = phone(port)
        first.connect()
        assert first.subscribe(topic) == [0]
        first.expect(1)  # the shared snapshot, from the victim
        wait_until(lambda: survivor.call(lambda: survivor.broker.limits.count(user)) == 1, what="lease seen")
        victim.popen.kill()  # SIGKILL: nothing released, nothing said
        victim.popen.wait(DEADLINE_S)
        first.close()
        killed = time.monotonic()
        # Its lease stops counting lease_ttl_s after the last heartbeat (limit 1: until then the
        # user could not connect anywhere).
        wait_until(
            lambda: survivor.call(lambda: survivor.broker.limits.count(user)) == 0,
            timeout=3 * LEASE_TTL_S,
            what="the dead node's lease expired",
        )
        freed_after = time.monotonic() - killed
        again = phone(survivor.tcp_port)
        again.connect()
        assert again.session_present  # the persistent session, from the shared store
        (snapshot,) = again.expect(1)  # and the snapshot of what it follows
        assert (snapshot.topic, json.loads(snapshot.payload)["last"]) == (topic, "7")
        print(f"\nkill -9: lease freed {freed_after:.2f} s after the kill (lease_ttl_s {LEASE_TTL_S:g})")


@pytest.fixture
def two_nodes(seeds: list[str]) -> Iterator[tuple[BrokerThread, BrokerThread]]:
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(BrokerThread(bridge_config(cluster=cluster_section(n, seeds)))) for n in "ab"
        )
        yield a, b


def test_ticks_resume_on_every_node_after_a_master_fails_over(
    redis_cluster: RedisClusterProcesses,
    two_nodes: tuple[BrokerThread, BrokerThread],
    clients: Callable[..., Client],
) -> None:
    a, b = two_nodes
    topic = "market/valr/ETH-ZAR"
    subs = []
    for node in (a, b):
        sub = clients(node.tcp_port)
        sub.connect()
        assert sub.subscribe(topic) == [0]
        subs.append(sub)
    feeding = threading.Event()
    feeding.set()

    def feed() -> None:
        n = 0
        while feeding.is_set():
            n += 1
            a.run(a.broker.publish_tick(make_tick("valr", "ETH-ZAR", last=str(n))))
            time.sleep(0.02)  # the feed's pace, not a wait on the system under test

    feeder = threading.Thread(target=feed, name="feed", daemon=True)
    feeder.start()
    try:
        for sub in subs:
            sub.expect(3)
        master = redis_cluster.master_of(keys.partition_channel(partition_of(topic, 16)))
        redis_cluster.failover(master)
        switched = time.monotonic()
        for sub in subs:
            while not sub.messages.empty():  # what was delivered up to the switch
                sub.messages.get_nowait()
        resumed = []
        for sub in subs:
            got = sub.expect(3, timeout=10)  # within 10 s of the switch, on every node
            assert [json.loads(m.payload)["seq"] for m in got] == sorted(
                {json.loads(m.payload)["seq"] for m in got}
            )
            resumed.append(time.monotonic() - switched)
        print(f"\nCLUSTER FAILOVER: ticks resumed {max(resumed):.2f} s after the switch on every node")
    finally:
        feeding.clear()
        feeder.join(DEADLINE_S)


def _live_members(node: BrokerThread, key: str) -> list[str]:
    """Members of a lease or registry sorted set not yet expired, read in Redis as nodes do."""
    cluster = node.broker.cluster
    assert cluster is not None

    async def read() -> list[str]:
        members = await cluster.backbone.redis.zrangebyscore(key, int(time.time() * 1000) + 1, "+inf")
        return [member.decode() for member in cast("list[bytes]", members)]

    return node.run(read())


def _live_nodes(node: BrokerThread) -> set[str]:
    cluster = node.broker.cluster
    assert cluster is not None
    return set(node.run(cluster.registry.live_nodes()))


def test_three_nodes_a_killed_nodes_clients_move_with_snapshot_and_backlog(
    seeds: list[str],
    redis_url: str,
    procs: Callable[..., Proc],
    clients: Callable[..., Client],
    tmp_path: Path,
) -> None:
    """kill -9 of node A (a real ``market-bridge run``) with clients on it: they come back on
    B and C with their sessions, the snapshot and every user message A acknowledged but they
    had not; A's leases stop counting within lease_ttl_s (a user at their limit gets in
    again) and A leaves the node registry."""
    ttl = 6.0  # heartbeats every 2 s: a dead lease still counts for at least 4 s after the kill
    limits = {"max_connections_per_user": 2}
    config = {
        "listeners": {"ws": {"port": 0}, "tcp": {"port": 0}},
        "http": {"port": 0},
        "feeds": [],
        "store": {"redis_url": redis_url},
        "auth": {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]},
        "limits": limits,
        "cluster": cluster_section("a", seeds) | {"lease_ttl_s": ttl},
    }
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(config))
    node_a = procs("run", "--config", str(path))
    port_a = int(node_a.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1))
    with ExitStack() as stack:
        b, c = (
            stack.enter_context(
                BrokerThread(
                    bridge_config(
                        store={"redis_url": redis_url},
                        limits=limits,
                        cluster=cluster_section(name, seeds) | {"lease_ttl_s": ttl},
                    )
                )
            )
            for name in "bc"
        )
        topic = "market/quidax/BTC-NGN"
        b.run(b.broker.publish_tick(make_tick("quidax", "BTC-NGN", last="42")))
        erin, finn = unique("erin"), unique("finn")
        phones = {erin: unique("phone"), finn: unique("phone")}

        def phone(user: str, port: int) -> Client:
            client = clients(
                port,
                client_id=phones[user],
                clean_session=False,
                username=user,
                password=token_for(user, "subscriber"),
            )
            client.paho.manual_ack_set(True)  # what arrives on A is never acknowledged
            return client

        for user in (erin, finn):
            on_a = phone(user, port_a)
            on_a.connect()
            assert on_a.subscribe([(topic, 0), (f"user/{user}/#", 1)]) == [0, 1]
            (snapshot,) = on_a.expect(1)
            assert json.loads(snapshot.payload)["last"] == "42"
        # erin's second device, which will not come back: she is at her limit of 2.
        tablet = clients(port_a, username=erin, password=token_for(erin, "subscriber"))
        tablet.connect()
        wait_until(lambda: {"b", "c", "a"} <= _live_nodes(b), what="a seen")
        service = clients(port_a, role="service")
        service.connect()
        for user in (erin, finn):
            for n in range(3):  # PUBACK: node A has stored it
                service.publish(f"user/{user}/alerts", f"{user}-{n}".encode(), qos=1)
        assert len([m for m in _live_members(b, keys.lease_all()) if m.startswith("a:")]) == 4

        node_a.popen.kill()
        node_a.popen.wait(DEADLINE_S)
        killed = time.monotonic()

        # A third device of erin's: refused while A's dead leases still count (2 of 2).
        laptop = clients(c.tcp_port, username=erin, password=token_for(erin, "subscriber"))
        laptop.connect(expect=3)
        laptop.close()

        def resume(user: str, node: BrokerThread) -> None:
            again = phone(user, node.tcp_port)
            again.paho.manual_ack_set(False)
            again.connect()
            assert again.session_present  # the persistent session, from the shared store
            got = again.expect(4)  # the snapshot and the three messages A had acknowledged
            assert sorted((m.topic, m.payload) for m in got if m.topic.startswith("user/")) == [
                (f"user/{user}/alerts", f"{user}-{n}".encode()) for n in range(3)
            ]
            (snapshot,) = [m for m in got if m.topic == topic]
            assert json.loads(snapshot.payload)["last"] == "42"

        resume(finn, c)  # below his limit: back at once
        wait_until(
            lambda: not any(m.startswith("a:") for m in _live_members(b, keys.lease_all())),
            timeout=ttl + 2,  # the last heartbeat was at most ttl before; 2 s for the polling
            what="A's leases expired",
        )
        freed_after = time.monotonic() - killed
        wait_until(lambda: "a" not in _live_nodes(b), timeout=ttl + 2, what="A left the registry")
        left_after = time.monotonic() - killed
        # erin was at her limit: her phone gets in once A's leases stopped counting (a
        # cross-node takeover takes a new lease; the dead node never releases the old one).
        resume(erin, b)
        laptop = clients(c.tcp_port, username=erin, password=token_for(erin, "subscriber"))
        laptop.connect()  # the tablet's lease is gone: phone and laptop, 2 of 2
        print(
            f"\nkill -9 of one of three nodes: leases freed {freed_after:.2f} s, registry {left_after:.2f} s"
        )


def test_a_node_cut_off_from_redis_is_unready_refuses_newcomers_and_keeps_its_subscribers(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    """Redis stops answering (SIGSTOP: the node's connections stay open, nothing comes back).
    One Redis here, not the session's cluster: stopping all six of its nodes would make them
    fail each other over once they run again, under the tests that follow. The node says it
    is not ready and admits nobody (fail closed), but keeps its subscribers: connected, their
    SUBSCRIBE answered with the node's own snapshots, and ticks again once Redis answers,
    without reconnecting."""
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        config = bridge_config(
            cluster={"enabled": True, "node_id": "cut", "redis_url": redis.url, "lease_ttl_s": 3}
        )
        with (
            BrokerThread(config, http=True) as node,
            httpx.Client(base_url=node.http_url, timeout=10) as http,
        ):
            followed, other = "market/luno/ETH-ZAR", "market/valr/SOL-ZAR"
            node.run(node.broker.publish_tick(make_tick("valr", "SOL-ZAR", last="9")))
            sub = clients(node.tcp_port, role="subscriber")
            sub.connect()
            assert sub.subscribe(followed) == [0]
            node.run(node.broker.publish_tick(make_tick("luno", "ETH-ZAR", last="1")))
            assert json.loads(sub.expect(1)[0].payload)["last"] == "1"
            with redis.paused():
                wait_until(lambda: http.get("/readyz").status_code == 503, what="unready", timeout=20)
                newcomer = clients(node.tcp_port, role="subscriber")
                newcomer.connect(expect=3)
                newcomer.close()
                assert sub.subscribe(other) == [0]  # served from the node's own snapshots
                (snapshot,) = sub.expect(1)
                assert (snapshot.topic, json.loads(snapshot.payload)["last"]) == (other, "9")
                assert not sub.disconnected.is_set()
            wait_until(lambda: http.get("/readyz").status_code == 200, what="ready again", timeout=20)
            node.run(node.broker.publish_tick(make_tick("luno", "ETH-ZAR", last="2")))
            (tick,) = sub.expect(1)
            assert (tick.topic, json.loads(tick.payload)["last"]) == (followed, "2")
            assert not sub.disconnected.is_set()
    finally:
        redis.stop()
