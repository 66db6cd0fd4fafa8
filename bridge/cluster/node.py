"""Node liveness: which broker nodes are up (``mb:nodes``: node id -> heartbeat expiry), and
whether this one can reach Redis (``ready``, for ``/readyz``).

Interface (what the broker and the HTTP surface call)::

    registry = NodeRegistry(backbone, node_id=default_node_id(config.cluster.node_id),
                            lease_ttl_s=config.cluster.lease_ttl_s)
    await registry.start()       # first heartbeat (raises if Redis cannot be reached)
    registry.ready               # False from the first failed heartbeat until one succeeds
    registry.unready_reason      # why, for /readyz
    await registry.live_nodes()  # ids of the nodes that heartbeated within lease_ttl_s
    await registry.stop()        # leaves the registry (a crash: the entry expires)

A heartbeat is one pipelined round trip (ZADD this node, drop expired ones) every
:data:`PROBE_S` (or ``lease_ttl_s / 3`` if shorter), so an unreachable Redis is noticed within
about a second plus the client's socket timeout. A node that is not ready should refuse new
connections and keep serving the ones it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import cast

from redis.exceptions import RedisError

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.tasks import stop_task

__all__ = ["PROBE_S", "NodeRegistry", "default_node_id", "worker_node_id"]

log = logging.getLogger(__name__)

PROBE_S = 1.0
_NOT_ID = re.compile(r"[^A-Za-z0-9_.-]")


def default_node_id(configured: str | None = None, *, host: str | None = None, pid: int | None = None) -> str:
    """The configured id, else ``<host>-<pid>`` in the characters a node id may hold."""
    if configured:
        return configured
    host = host if host is not None else socket.gethostname()
    pid = pid if pid is not None else os.getpid()
    name = _NOT_ID.sub("-", host)[:40].strip("-") or "node"
    return f"{name}-{pid}"


def worker_node_id(configured: str | None, index: int, *, host: str | None = None) -> str:
    """Worker ``index`` of ``market-bridge run --workers N``: ``<node_id or host>-w<index>``,
    the base cut so the id stays within 64 characters."""
    suffix = f"-w{index}"
    base = configured or _NOT_ID.sub("-", host if host is not None else socket.gethostname()).strip("-")
    return f"{(base or 'node')[: 64 - len(suffix)]}{suffix}"


class NodeRegistry:
    def __init__(
        self,
        backbone: Backbone,
        *,
        node_id: str,
        lease_ttl_s: float,
        probe_s: float = PROBE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.lease_ttl_s = lease_ttl_s
        self._probe_s = min(probe_s, lease_ttl_s / 3)
        self._backbone = backbone
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready = False
        self.unready_reason: str | None = "not started"
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    async def wait_ready(self, ready: bool) -> None:
        """Returns once ``ready`` has that value (for tests and start-up)."""
        while self._ready != ready:
            self._changed.clear()
            await self._changed.wait()

    def _set(self, ready: bool, reason: str | None) -> None:
        if ready != self._ready:
            log.warning("cluster node %s: %s", self.node_id, "ready" if ready else f"not ready: {reason}")
            self._changed.set()
        self._ready, self.unready_reason = ready, reason

    async def start(self) -> None:
        await self._backbone.connect()
        await self.heartbeat()
        self._set(True, None)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="cluster-node-heartbeat")

    async def stop(self) -> None:
        self._stopping = True  # as well as the cancel: one swallowed in the client must not keep us
        await stop_task(self._task)
        self._task = None
        with contextlib.suppress(RedisError, OSError):
            await self._backbone.redis.zrem(keys.nodes(), self.node_id)
        self._set(False, "stopped")

    async def heartbeat(self) -> None:
        now_ms = int(self._clock() * 1000)
        async with self._backbone.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.nodes(), {self.node_id: now_ms + int(self.lease_ttl_s * 1000)})
            pipe.zremrangebyscore(keys.nodes(), "-inf", now_ms)
            await pipe.execute()

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._probe_s)
            try:
                await self.heartbeat()
            except (RedisError, OSError) as exc:
                self._set(False, f"Redis unreachable: {type(exc).__name__}: {exc}")
                continue
            self._set(True, None)

    async def live_nodes(self) -> list[str]:
        now_ms = int(self._clock() * 1000)
        with unavailable_as("live_nodes"):
            members = await self._backbone.redis.zrangebyscore(keys.nodes(), now_ms + 1, "+inf")
        return sorted(member.decode() for member in cast("list[bytes]", members))
