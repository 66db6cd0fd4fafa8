"""Cluster-wide connection limits and client-id ownership, kept in Redis with leases.

Limits: one sorted set per user (``mb:lease:{alice}``: lease id -> expiry, epoch ms) and one
for the whole cluster (``mb:lease:all``: ``<lease id>|<user>`` -> expiry). Each change is one
Lua script on one key (so one slot): it drops expired members, checks the count, adds. The
two sets are in different slots, so one script cannot change both; they stay consistent by
order: a lease is added to the global set first and the user's second, removed in the
reverse order, and a failed second step undoes the first. So a lease counted for a user is
always counted globally; a node dying between the steps leaves at worst an extra global
member, which expires with its lease. Both sets only ever over-count for a moment (a
connection refused that would fit), never under-count (a connection admitted over a limit).
Every node refreshes its leases every ``lease_ttl_s / 3``; a node that dies stops refreshing
and its leases stop counting ``lease_ttl_s`` after their last refresh. Expiries come from the
nodes' clocks: they must agree to well under ``lease_ttl_s`` (NTP does).

Why not the synchronous :class:`bridge.limits.ConnectionLimits`: a decision that needs Redis
cannot be made without waiting for it, and blocking the event loop would stall every
connection. :class:`ClusterConnectionLimits` has the same methods with ``acquire`` and
``release`` as coroutines (:class:`AsyncConnectionLimits`); ``count``, ``total`` and
``per_user`` answer at once from the cluster-wide view read at the last heartbeat (at most
``lease_ttl_s / 3`` old). :class:`LocalAsyncLimits` wraps the in-process limiter in the same
shape, so the broker has one code path with or without a cluster.

Client ids (``mb:cid:{<client id>}``: ``user``, ``node``, ``lease``): a client id belongs to the
user who first used it, cluster-wide. A CONNECT claims it (:meth:`ClientOwnership.claim`): the
node records itself as the holder and learns who held it before; :func:`decide_claim` says
what to do: nothing, a local takeover, or tell the old node (over its control channel,
``{mb:node:<id>}:control``) to close its connection (:meth:`ClientOwnership.notify_takeover`,
received by :class:`bridge.cluster.control.ControlListener`). Where a user is connected
(:meth:`ClusterConnectionLimits.nodes_of`) is read off the user's lease set, so routing a
message to their nodes needs no second record to keep in step.

Interface (what the broker calls)::

    limits = ClusterConnectionLimits(backbone, node_id=..., max_per_user=10, max_total=10_000,
                                     lease_ttl_s=15)
    await limits.start()                       # heartbeats
    lease = await limits.acquire(user, replacing=old_lease)    # Lease | LimitRefusal
    await limits.release(lease)
    owners = ClientOwnership(backbone, node_id=...)
    claim = await owners.claim(client_id, user, lease.id)       # Claim: see decide_claim
    if claim.action == "notify": await owners.notify_takeover(claim.previous, client_id)
    await owners.release(client_id, lease.id)
    await limits.nodes_of(user)                # nodes holding a live connection of user
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from redis.exceptions import RedisError

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.cluster.control import TakeoverNotice, encode_control, send_control
from bridge.errors import ClusterUnavailable
from bridge.limits import ConnectionLimits, Lease, LimitRefusal
from bridge.logs import clip
from bridge.tasks import stop_task

__all__ = [
    "ACQUIRE",
    "AsyncConnectionLimits",
    "Claim",
    "ClientOwnership",
    "ClusterConnectionLimits",
    "Holder",
    "LocalAsyncLimits",
    "decide_claim",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# KEYS: the sorted set. ARGV: member, now ms, expiry ms, limit, member being replaced ("":
# none), key lifetime ms. Returns {status, count}: 2 added, 1 transferred, 0 refused.
ACQUIRE = """
local key, member, now, expiry = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local status
if ARGV[5] ~= '' and redis.call('ZSCORE', key, ARGV[5]) then
  redis.call('ZREM', key, ARGV[5])
  status = 1
else
  if redis.call('ZCARD', key) >= tonumber(ARGV[4]) then
    return {0, redis.call('ZCARD', key)}
  end
  status = 2
