"""The offline-store plugin: opens the configured store behind the store contract
(:class:`~bridge.core.store.OfflineStore`) for the broker, the CLI and the admin API.

Redis when ``store.redis_url`` is set (several broker nodes may share it), otherwise the
embedded SQLite file at ``store.path``. Either way every call has a deadline
(:class:`~bridge.store_guard.GuardedStore`), and the store's own timeouts are set to it.
"""

from __future__ import annotations

from pathlib import Path

from bridge.config import StoreConfig
from bridge.core.store import OfflineStore, QueueLimits
from bridge.store_guard import GuardedStore

__all__ = ["OfflineStorePlugin", "open_store"]


class OfflineStorePlugin:
    """Built from the ``store`` config section; :meth:`open` gives the broker its store."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config

    @property
    def backend(self) -> str:
        return "redis" if self.config.redis_url else "sqlite"

    async def open(self) -> GuardedStore:
        config = self.config
        limits = QueueLimits(config.queue_max_messages, config.queue_max_bytes)
        store: OfflineStore
        if config.redis_url:
            from bridge.redis_store import RedisStore  # noqa: PLC0415 - only needed with Redis

            store = await RedisStore.open(config.redis_url, limits, timeout_s=config.call_timeout_s)
            name = store.name
        else:
            from bridge.sqlite_store import SqliteStore  # noqa: PLC0415 - only needed without Redis

            store = await SqliteStore.open(Path(config.path), limits, busy_timeout_s=config.call_timeout_s)
            name = f"sqlite store {config.path}"
        return GuardedStore(
            store, name=name, call_timeout_s=config.call_timeout_s, quick_timeout_s=config.quick_timeout_s
        )


async def open_store(config: StoreConfig) -> GuardedStore:
    """The store ``config`` names, opened (see :class:`OfflineStorePlugin`)."""
    return await OfflineStorePlugin(config).open()
