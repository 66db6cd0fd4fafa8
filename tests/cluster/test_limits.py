"""bridge.cluster.limits: the pure rules table-driven; leases, limits and takeover notices
across two "nodes" (two instances) on a real Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from bridge import redis_keys as keys
from bridge.anonymous import ANONYMOUS_USER
from bridge.cluster.backbone import Backbone
from bridge.cluster.control import ControlListener, TakeoverNotice
from bridge.cluster.limits import (
    ClientOwnership,
    ClusterConnectionLimits,
    Holder,
    LocalAsyncLimits,
    decide_claim,
)
from bridge.limits import Lease, LimitRefusal, LocalConnectionLimits

pytestmark = pytest.mark.timeout(60)
DEADLINE_S = 20.0
TTL_S = 1.0  # the shortest the config allows: expiry tests wait about this long


@pytest.mark.parametrize(
    ("previous", "user", "node", "action"),
    [
        (None, "alice", "a", "new"),
        (Holder("alice"), "alice", "a", "new"),  # owned, no live connection
        (Holder("alice", "a", "a:1"), "alice", "a", "takeover_local"),
        (Holder("alice", "b", "b:7"), "alice", "a", "notify"),
        (Holder("bob", "b", "b:7"), "alice", "a", "refused"),
        (Holder("bob"), "alice", "a", "refused"),  # ids stay their user's while disconnected
        (Holder("bob", "a", "a:1"), "alice", "a", "refused"),
    ],
)
def test_decide_claim(previous: Holder | None, user: str, node: str, action: str) -> None:
    assert decide_claim(previous, user, node) == action


async def test_local_async_limits_is_the_local_limiter() -> None:
    limits = LocalAsyncLimits(LocalConnectionLimits(max_per_user=1, max_total=5))
    lease = await limits.acquire("alice")
    assert isinstance(lease, Lease)
    assert isinstance(await limits.acquire("alice"), LimitRefusal)
    assert (limits.count("alice"), limits.total, limits.per_user()) == (1, 1, {"alice": 1})
    await limits.release(lease)
    assert limits.total == 0


@pytest.fixture
async def make_limits(
    make_backbone: Callable[[], Backbone],
) -> AsyncIterator[Callable[..., ClusterConnectionLimits]]:
    made: list[ClusterConnectionLimits] = []

    def make(node_id: str, **kwargs: object) -> ClusterConnectionLimits:
        options: dict[str, object] = {"max_per_user": 10, "max_total": 10_000, "lease_ttl_s": 15.0} | kwargs
        limits = ClusterConnectionLimits(make_backbone(), node_id=node_id, **options)  # type: ignore[arg-type]
        made.append(limits)
        return limits

    yield make
    for limits in made:
        await limits.stop(release=False)


async def test_per_user_limit_holds_across_nodes(make_limits: Callable[..., ClusterConnectionLimits]) -> None:
    a, b = make_limits("a"), make_limits("b")
    await a.start()
    await b.start()
    results = await asyncio.gather(*((a if i % 2 else b).acquire("alice") for i in range(14)))
    leases = [r for r in results if isinstance(r, Lease)]
    refusals = [r for r in results if isinstance(r, LimitRefusal)]
    assert len(leases) == 10
    assert {r.reason for r in refusals} == {"user_limit"}
    assert isinstance(await a.acquire("bob"), Lease)  # other users are not affected
    # A release on one node frees a slot for the other.
    mine = next(lease for lease in leases if lease.id.startswith("a:"))
    await a.release(mine)
    await a.release(mine)  # twice is harmless
    assert isinstance(await b.acquire("alice"), Lease)
    assert isinstance(await b.acquire("alice"), LimitRefusal)
    await b.refresh()
    assert (b.count("alice"), b.total, b.per_user()) == (10, 11, {"alice": 10, "bob": 1})


async def test_global_limit_holds_across_nodes(make_limits: Callable[..., ClusterConnectionLimits]) -> None:
    a, b = make_limits("a", max_total=5), make_limits("b", max_total=5)
    await a.start()
    await b.start()
    results = await asyncio.gather(*((a, b)[i % 2].acquire(f"user{i}") for i in range(8)))
    assert sum(isinstance(r, Lease) for r in results) == 5
    assert {r.reason for r in results if isinstance(r, LimitRefusal)} == {"global_limit"}
    await a.refresh()
    assert a.total == 5
    # A user refused at the global limit holds nothing (its attempt left no trace).
    assert [a.count(f"user{i}") for i in range(8)] == [int(isinstance(r, Lease)) for r in results]


async def test_user_refusal_undoes_the_global_step(
    make_limits: Callable[..., ClusterConnectionLimits],
) -> None:
    a = make_limits("a", max_per_user=1, max_total=2)
    await a.start()
    assert isinstance(await a.acquire("alice"), Lease)
    refused = await a.acquire("alice")
    assert isinstance(refused, LimitRefusal)
    assert refused.reason == "user_limit"
    assert isinstance(await a.acquire("bob"), Lease)  # the refused attempt took no global slot


async def test_takeover_across_nodes_keeps_the_count(
    make_limits: Callable[..., ClusterConnectionLimits],
) -> None:
    a, b = make_limits("a", max_per_user=2), make_limits("b", max_per_user=2)
    await a.start()
    await b.start()
    first = await a.acquire("alice")
    assert isinstance(first, Lease)
    assert isinstance(await a.acquire("alice"), Lease)
    # b learns the old lease id from the client id's holder record, not from a's memory.
    moved = await b.acquire("alice", replacing=Lease(id=first.id, user="alice"))
    assert isinstance(moved, Lease)
    assert isinstance(await b.acquire("alice"), LimitRefusal)
    await a.release(first)  # the old node's late release does not free the new holder's slot
    await b.refresh()
    assert b.count("alice") == 2


async def test_leases_of_a_dead_node_expire(make_limits: Callable[..., ClusterConnectionLimits]) -> None:
    """A node that stops heartbeating: its leases stop counting after lease_ttl_s. Real time
    shows it happens (and prints how long it took); an injected clock shows the boundary."""
    a = make_limits("a", lease_ttl_s=TTL_S)
    await a.start()
    for _ in range(10):
        assert isinstance(await a.acquire("carol"), Lease)
    died = time.monotonic()
    await a.stop(release=False)  # kill -9: no release, no more heartbeats
    survivor = make_limits("s", lease_ttl_s=TTL_S)
    await survivor.start()
    assert isinstance(await survivor.acquire("carol"), LimitRefusal)
    async with asyncio.timeout(DEADLINE_S):
        while not isinstance(await survivor.acquire("carol"), Lease):
            await survivor.next_heartbeat()
    print(f"\nleases of a dead node freed after {time.monotonic() - died:.2f} s (lease_ttl_s={TTL_S:g})")

    # Frozen clocks: the boundary holds however long the steps take on a loaded machine.
    t0, ttl = time.time(), 10.0  # (Redis drops the key itself 2 * ttl later, in real time)
    a2 = make_limits("a2", lease_ttl_s=ttl, clock=lambda: t0)
    await a2.start()
    for _ in range(10):
        assert isinstance(await a2.acquire("alice"), Lease)
    await a2.stop(release=False)
    early = make_limits("b", lease_ttl_s=ttl, clock=lambda: t0 + ttl * 0.5)
    late = make_limits("c", lease_ttl_s=ttl, clock=lambda: t0 + ttl + 0.05)
    await early.start()
    await late.start()
    assert isinstance(await early.acquire("alice"), LimitRefusal)
    assert isinstance(await late.acquire("alice"), Lease)


async def test_nodes_of_a_user_are_the_nodes_holding_their_live_leases(
    make_limits: Callable[..., ClusterConnectionLimits],
) -> None:
    a, b, c = make_limits("a"), make_limits("node-b"), make_limits("c.3", lease_ttl_s=TTL_S)
    for limits in (a, b, c):
        await limits.start()
    assert await a.nodes_of("alice") == set()
    on_a, on_b = await a.acquire("alice"), await b.acquire("alice")
    assert isinstance(on_a, Lease)
    assert isinstance(on_b, Lease)
    assert isinstance(await b.acquire("alice"), Lease)  # two on one node: the node once
    assert isinstance(await c.acquire("bob"), Lease)
    assert await c.nodes_of("alice") == {"a", "node-b"}
    await a.release(on_a)
    assert await c.nodes_of("alice") == {"node-b"}
    # A node that dies holds no route once its leases expire.
    assert isinstance(await c.acquire("alice"), Lease)
    await c.stop(release=False)
    assert await a.nodes_of("alice") == {"node-b", "c.3"}
    later = make_limits("d", lease_ttl_s=TTL_S, clock=lambda: time.time() + TTL_S + 0.05)
    await later.start()
    assert await later.nodes_of("alice") == {"node-b"}


async def test_heartbeats_keep_leases_alive(make_limits: Callable[..., ClusterConnectionLimits]) -> None:
    a, b = make_limits("a", lease_ttl_s=TTL_S), make_limits("b", lease_ttl_s=TTL_S, max_per_user=1)
    await a.start()
    await b.start()
    assert isinstance(await a.acquire("alice"), Lease)
    for _ in range(5):  # five heartbeats = 5/3 lease_ttl_s: without them the lease would be gone
        await a.next_heartbeat()
    refused = await b.acquire("alice")
    assert isinstance(refused, LimitRefusal)
    assert a.heartbeats >= 5


async def test_takeover_notice_reaches_the_old_node(make_backbone: Callable[[], Backbone]) -> None:
    got: list[TakeoverNotice] = []
    arrived = asyncio.Event()

    def on_close(notice: TakeoverNotice) -> None:
        got.append(notice)
        arrived.set()

    backbone_a, backbone_b = make_backbone(), make_backbone()
    await backbone_a.connect()
    await backbone_b.connect()
    owners_a, owners_b = ClientOwnership(backbone_a, node_id="a"), ClientOwnership(backbone_b, node_id="b")
    listener = ControlListener(backbone_a, node_id="a", on_close=on_close)
    await listener.start()
    try:
        first = await owners_a.claim("phone-1", "alice", "a:1")
        assert (first.action, first.previous) == ("new", None)
        again = await owners_a.claim("phone-1", "alice", "a:2")
        assert again.action == "takeover_local"
        stolen = await owners_b.claim("phone-1", "mallory", "b:1")
        assert stolen.action == "refused"
        moved = await owners_b.claim("phone-1", "alice", "b:2")
        assert moved == type(moved)("notify", Holder("alice", "a", "a:2"))
        assert moved.previous is not None
        # Garbage on the control channel is dropped and counted; the notice after it arrives.
        await backbone_b.redis.spublish(keys.node_control("a"), b'{"op": "explode"}')
        assert await owners_b.notify_takeover(moved.previous, "phone-1") == 1
        async with asyncio.timeout(DEADLINE_S):
            await arrived.wait()
        assert got == [TakeoverNotice("phone-1", "a:2", "b")]
        assert listener.bad_messages == 1
        # The old connection's late release changes nothing; the new one's frees the holder.
        assert await owners_a.release("phone-1", "a:2") is False
        assert await owners_b.release("phone-1", "b:2") is True
        after = await owners_a.claim("phone-1", "alice", "a:3")
        assert (after.action, after.previous) == ("new", Holder("alice"))
        assert (await owners_a.claim("phone-1", "bob", "a:4")).action == "refused"  # still alice's
    finally:
        await listener.stop()


async def test_a_refused_takeover_leaves_the_old_lease_counted(
    make_limits: Callable[..., ClusterConnectionLimits], make_backbone: Callable[[], Backbone]
) -> None:
    """The global step transferred the old lease but the user's step refused: the old lease
    is counted globally again (an inconsistent user set, made by hand, forces the case)."""
    a, b = make_limits("a", max_per_user=1), make_limits("b", max_per_user=1)
    await a.start()
    await b.start()
    old = await a.acquire("alice")
    assert isinstance(old, Lease)
    raw = make_backbone()
    await raw.connect()
    await raw.redis.zrem(keys.lease_user("alice"), old.id)
    await raw.redis.zadd(keys.lease_user("alice"), {"someone-else": time.time() * 1000 + 60_000})
    refused = await b.acquire("alice", replacing=old)
    assert isinstance(refused, LimitRefusal)
    assert refused.reason == "user_limit"
    members = await raw.redis.zrange(keys.lease_all(), 0, -1)
    assert members == [f"{old.id}|alice".encode()]


async def test_anonymous_connections_have_their_own_cluster_wide_cap(
    make_limits: Callable[..., ClusterConnectionLimits],
) -> None:
    """auth.anonymous.max_connections across nodes, apart from the JWT users' global set."""
    user = ANONYMOUS_USER
    a = make_limits("a", max_per_user=3, max_total=3, global_key=keys.lease_anonymous())
    b = make_limits("b", max_per_user=3, max_total=3, global_key=keys.lease_anonymous())
    jwt = make_limits("a", max_per_user=1, max_total=1)
    for limits in (a, b, jwt):
        await limits.start()
    results = await asyncio.gather(*((a, b)[i % 2].acquire(user) for i in range(5)))
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(leases) == 3
    # The JWT users' global limit (1 here) is untouched by the three anonymous connections.
    assert isinstance(await jwt.acquire("alice"), Lease)
    await a.refresh()
    await jwt.refresh()
    assert (a.total, jwt.total) == (3, 1)
    # A release on one node frees a slot for the other.
    mine = next(lease for lease in leases if lease.id.startswith("a:"))
    await a.release(mine)
    assert isinstance(await b.acquire(user), Lease)
    assert isinstance(await b.acquire(user), LimitRefusal)
