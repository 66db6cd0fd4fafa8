"""The node's connection to the shared Redis: a Redis Cluster or one Redis server.

Interface::

    backbone = Backbone.from_config(config.cluster)   # no I/O yet
    await backbone.connect()                          # discovers the cluster's slots
    backbone.redis                                    # commands and scripts (routed by key slot)
    await backbone.owners(channels)                   # {shard: (client factory, channels)}
    await backbone.refresh()                          # re-read the slot map (after a failover)
    await backbone.probe()                            # refresh, or PING a single server
    await backbone.aclose()

Commands go through redis-py's client (the cluster client follows MOVED/ASK and fails over
by itself). Sharded subscriptions do not: :class:`~bridge.cluster.bus.ShardedSubscriber` opens
one plain connection per shard, from :meth:`owners`, so it knows exactly which socket carries
which partition and can resubscribe it alone when a slot moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import RedisError, SlotNotCoveredError

from bridge.config import ClusterConfig
from bridge.errors import ClusterUnavailable

__all__ = ["Backbone", "Shard", "unavailable_as"]

# Every call gets a deadline: a hung shard must surface as an error, never a stall.
SOCKET_TIMEOUT_S = 2.0


@contextlib.contextmanager
def unavailable_as(operation: str) -> Iterator[None]:
    """Redis and socket errors leave the cluster package as :class:`ClusterUnavailable`."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise ClusterUnavailable(operation, f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Shard:
    """The Redis server owning some channels; ``open`` makes a fresh client to it."""

    name: str
    open: Callable[[], Redis] = field(compare=False)


class Backbone:
    def __init__(self, *, redis_url: str | None = None, cluster_nodes: Iterable[str] = ()) -> None:
        self._url = redis_url
        self._seeds = [
            ClusterNode(host, int(port)) for host, _, port in (n.rpartition(":") for n in cluster_nodes)
        ]
        if (self._url is None) == (not self._seeds):
            raise ValueError("give redis_url or cluster_nodes")
        self._client: Redis | RedisCluster | None = None

    @classmethod
    def from_config(cls, config: ClusterConfig) -> Backbone:
        return cls(redis_url=config.redis_url, cluster_nodes=config.redis_cluster_nodes)

    @property
    def is_cluster(self) -> bool:
        return bool(self._seeds)

    @property
    def redis(self) -> Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("Backbone.connect() first")
        return self._client

    async def connect(self) -> None:
        if self._client is not None:
            return
        if self._url is not None:
            self._client = Redis.from_url(
                self._url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
            )
            return
        client = RedisCluster(
            startup_nodes=self._seeds,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
        try:
            await client.initialize()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def refresh(self) -> None:
        """Re-read the slot map (cluster only): after a failover the owners change."""
        if isinstance(self._client, RedisCluster):
            await self._client.nodes_manager.initialize()

    async def probe(self) -> None:
        """Raises if Redis does not answer (within the socket timeout); a cluster's slot map is
        re-read at the same time."""
        client = self.redis
        if isinstance(client, RedisCluster):
            await client.nodes_manager.initialize()
        else:
            await client.ping()

    def owners(self, channels: Iterable[str]) -> dict[Shard, list[list[str]]]:
        """The shard owning each channel, from the current slot map; per shard, the channels
        grouped by slot (one SSUBSCRIBE may only name channels of one slot)."""
        client = self.redis
        if not isinstance(client, RedisCluster):
            url = self._url
            assert url is not None
            shard = Shard(
                "single",
                lambda: Redis.from_url(url, socket_timeout=None, socket_connect_timeout=SOCKET_TIMEOUT_S),
            )
            return {shard: _by_slot(channels)}
        grouped: dict[str, list[str]] = {}
        for channel in channels:
            node = client.get_node_from_key(channel)
            if node is None:
                raise SlotNotCoveredError(f"no node owns the slot of {channel}")
            grouped.setdefault(f"{node.host}:{node.port}", []).append(channel)
        result: dict[Shard, list[list[str]]] = {}
        for name, names in grouped.items():
            host, _, port = name.rpartition(":")
            result[Shard(name, _opener(host, int(port)))] = _by_slot(names)
        return result

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _opener(host: str, port: int) -> Callable[[], Redis]:
    # socket_timeout None: a subscriber waits for messages as long as there are none; its
    # liveness comes from the periodic topology check and PINGs (bus.ShardedSubscriber).
    return lambda: Redis(host=host, port=port, socket_timeout=None, socket_connect_timeout=SOCKET_TIMEOUT_S)


def _by_slot(channels: Iterable[str]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for channel in channels:
        groups.setdefault(key_slot(channel.encode()), []).append(channel)
    return list(groups.values())
