"""bridge.cluster.backbone: connecting to a real Redis Cluster or one Redis, the slot map
the subscribers follow, and Redis errors leaving as ClusterUnavailable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.cluster.local import RedisCluster as RedisClusterProcesses
from bridge.config import ClusterConfig
from bridge.errors import ClusterUnavailable
from tests.redis_server import RedisProcess

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("url", "nodes"),
    [(None, []), ("redis://127.0.0.1:1/0", ["127.0.0.1:2"])],
)
def test_one_kind_of_redis(url: str | None, nodes: list[str]) -> None:
    with pytest.raises(ValueError, match="redis_url or cluster_nodes"):
        Backbone(redis_url=url, cluster_nodes=nodes)


def test_from_config() -> None:
    assert Backbone.from_config(ClusterConfig(redis_cluster_nodes=["127.0.0.1:7000"])).is_cluster
    assert not Backbone.from_config(ClusterConfig(redis_url="redis://127.0.0.1:6379/0")).is_cluster


def test_not_connected_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="connect"):
        _ = Backbone(redis_url="redis://127.0.0.1:1/0").redis


@pytest.mark.parametrize("error", [RedisConnectionError("gone"), OSError("refused")])
def test_redis_errors_leave_as_cluster_unavailable(error: Exception) -> None:
    with pytest.raises(ClusterUnavailable) as caught, unavailable_as("probe"):
        raise error
    assert caught.value.operation == "probe"
    assert caught.value.__cause__ is error


async def test_owners_follow_the_cluster_slot_map(
    make_backbone: Callable[[], Backbone], redis_cluster: RedisClusterProcesses
) -> None:
    backbone = make_backbone()
    await backbone.connect()
    channels = [keys.partition_channel(p) for p in range(16)]
    layout = backbone.owners(channels)
    assert sorted(c for groups in layout.values() for group in groups for c in group) == sorted(channels)
    for shard, groups in layout.items():
        for group in groups:
            assert len({key_slot(c.encode()) for c in group}) == 1  # one SSUBSCRIBE per slot
            for channel in group:
                assert f"127.0.0.1:{redis_cluster.master_of(channel).port}" == shard.name
    await backbone.probe()


async def test_a_single_server(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    backbone = Backbone(redis_url=server.url)
    try:
        await backbone.connect()
        await backbone.probe()
        (shard,) = backbone.owners(["{a}:x", "{b}:y", "{a}:z"])
        assert sorted(map(sorted, backbone.owners(["{a}:x", "{b}:y", "{a}:z"])[shard])) == [
            ["{a}:x", "{a}:z"],
            ["{b}:y"],
        ]
        server.kill()
        with pytest.raises(RedisConnectionError):
            await backbone.probe()
    finally:
        await backbone.aclose()
        server.stop()