end
redis.call('ZADD', key, expiry, member)
redis.call('PEXPIRE', key, ARGV[6])
return {status, redis.call('ZCARD', key)}
"""

# KEYS: the owner hash. ARGV: user, node, lease, lifetime ms. Returns {written 0|1, user,
# node, lease} of the previous holder ("" for absent fields).
CLAIM = """
local prev = redis.call('HMGET', KEYS[1], 'user', 'node', 'lease')
local user, node, lease = prev[1] or '', prev[2] or '', prev[3] or ''
if user ~= '' and user ~= ARGV[1] then
  return {0, user, node, lease}
end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'node', ARGV[2], 'lease', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, user, node, lease}
"""

# KEYS: the owner hash. ARGV: lease, lifetime ms. Forgets the holder if it is still this
# lease (a late release after a takeover changes nothing); the user keeps the id.
UNCLAIM = """
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'node', 'lease')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# A client id stays its user's this long after its last connection (the default persistent
# session expiry: a week).
OWNERSHIP_S = 7 * 86400
HEARTBEAT_CHUNK = 1000  # members per ZADD in a heartbeat


class AsyncConnectionLimits(Protocol):
    """:class:`bridge.limits.ConnectionLimits` with the decisions as coroutines."""

    async def acquire(self, user: str, *, replacing: Lease | None = None) -> Lease | LimitRefusal: ...

    async def release(self, lease: Lease) -> None: ...

    def count(self, user: str) -> int: ...

    @property
    def total(self) -> int: ...

    def per_user(self) -> dict[str, int]: ...


