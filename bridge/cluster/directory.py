"""The cluster's connection directory: every node's live connections, for the admin API
(``/admin/connections`` lists the whole cluster on any node).

Each node keeps one hash (``{mb:node:<id>}:conns``: client id -> JSON) that only it writes.
Connects and disconnects are queued and written together, one pipelined round trip per batch
(a reconnect storm costs a handful of writes, not one per connection), off the admission
path: the list may lag a connection by one batch. The hash expires ``2 * lease_ttl_s`` after
the node's last refresh, so a dead node's connections leave the list with its leases; a node
starting under the same id empties its hash first.

Interface::

    directory = ConnectionDirectory(backbone, node_id=..., lease_ttl_s=15)
    await directory.start()
    directory.add(client_id, {"user": ..., ...}); directory.remove(client_id)
    await directory.listing(["n1", "n2"])   # node -> [connection, ...]
    await directory.stop()                  # empties this node's hash
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from redis.exceptions import RedisError

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.tasks import stop_task

__all__ = ["ConnectionDirectory"]

log = logging.getLogger(__name__)

# Fields per HSET/HDEL: bounds one command's size in a storm.
CHUNK = 500


class ConnectionDirectory:
    def __init__(self, backbone: Backbone, *, node_id: str, lease_ttl_s: float) -> None:
        self.node_id = node_id
        self._key = keys.node_connections(node_id)
        self._backbone = backbone
        self._refresh_s = lease_ttl_s / 3
        self._lifetime_ms = int(2 * lease_ttl_s * 1000)
        # client id -> JSON to write, or None to delete; the latest change per id wins.
        self._pending: dict[str, bytes | None] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.write_errors = 0

    async def start(self) -> None:
        with unavailable_as("start the connection directory"):
            await self._backbone.redis.delete(self._key)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="cluster-directory")

    async def stop(self) -> None:
        self._stopping = True  # as well as the cancel: one swallowed in the client must not keep us
        await stop_task(self._task)
        self._task = None
        with contextlib.suppress(RedisError, OSError):
            await self._backbone.redis.delete(self._key)

    def add(self, client_id: str, connection: dict[str, Any]) -> None:
        self._pending[client_id] = json.dumps(connection, separators=(",", ":")).encode()
        self._wake.set()

    def remove(self, client_id: str) -> None:
        self._pending[client_id] = None
        self._wake.set()

    async def flush(self) -> None:
        """Write what is queued (and refresh the hash's expiry) in one round trip; what
        fails stays queued for the next try."""
        batch, self._pending = self._pending, {}
        written = {cid: value for cid, value in batch.items() if value is not None}
        deleted = [cid for cid, value in batch.items() if value is None]
        try:
            async with self._backbone.redis.pipeline(transaction=False) as pipe:
                items = list(written.items())
                for start in range(0, len(items), CHUNK):
                    pipe.hset(self._key, mapping=dict(items[start : start + CHUNK]))
                for start in range(0, len(deleted), CHUNK):
                    pipe.hdel(self._key, *deleted[start : start + CHUNK])
                pipe.pexpire(self._key, self._lifetime_ms)
                await pipe.execute()
        except (RedisError, OSError):
            # Changes queued meanwhile are newer than the failed batch's.
            self._pending = batch | self._pending
            self.write_errors += 1
            raise

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except (RedisError, OSError) as exc:
                log.warning("cluster directory: write failed (retried): %s", exc)
                await asyncio.sleep(min(1.0, self._refresh_s))

    async def listing(self, nodes: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The live connections of each of ``nodes``; raises
        :class:`~bridge.errors.ClusterUnavailable` when Redis cannot be reached."""
        listing: dict[str, list[dict[str, Any]]] = {}
        with unavailable_as("list the cluster's connections"):
            for node in nodes:
                raw = await self._backbone.redis.hgetall(keys.node_connections(node))
                listing[node] = [json.loads(value) for _, value in sorted(raw.items())]
        return listing
