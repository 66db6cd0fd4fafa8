"""The offline-store plugin opens the store the config names, behind the store contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import StoreConfig
from bridge.core.store import NewMessage
from bridge.redis_store import RedisStore
from bridge.sqlite_store import SqliteStore
from bridge.store_guard import GuardedStore
from broker_plugins.offline_store import OfflineStorePlugin


@pytest.mark.timeout(20)
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_plugin_opens_the_configured_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "redis":
        config = StoreConfig(redis_url=request.getfixturevalue("redis_url"), queue_max_messages=7)
    else:
        config = StoreConfig(path=str(tmp_path / "store.sqlite3"), queue_max_messages=7)
    plugin = OfflineStorePlugin(config)
    assert plugin.backend == backend
    store = await plugin.open()
    try:
        assert isinstance(store, GuardedStore)
        assert isinstance(store.inner, RedisStore if backend == "redis" else SqliteStore)
        assert store.limits.max_messages == 7
        assert store.call_timeout_s == config.call_timeout_s
        result = await store.enqueue("kim", NewMessage("user/kim/a", b"x"), now=1.0)
        assert result.stored is not None
        assert await store.queue_size("kim") == (1, 1)
    finally:
        await store.close()
