"""bridge.cluster.node: the node registry on a real Redis Cluster, and readiness against a
real single Redis that stops answering."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.cluster.backbone import Backbone
from bridge.cluster.node import NodeRegistry, default_node_id, worker_node_id
from tests.redis_server import RedisProcess

pytestmark = pytest.mark.timeout(60)
DEADLINE_S = 20.0


@pytest.mark.parametrize(
    ("configured", "host", "pid", "expected"),
    [
        ("n1", "ignored", 1, "n1"),
        (None, "web-1.example", 42, "web-1.example-42"),
        (None, "bad host{name}", 7, "bad-host-name-7"),
        (None, "", 7, "node-7"),
        (None, "x" * 100, 7, "x" * 40 + "-7"),
    ],
)
def test_default_node_id(configured: str | None, host: str, pid: int, expected: str) -> None:
    assert default_node_id(configured, host=host, pid=pid) == expected


@pytest.mark.parametrize(
    ("configured", "index", "host", "expected"),
    [
        ("web", 0, "ignored", "web-w0"),
        (None, 3, "box.example", "box.example-w3"),
        (None, 1, "bad host{name}", "bad-host-name-w1"),
        (None, 0, "", "node-w0"),
        ("x" * 64, 12, "ignored", "x" * 60 + "-w12"),  # still a valid id: 64 characters at most
    ],
)
def test_worker_node_id(configured: str | None, index: int, host: str, expected: str) -> None:
    assert worker_node_id(configured, index, host=host) == expected


async def test_registry_lists_live_nodes(make_backbone: Callable[[], Backbone]) -> None:
    a = NodeRegistry(make_backbone(), node_id="a", lease_ttl_s=15)
    b = NodeRegistry(make_backbone(), node_id="b", lease_ttl_s=15)
    await a.start()
    await b.start()
    try:
        assert a.ready
        assert await a.live_nodes() == ["a", "b"]
        await b.stop()  # a clean stop leaves at once
        assert await a.live_nodes() == ["a"]
        # A node that dies leaves no one to remove it: its entry stops counting after
        # lease_ttl_s (an observer whose clock is past that sees it gone).
        later = NodeRegistry(
            make_backbone(), node_id="later", lease_ttl_s=15, clock=lambda: time.time() + 15.1
        )
        await later.start()
        assert await later.live_nodes() == ["later"]
        await later.stop()
    finally:
        await a.stop()
    assert not a.ready


async def test_not_ready_while_redis_is_unreachable(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    backbone = Backbone(redis_url=server.url)
    registry = NodeRegistry(backbone, node_id="a", lease_ttl_s=3, probe_s=0.2)
    try:
        await registry.start()
        assert registry.ready
        with server.paused():
            async with asyncio.timeout(DEADLINE_S):
                await registry.wait_ready(False)
            assert registry.unready_reason is not None
            assert "Redis unreachable" in registry.unready_reason
        async with asyncio.timeout(DEADLINE_S):
            await registry.wait_ready(True)
        assert registry.unready_reason is None
    finally:
        await registry.stop()
        await backbone.aclose()
        server.stop()
