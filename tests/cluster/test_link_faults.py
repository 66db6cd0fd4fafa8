"""Faults of wired cluster nodes, with real processes: a node killed with SIGKILL (a real
``market-bridge run``), and a Redis Cluster master failing over while ticks flow."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

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