class LocalAsyncLimits:
    """The single-node limiter in the async shape (no I/O; answers at once)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.local = limits

    async def acquire(self, user: str, *, replacing: Lease | None = None) -> Lease | LimitRefusal:
        return self.local.acquire(user, replacing=replacing)

    async def release(self, lease: Lease) -> None:
        self.local.release(lease)

    def count(self, user: str) -> int:
        return self.local.count(user)

    @property
    def total(self) -> int:
        return self.local.total

    def per_user(self) -> dict[str, int]:
        return self.local.per_user()


def _global_member(lease: Lease) -> str:
    # Lease ids are "<node>:<tag>:<n>" (no "|"), so the first "|" ends the id whatever the user is.
    return f"{lease.id}|{lease.user}"


class ClusterConnectionLimits:
    """See the module docstring. One per node; not thread-safe (one event loop owns it)."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        node_id: str,
        max_per_user: int,
        max_total: int,
        lease_ttl_s: float,
        clock: Clock = time.time,
        global_key: str | None = None,
    ) -> None:
        self.max_per_user = max_per_user
        # The set max_total counts; another key gives a class of connections (anonymous ones,
        # keys.lease_anonymous) a cap of its own, apart from everyone else's.
        self._global_key = global_key or keys.lease_all()
        self.max_total = max_total
        self.node_id = node_id
        self.lease_ttl_s = lease_ttl_s
        self._backbone = backbone
        self._clock = clock
        # Lease ids are unique cluster-wide even when a node restarts under the same id while
        # its old leases are still counted: a random instance tag per process.
        self._instance = f"{node_id}:{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        self._live: dict[str, Lease] = {}  # the leases this node holds
        self._per_user: dict[str, int] = {}  # the cluster-wide view, from the last refresh
        self._total = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False
        self._beaten = asyncio.Event()
        self.heartbeats = 0

    # -- the view (sync, like bridge.limits) ------------------------------------------------

    def count(self, user: str) -> int:
        return self._per_user.get(user, 0)

    @property
    def total(self) -> int:
        return self._total

    def per_user(self) -> dict[str, int]:
        return dict(self._per_user)

    @property
    def local_leases(self) -> int:
        return len(self._live)

    async def nodes_of(self, user: str) -> set[str]:
        """The nodes holding a live (unexpired) lease of ``user``: where their connections are.
        Raises :class:`~bridge.errors.ClusterUnavailable` when Redis cannot be reached."""
        now, _, _ = self._times()
        with unavailable_as("find the user's nodes"):
            members = cast(
                "list[bytes]",
                await self._backbone.redis.zrangebyscore(keys.lease_user(user), now + 1, "+inf"),
            )
        # Lease ids are "<node>:<instance>:<n>" and node ids hold no ":".
        return {member.decode(errors="replace").partition(":")[0] for member in members}

    # -- decisions --------------------------------------------------------------------------

    def _times(self) -> tuple[int, int, int]:
        now_ms = int(self._clock() * 1000)
        ttl_ms = int(self.lease_ttl_s * 1000)
        return now_ms, now_ms + ttl_ms, 2 * ttl_ms

    async def _acquire_in(self, key: str, member: str, limit: int, replacing: str) -> tuple[int, int]:
        now, expiry, lifetime = self._times()
        redis = self._backbone.redis
        result = await redis.eval(ACQUIRE, 1, key, member, now, expiry, limit, replacing, lifetime)
        status, count = cast("list[int]", result)
        return int(status), int(count)

    async def acquire(self, user: str, *, replacing: Lease | None = None) -> Lease | LimitRefusal:
        """Count a new connection cluster-wide, or refuse it (see bridge.limits); raises
        :class:`~bridge.errors.ClusterUnavailable` when Redis cannot be reached (the caller
        refuses the connection: fail closed)."""
        with unavailable_as("acquire"):
            return await self._acquire(user, replacing)

    async def _acquire(self, user: str, replacing: Lease | None) -> Lease | LimitRefusal:
        lease = Lease(id=f"{self._instance}:{next(self._ids)}", user=user)
        old = replacing if replacing is not None and replacing.user == user else None
        status, held = await self._acquire_in(
            self._global_key, _global_member(lease), self.max_total, _global_member(old) if old else ""
        )
        if status == 0:
            return LimitRefusal("global_limit", f"cluster has {held} of {self.max_total} connections")
        # A transfer retired the old global member: undoing it must put that one back.
        restore = old if status == 1 else None
        try:
            status, held = await self._acquire_in(
                keys.lease_user(user), lease.id, self.max_per_user, old.id if old else ""
            )
        except BaseException:
            await self._forget_global(lease, restore)
            raise
        if status == 0:
            await self._forget_global(lease, restore)
            return LimitRefusal(
                "user_limit", f"user {clip(user)} has {held} of {self.max_per_user} connections"
            )
        if old is not None:
            self._live.pop(old.id, None)
        self._live[lease.id] = lease
        return lease

    async def _forget_global(self, lease: Lease, restore: Lease | None) -> None:
        # Best effort: if this fails, the new member expires with its lease (nothing renews
        # it). A member a transfer retired is put back: the old node's heartbeat (ZADD XX)
        # would not re-add it.
        with contextlib.suppress(RedisError, OSError):
            await self._backbone.redis.zrem(self._global_key, _global_member(lease))
            if restore is not None:
                _, expiry, _ = self._times()
                await self._backbone.redis.zadd(self._global_key, {_global_member(restore): expiry})

    async def release(self, lease: Lease) -> None:
        """Give the slot back: the user's set first, then the global one (see the docstring).
        Unknown or already released leases are ignored."""
        if self._live.pop(lease.id, None) != lease:
            return
        redis = self._backbone.redis
        try:
            await redis.zrem(keys.lease_user(lease.user), lease.id)
            await redis.zrem(self._global_key, _global_member(lease))
        except (RedisError, OSError) as exc:
            # It expires by itself within lease_ttl_s: no heartbeat refreshes it any more.
            log.warning("cluster limits: release of %s failed (%s); it expires with its lease", lease.id, exc)

    # -- heartbeat --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._backbone.connect()
        await self.refresh()
        self._stopping = False
        self._heartbeat = asyncio.create_task(self._beat(), name="cluster-limits-heartbeat")

    async def stop(self, *, release: bool = True) -> None:
        """Stop heartbeating; ``release`` gives every held lease back (a clean shutdown),
        otherwise they expire after ``lease_ttl_s`` (what a crash does)."""
        self._stopping = True  # as well as the cancel: one swallowed in the client must not keep us
        await stop_task(self._heartbeat)
        self._heartbeat = None
        if release:
            for lease in list(self._live.values()):
                await self.release(lease)

    async def _beat(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await self.renew()
                await self.refresh()
            except (RedisError, OSError, ClusterUnavailable) as exc:
                log.warning("cluster limits: heartbeat failed: %s", exc)
                continue
            self._beaten.set()

    async def next_heartbeat(self) -> None:
        """Returns after the next successful heartbeat (for tests and readiness)."""
        self._beaten.clear()
        await self._beaten.wait()

    async def renew(self) -> None:
        """Push every held lease's expiry forward (pipelined; ZADD XX never re-adds one that
        was released or expired meanwhile)."""
        if not self._live:
            return
        _, expiry, lifetime = self._times()
        by_user: dict[str, list[str]] = {}
        for lease in self._live.values():
            by_user.setdefault(lease.user, []).append(lease.id)
        members = [_global_member(lease) for lease in self._live.values()]
        async with self._backbone.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(members), HEARTBEAT_CHUNK):
                pipe.zadd(
                    self._global_key, dict.fromkeys(members[start : start + HEARTBEAT_CHUNK], expiry), xx=True
                )
            pipe.pexpire(self._global_key, lifetime)
            for user, ids in by_user.items():
                pipe.zadd(keys.lease_user(user), dict.fromkeys(ids, expiry), xx=True)
                pipe.pexpire(keys.lease_user(user), lifetime)
            await pipe.execute()
        self.heartbeats += 1

    async def refresh(self) -> None:
        """Read the cluster-wide counts (for ``count``/``total``/``per_user``)."""
        now, _, _ = self._times()
        with unavailable_as("refresh"):
            members = cast(
                "list[bytes]", await self._backbone.redis.zrangebyscore(self._global_key, now + 1, "+inf")
            )
        counts = Counter(member.decode(errors="replace").partition("|")[2] for member in members)
        self._per_user = dict(counts)
        self._total = len(members)


