"""Real faults for a running store, switched on and off on the store's own connection: no mocks.

- ``"full"``, the store cannot grow. SQLite: ``PRAGMA max_page_count`` set to the file's
  current size, so what needs a new page fails with SQLITE_FULL ("database or disk is full"),
  as on a full disk; changes in place and deletes still work. Redis: ``maxmemory`` 1 byte
  (``noeviction``), so commands that may grow memory fail with OOM; reads and deletes work.
- ``"read_only"`` (SQLite): ``PRAGMA query_only``, so every write fails with SQLITE_READONLY,
  as on a file system remounted read-only; reads work.
- ``None``: back to normal.
"""

from __future__ import annotations

from typing import Literal

from bridge.core.store import OfflineStore
from bridge.redis_store import RedisStore
from bridge.sqlite_store import SqliteStore
from bridge.store_guard import GuardedStore

__all__ = ["Fault", "set_fault"]

Fault = Literal["full", "read_only"] | None
_NO_PAGE_LIMIT = 2**32 - 2  # SQLite caps it at its own maximum


async def set_fault(store: OfflineStore, fault: Fault) -> None:
    inner = store.inner if isinstance(store, GuardedStore) else store
    if isinstance(inner, SqliteStore):
        db = inner._db
        assert db is not None, "store closed"
        if fault == "full":
            [(pages,)] = list(await db.execute_fetchall("PRAGMA page_count"))
            await db.execute(f"PRAGMA max_page_count = {int(pages)}")
        else:
            await db.execute(f"PRAGMA max_page_count = {_NO_PAGE_LIMIT}")
        await db.execute(f"PRAGMA query_only = {'ON' if fault == 'read_only' else 'OFF'}")
        return
    assert isinstance(inner, RedisStore), type(inner)
    assert fault != "read_only", "Redis has no read-only fault here"
    client = inner._redis
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", 1 if fault == "full" else 0)
