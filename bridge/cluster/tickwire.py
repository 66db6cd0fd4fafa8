"""A validated tick as it crosses the bus: without its seq (the cluster stamps it) and in parts.

``encode(tick, qos)`` is what a node hands to :meth:`TickBus.publish`; ``decode`` turns a bus
entry back into the parts the broker's fan-out builds every wire form from (``TickParts``), so a
receiving node neither parses JSON nor formats the timestamp text again::

    b"T1 <qos> <epoch second> <ms> " + tick.wire_head()

The head is the sending node's own output of a validated tick (nodes trust each other and their
Redis); ``decode`` still checks the frame, so a foreign writer's message is dropped, never
delivered half-read. The same bytes are the shared snapshot's payload (bridge.cluster.seq).
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.core.tick import Tick
from bridge.core.timezones import LocalClock
from bridge.errors import ClusterMessageError

__all__ = ["MAGIC", "BusTick", "TickWireError", "decode", "encode", "wire_tail"]

MAGIC = b"T1"
# A head is a few hundred bytes (bridge.core.tick.MAX_TICK_BYTES bounds a whole tick).
MAX_HEAD_BYTES = 4096


class TickWireError(ClusterMessageError):
    """A bus entry that is not a tick in this format (another writer, or a version skew)."""


@dataclass(frozen=True, slots=True)
class BusTick:
    qos: int
    second: int  # the tick's instant: epoch second and millisecond, UTC
    ms: int
    head: bytes  # Tick.wire_head(): the wire form up to the "ts" field


def encode(tick: Tick, qos: int) -> bytes:
    second, ms = LocalClock.split(tick.ts)
    return b"%s %d %d %d " % (MAGIC, qos, second, ms) + tick.wire_head()


def decode(payload: bytes) -> BusTick:
    fields = payload.split(b" ", 4)
    if len(fields) != 5 or fields[0] != MAGIC:
        raise TickWireError("not a T1 tick")
    qos, second, ms, head = fields[1], fields[2], fields[3], fields[4]
    if qos not in (b"0", b"1", b"2") or not second.lstrip(b"-").isdigit() or not ms.isdigit():
        raise TickWireError("bad qos or instant")
    if int(ms) > 999 or not head.startswith(b'{"exchange":"') or len(head) > MAX_HEAD_BYTES:
        raise TickWireError("bad instant or head")
    return BusTick(int(qos), int(second), int(ms), head)


def wire_tail(seq: int) -> bytes:
    """``Tick.wire_tail(seq)`` without a Tick: the wire form after the ``ts`` text."""
    return b'","seq":%d}' % seq
