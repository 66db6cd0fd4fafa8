"""bridge.cluster.demo: the topology ``make cluster-demo`` runs (three nodes, the simulator on
node 1) on the session's real Redis Cluster; a subscriber on node 3 sees node 1's ticks."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from pathlib import Path

import pytest

from bridge.cluster.demo import NODES, node_configs, run_nodes
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from bridge.edge.broker import MarketBroker
from bridge.http import HttpServer
from tests.conftest import DEADLINE_S, Client, bridge_config, settle_tasks, token_for

pytestmark = pytest.mark.timeout(90)


def test_a_subscriber_on_node_3_sees_the_ticks_fed_on_node_1(
    redis_cluster: RedisClusterProcesses, tmp_path: Path
) -> None:
    redis_cluster.wait_ok()
    base = bridge_config(feeds=[{"kind": "simulator", "interval_s": 0.05, "markets": ["luno/BTC-ZAR"]}])
    configs = node_configs(base, redis_cluster.startup_nodes, tmp_path)
    assert [c.cluster.node_id for c in configs] == ["node1", "node2", "node3"]
    assert [len(c.feeds) for c in configs] == [1, 0, 0]
    brokers: dict[int, MarketBroker] = {}
    all_ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def ready(index: int, broker: MarketBroker, http: HttpServer | None) -> None:
        brokers[index] = broker
        if len(brokers) == NODES:
            all_ready.set()

    failures: list[BaseException | str] = []

    async def main() -> None:
        try:
            await run_nodes(configs, stop=stop, on_ready=ready)
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)
        # Every node stopped: nothing of theirs may still run when the loop closes.
        failures.extend(f"left running: {task}" for task in await settle_tasks())

    thresholds = gc.get_threshold()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="demo-nodes")
    thread.start()
    try:
        assert all_ready.wait(30), "the three nodes did not start"
        sub = Client(brokers[2].bound_port("tcp"), username="demo", password=token_for("demo", "subscriber"))
        try:
            sub.connect()
            assert sub.subscribe("market/luno/BTC-ZAR") == [0]
            ticks = [json.loads(m.payload) for m in sub.expect(5, timeout=DEADLINE_S)]
        finally:
            sub.close()
        assert all(t["exchange"] == "luno" and t["pair"] == "BTC-ZAR" for t in ticks)
        seqs = [t["seq"] for t in ticks]
        assert seqs == sorted(set(seqs))  # the first may be the retained snapshot, then live ones
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
        # serve() tunes the collector for a long-lived process: not for the rest of the tests.
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert not thread.is_alive()
    assert failures == []
