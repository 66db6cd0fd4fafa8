"""Persistent sessions in a cluster: the shared store is the truth, a node's memory a copy.

A node keeps the persistent sessions it restored at start-up and those that connected to it;
meanwhile another node may resume, take over or delete the same session. So before a node
expires a session its own copy calls expired, it asks the store (:func:`shared_verdict`):

- the store no longer has it (``gone``): another node deleted it; forget the copy;
- the store says it is connected (``disconnected_at`` is None) and its holder's node is alive
  (``keep``): it is in use elsewhere; never expire it;
- connected per the store but nobody alive holds it (``orphaned``): its node died before saying
  it disconnected; it counts as disconnected from now (written back to the store);
- disconnected per the store, for longer than the expiry (``expire``), else ``keep`` with the
  store's time.

Pure and table-tested; the broker does the reads and writes.
"""

from __future__ import annotations

from typing import Literal

from bridge.core.store import SessionRecord

__all__ = ["Verdict", "shared_verdict"]

Verdict = Literal["gone", "keep", "orphaned", "expire"]


def shared_verdict(
    record: SessionRecord | None, *, holder_alive: bool, now: float, expiry_s: float
) -> Verdict:
    if record is None:
        return "gone"
    if record.disconnected_at is None:
        return "keep" if holder_alive else "orphaned"
    return "expire" if now - record.disconnected_at >= expiry_s else "keep"