# -- client-id ownership ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a client id: its user, and the node and lease of its live connection (None
    when it has no live connection anywhere)."""

    user: str
    node: str | None = None
    lease: str | None = None


Action = Literal["new", "takeover_local", "notify", "refused"]


@dataclass(frozen=True, slots=True)
class Claim:
    action: Action
    previous: Holder | None


def decide_claim(previous: Holder | None, user: str, node: str) -> Action:
    """What a CONNECT of ``user`` on ``node`` must do about the client id's previous holder.

    - ``refused``: the id belongs to another user (cluster-wide): CONNACK refused.
    - ``new``: nobody holds a live connection with it.
    - ``takeover_local``: this node holds it: the broker's own takeover closes it.
    - ``notify``: another node holds it: tell that node to close it.
    """
    if previous is None:
        return "new"
    if previous.user != user:
        return "refused"
    if previous.node is None:
        return "new"
    return "takeover_local" if previous.node == node else "notify"


class ClientOwnership:
    """Client id -> (user, node, lease), cluster-wide. See the module docstring."""

    def __init__(self, backbone: Backbone, *, node_id: str, ownership_s: float = OWNERSHIP_S) -> None:
        self._backbone = backbone
        self.node_id = node_id
        self._lifetime_ms = int(ownership_s * 1000)

    async def claim(self, client_id: str, user: str, lease: str) -> Claim:
        """Record this node as the holder (unless the id is another user's) and say what to do
        about the previous holder."""
        with unavailable_as("claim"):
            result = await self._backbone.redis.eval(
                CLAIM, 1, keys.client_owner(client_id), user, self.node_id, lease, self._lifetime_ms
            )
        written, *fields = (value.decode() if isinstance(value, bytes) else str(value) for value in result)
        prev_user, prev_node, prev_lease = fields
        previous = Holder(prev_user, prev_node or None, prev_lease or None) if prev_user else None
        action = decide_claim(previous, user, self.node_id)
        if (action == "refused") != (written == "0"):  # the script and the rule disagree: a bug
            raise RuntimeError(f"claim script wrote={written} but the rule says {action}")
        return Claim(action, previous)

    async def holder(self, client_id: str) -> Holder | None:
        """Who holds ``client_id`` now (None: nobody ever used it, or it expired)."""
        with unavailable_as("read a client id's holder"):
            fields = await self._backbone.redis.hmget(keys.client_owner(client_id), "user", "node", "lease")
        user, node, lease = cast("list[bytes | None]", fields)
        if not user:
            return None
        return Holder(user.decode(), node.decode() if node else None, lease.decode() if lease else None)

    async def release(self, client_id: str, lease: str) -> bool:
        """The connection holding ``lease`` ended: forget it as the holder if it still is."""
        with unavailable_as("unclaim"):
            result = await self._backbone.redis.eval(
                UNCLAIM, 1, keys.client_owner(client_id), lease, self._lifetime_ms
            )
        return bool(result)

    async def notify_takeover(self, previous: Holder, client_id: str) -> int:
        """Tell ``previous.node`` to close its connection; returns how many subscribers got it
        (0: that node is gone, its lease expires by itself)."""
        if previous.node is None or previous.lease is None:
            raise ValueError("the previous holder has no live connection to close")
        notice = TakeoverNotice(client_id, previous.lease, self.node_id)
        return await send_control(self._backbone, previous.node, encode_control(notice))
