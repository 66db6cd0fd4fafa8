"""Fixtures for the cluster tests: one real local Redis Cluster per session (3 masters + 3
replicas, bridge/cluster/local.py), emptied before each test; backbones that close themselves."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode

from bridge.cluster.backbone import Backbone
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from tests.conftest import settle_tasks


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()
    assert not any(node.alive for node in cluster.nodes), "a cluster node survived stop()"


@pytest.fixture
async def cluster_nodes(redis_cluster: RedisClusterProcesses) -> list[str]:
    """The cluster's seed addresses, with every master emptied."""
    redis_cluster.wait_ok()
    live = [f"127.0.0.1:{node.port}" for node in redis_cluster.nodes if node.alive]
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", int(a.rpartition(":")[2])) for a in live])
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    finally:
        await client.aclose()
    return live


@pytest.fixture
async def make_backbone(cluster_nodes: list[str]) -> AsyncIterator[Callable[[], Backbone]]:
    """Connected-on-use backbones to the session's cluster, closed after the test."""
    made: list[Backbone] = []

    def make() -> Backbone:
        backbone = Backbone(cluster_nodes=cluster_nodes)
        made.append(backbone)
        return backbone

    yield make
    for backbone in made:
        await backbone.aclose()


async def eventually(condition: Callable[[], bool], deadline_s: float = 20.0) -> None:
    """Wait (polling, with a deadline) for a state no event announces, e.g. a counter."""
    async with asyncio.timeout(deadline_s):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
async def no_task_left_behind() -> AsyncIterator[None]:
    """A cluster part that does not stop its tasks fails the test that started it."""
    yield
    stuck = await settle_tasks()
    assert not stuck, "tasks left running after the test:\n" + "\n".join(stuck)
