"""Cluster scenarios with real broker nodes: separate ``market-bridge run`` processes with
``cluster.enabled`` on one local Redis Cluster (3 masters + 3 replicas), driven from outside
like the single-node scenarios (bench/loadgen.py: raw WebSocket subscribers, a TCP feed).

- ``cluster_fanout``: the feed on node 1, 50 WebSocket subscribers on ``market/#`` split over
  nodes 1 and 2. Paced (50 ticks/s: 2,500 deliveries/s, every delivery sampled) and saturated
  (the publisher's window over both nodes' counts). Per node: deliveries/s, p50/p99 latency
  (the publisher's send time in each tick vs the read that carried it), broker CPU per
  delivery (/proc utime + stime of the node's process). Cross-node latency added: node 2's
  p50/p99 minus node 1's (node 1's own ticks also pass through Redis before delivery: the
  bus numbers them). Redis operations per tick: INFO commandstats summed over the masters
  before and after, over the ticks published (node heartbeats and lease refreshes included).
  A single node (cluster off) at the same pace gives the baseline latency and CPU.
- ``node_death``: three nodes, 1,000 WebSocket clients (each its own user and token) on node
  A, subscribed to ``market/#`` with a snapshot; ``kill -9`` of A; every client reconnects at
  once to B or C (alternately) and counts as back when its snapshot arrived. Figures: time
  to all back, and when A's leases stopped counting and A left the node registry (read in
  Redis directly, as the survivors do).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import statistics
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode

from bench import mqttws
from bench.brokers import Auth, RunningBroker, running
from bench.loadgen import (
    Client,
    ClientsSpec,
    Credentials,
    Endpoint,
    Fleet,
    PublisherSpec,
    Refused,
    open_client,
)
from bench.scenarios import publish_retained
from bridge import redis_keys as keys
from bridge.cluster.local import RedisCluster as ClusterProcesses

__all__ = ["available", "cluster_fanout", "master_commands", "node_death", "run_all"]

DRAIN_IDLE_S = 2.0
PACED_RATE = 50.0  # ticks/s: 2,500 deliveries/s to 50 subscribers
TOPICS_PER_RUN = 8
SCRIPTS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall")
_runs = itertools.count(1)


def _client(nodes: Sequence[str]) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", int(n.rpartition(":")[2])) for n in nodes])


async def master_commands(nodes: Sequence[str]) -> int:
    """Commands executed on every master so far (INFO commandstats summed)."""
    return sum((await command_stats(nodes)).values())


async def command_stats(nodes: Sequence[str]) -> Counter[str]:
    """Calls per command summed over the masters (those run inside scripts included)."""
    client = _client(nodes)
    try:
        stats = await client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
    finally:
        await client.aclose()
    calls: Counter[str] = Counter()
    for per_node in stats.values():
        for name, fields in per_node.items():
            if name.startswith("cmdstat_") and isinstance(fields, dict):
                calls[name.removeprefix("cmdstat_")] += int(fields["calls"])
    return calls


@contextmanager
def cluster_nodes(
    seeds: Sequence[str], count: int, *, auth: Auth, lease_ttl_s: float = 15.0, max_connections: int = 10_000
) -> Iterator[list[RunningBroker]]:
    """``count`` broker processes of one cluster (``node1``..), all trusting ``auth``; stopped on exit."""
    with ExitStack() as stack:
        nodes = []
        for number in range(1, count + 1):
            cluster = {
                "enabled": True,
                "node_id": f"node{number}",
                "redis_cluster_nodes": list(seeds),
                "lease_ttl_s": lease_ttl_s,
            }
            nodes.append(
                stack.enter_context(
                    running(
                        "market-bridge",
                        auth=auth,
                        max_connections=max_connections,
                        extra={"cluster": cluster},
                    )
                )
            )
        yield nodes


def _latency(samples: array[int]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "latency_samples": 0}
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) / 1e6, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6, 3),
        "latency_samples": len(ordered),
    }


def _wait_drained(fleet: Fleet, slots: Sequence[int], expected: int, limit_s: float = 30.0) -> None:
    """Until every delivery arrived, or no progress for DRAIN_IDLE_S (loss shows in the line)."""
    deadline = time.monotonic() + limit_s
    last, changed = -1, time.monotonic()
    while time.monotonic() < deadline:
        received = fleet.received(slots)
        if received >= expected:
            return
        if received != last:
            last, changed = received, time.monotonic()
        elif time.monotonic() - changed > DRAIN_IDLE_S:
            return
        time.sleep(0.02)


def fanout_over(
    nodes: Sequence[RunningBroker],
    *,
    subscribers: int,
    rate: float | None,
    duration_s: float,
    seeds: Sequence[str] | None,
    retained_topics: int = 0,
) -> dict[str, Any]:
    """The feed on ``nodes[0]``, ``subscribers`` split evenly over ``nodes``; figures per node.

    ``retained_topics``: snapshots each subscriber gets on SUBSCRIBE (the topics of earlier
    runs on these nodes); they arrive before publishing starts and are not counted.
    """
    slots = tuple(range(len(nodes)))
    per_node = subscribers // len(nodes)
    # Fresh topics per run: no snapshot of an earlier run counts as a delivery or a sample.
    run = next(_runs)
    topics = tuple(f"market/luno/R{run}T{i}-ZAR" for i in range(TOPICS_PER_RUN))
    sample_every = 1 if rate is not None else 16
    with Fleet(slots=len(nodes)) as fleet:
        names = []
        for slot, node in zip(slots, nodes, strict=True):
            name = f"node{slot + 1}-subscribers"
            fleet.add(
                ClientsSpec(
                    name=name,
                    endpoint=node.ws,
                    credentials=tuple(node.subscribers(f"n{slot + 1}sub", per_node)),
                    slot=slot,
                    subscribe=("market/#", 0),
                    sample_every=sample_every,
                )
            )
            names.append(name)
        fleet.add(
            PublisherSpec(
                name="publisher",
                endpoint=nodes[0].tcp,
                credentials=nodes[0].feed(),
                topics=topics,
                rate=rate,
                duration_s=duration_s,
                slots=slots,
                subscribers=per_node * len(nodes),
            )
        )
        fleet.control.go.set()
        ready = fleet.collect("ready", [*names, "publisher"], timeout=120)
        connected = sum(ready[n]["connected"] for n in names)
        if connected < per_node * len(nodes):
            raise RuntimeError(f"{connected}/{per_node * len(nodes)} subscribers connected: {ready}")
        snapshots = retained_topics * per_node
        _wait_drained(fleet, slots, snapshots * len(nodes), limit_s=10.0)
        before = [fleet.received([slot]) for slot in slots]
        if sum(before) != snapshots * len(nodes):
            raise RuntimeError(f"{sum(before)} snapshots on SUBSCRIBE, expected {snapshots * len(nodes)}")
        cpu0 = [node.cpu_s() for node in nodes]
        commands0 = asyncio.run(command_stats(seeds)) if seeds else Counter()
        fleet.control.publish.set()
        published = fleet.collect("done", ["publisher"], timeout=duration_s + 60)["publisher"]
        _wait_drained(fleet, slots, (published["published"] + retained_topics) * per_node * len(nodes))
        cpu1 = [node.cpu_s() for node in nodes]
        commands = asyncio.run(command_stats(seeds)) - commands0 if seeds else Counter()
        fleet.control.stop.set()
        done = fleet.collect("done", names, timeout=60)
    ticks = published["published"]
    result: dict[str, Any] = {
        "nodes": len(nodes),
        "subscribers": per_node * len(nodes),
        "rate_target_ticks_per_s": rate,
        "ticks": ticks,
        "publish_s": round(published["end_mono"] - published["start_mono"], 2),
    }
    if seeds:
        # Every command the masters ran (inside scripts too) and the script runs alone (the
        # bus's round trips); node heartbeats and lease refreshes are in both.
        result["redis_ops_per_tick"] = round(commands.total() / max(ticks, 1), 4)
        result["redis_scripts_per_tick"] = round(sum(commands[n] for n in SCRIPTS) / max(ticks, 1), 4)
        result["redis_top_commands"] = dict(commands.most_common(6))
    for index, name in enumerate(names):
        got = done[name]
        received = got["received"] - before[index]
        span = got["last_mono"] - published["start_mono"]
        samples: array[int] = array("q")
        samples.frombytes(got["samples"])
        cpu = cpu1[index] - cpu0[index]
        result[f"node{index + 1}"] = {
            "subscribers": per_node,
            "deliveries": received,
            "loss": round(1 - received / max(1, ticks * per_node), 5),
            "deliveries_per_s": round(received / span) if received and span > 0 else None,
            **_latency(samples),
            "broker_cpu_us_per_delivery": round(cpu / received * 1e6, 2) if received else None,
            "broker_cpu_s": round(cpu, 2),
        }
    result["deliveries_per_s"] = sum(result[f"node{i + 1}"]["deliveries_per_s"] or 0 for i in slots)
    return result


def _added(cluster: dict[str, Any], key: str) -> float | None:
    one, two = cluster["node1"].get(key), cluster["node2"].get(key)
    return None if one is None or two is None else round(two - one, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def cluster_fanout(seeds: Sequence[str], *, quick: bool = False, subscribers: int = 50) -> dict[str, Any]:
    """One line: a single node (cluster off, the baseline), then two cluster nodes; each paced
    (the latency figures) and saturated (Redis operations and CPU per delivery)."""
    duration = 4.0 if quick else 10.0
    saturated_s = 3.0 if quick else 6.0
    auth = Auth.new()
    with running("market-bridge", auth=auth) as single:
        one_paced = fanout_over(
            [single], subscribers=subscribers, rate=PACED_RATE, duration_s=duration, seeds=None
        )
        one_saturated = fanout_over(
            [single],
            subscribers=subscribers,
            rate=None,
            duration_s=saturated_s,
            seeds=None,
            retained_topics=TOPICS_PER_RUN,
        )
    with cluster_nodes(seeds, 2, auth=auth) as nodes:
        paced = fanout_over(nodes, subscribers=subscribers, rate=PACED_RATE, duration_s=duration, seeds=seeds)
        saturated = fanout_over(
            nodes,
            subscribers=subscribers,
            rate=None,
            duration_s=saturated_s,
            seeds=seeds,
            retained_topics=TOPICS_PER_RUN,
        )
    single_paced, single_saturated = one_paced["node1"], one_saturated["node1"]

    def cpu(run: dict[str, Any]) -> float | None:
        value: float | None = run["broker_cpu_us_per_delivery"]
        return value

    return {
        "broker": "market-bridge",
        "auth": True,
        "paced_deliveries_per_s": paced["deliveries_per_s"],
        "cross_node_added_p50_ms": _added(paced, "p50_ms"),
        "cross_node_added_p99_ms": _added(paced, "p99_ms"),
        "node1_p50_ms": paced["node1"]["p50_ms"],
        "node1_p99_ms": paced["node1"]["p99_ms"],
        "node2_p50_ms": paced["node2"]["p50_ms"],
        "node2_p99_ms": paced["node2"]["p99_ms"],
        "single_node_p50_ms": single_paced["p50_ms"],
        "single_node_p99_ms": single_paced["p99_ms"],
        "saturated_deliveries_per_s": saturated["deliveries_per_s"],
        "single_node_saturated_deliveries_per_s": one_saturated["deliveries_per_s"],
        "redis_ops_per_tick_saturated": saturated["redis_ops_per_tick"],
        "redis_scripts_per_tick_saturated": saturated["redis_scripts_per_tick"],
        "redis_ops_per_tick_paced": paced["redis_ops_per_tick"],
        "redis_scripts_per_tick_paced": paced["redis_scripts_per_tick"],
        "cpu_us_per_delivery_saturated": {
            "node1": cpu(saturated["node1"]),
            "node2": cpu(saturated["node2"]),
            "single_node": cpu(single_saturated),
        },
        "cpu_node2_over_node1_saturated": _ratio(cpu(saturated["node2"]), cpu(saturated["node1"])),
        "cpu_node2_over_single_saturated": _ratio(cpu(saturated["node2"]), cpu(single_saturated)),
        "cpu_us_per_delivery_paced": {
            "node1": cpu(paced["node1"]),
            "node2": cpu(paced["node2"]),
            "single_node": cpu(single_paced),
        },
        "paced": paced,
        "saturated": saturated,
        "single_node_paced": one_paced,
        "single_node_saturated": one_saturated,
        "targets": "added p50 <= 1 ms, p99 <= 5 ms at 2,500/s; redis ops/tick <= 0.1 saturated; "
        "node2 cpu/delivery within 20% of node1's (and of a single node's)",
    }


# -- node death ---------------------------------------------------------------------------------


async def _subscribed(client: Client, limit_s: float) -> None:
    """SUBSCRIBE ``market/#`` and wait for the first snapshot."""
    client.send(mqttws.subscribe(1, "market/#", 0))
    await client.until(lambda: client.rx.publishes >= 1, limit_s)


async def _back(endpoint: Endpoint, credentials: Credentials, deadline: float, retries: Counter[str]) -> bool:
    """Connect, subscribe ``market/#`` and wait for a snapshot, retrying until ``deadline``
    (each failed try counted in ``retries`` by its reason)."""
    while time.monotonic() < deadline:
        client: Client | None = None
        try:
            client = await open_client(endpoint, credentials, limit_s=max(0.1, deadline - time.monotonic()))
            await _subscribed(client, max(0.1, deadline - time.monotonic()))
        except (Refused, OSError, TimeoutError, mqttws.ProtocolError) as exc:
            retries[str(exc) if isinstance(exc, Refused) else type(exc).__name__] += 1
            if client is not None:
                client.close()
            await asyncio.sleep(0.25)  # a phone's backoff before the next try
            continue
        client.close()
        return True
    return False


async def _live(redis: RedisCluster, key: str) -> list[str]:
    members = await redis.zrangebyscore(key, int(time.time() * 1000) + 1, "+inf")
    return [m.decode() for m in cast("list[bytes]", members)]


async def _node_death(seeds: Sequence[str], nodes: list[RunningBroker], clients: int) -> dict[str, Any]:
    victim, survivors = nodes[0], nodes[1:]
    await publish_retained(victim, 1)  # the snapshot everyone must get back
    credentials = victim.subscribers("phone", clients)
    gate = asyncio.Semaphore(50)
    held = []

    async def first(cred: Credentials) -> None:
        async with gate:
            client = await open_client(victim.ws, cred)
            await _subscribed(client, 30)
            held.append(client)

    started = time.monotonic()
    await asyncio.gather(*(first(c) for c in credentials))
    connect_s = time.monotonic() - started
    redis = _client(seeds)
    try:
        prefix = "node1:"  # lease ids begin with their node's id
        mine = [m for m in await _live(redis, keys.lease_all()) if m.startswith(prefix)]
        victim.process.kill()  # SIGKILL: no release, no goodbye
        killed = time.monotonic()
        deadline = killed + 60

        back_at: list[float] = []
        retries: Counter[str] = Counter()
        noticed_at: list[float] = []

        async def again(index: int, client: Client) -> bool:
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                await client.until(lambda: client.lost, 30)  # the phone notices the drop
            noticed_at.append(time.monotonic() - killed)
            async with gate:
                ok = await _back(survivors[index % len(survivors)].ws, credentials[index], deadline, retries)
            if ok:
                back_at.append(time.monotonic() - killed)
            return ok

        async def expiries() -> tuple[float | None, float | None]:
            """When A's last lease and its registry entry stopped counting (polled meanwhile)."""
            leases_s = registry_s = None
            while time.monotonic() < deadline and (leases_s is None or registry_s is None):
                now = time.monotonic() - killed
                if leases_s is None and not any(
                    m.startswith(prefix) for m in await _live(redis, keys.lease_all())
                ):
                    leases_s = now
                if registry_s is None and "node1" not in await _live(redis, keys.nodes()):
                    registry_s = now
                await asyncio.sleep(0.05)
            return leases_s, registry_s

        watch = asyncio.create_task(expiries())
        back = await asyncio.gather(*(again(i, c) for i, c in enumerate(held)))
        all_back_s = time.monotonic() - killed
        leases_s, registry_s = await watch
    finally:
        await redis.aclose()
        victim.process.wait(10)
    return {
        "clients": clients,
        "connect_s": round(connect_s, 2),
        "victim_leases_before": len(mine),
        "reconnected": sum(back),
        "all_reconnected_s": round(all_back_s, 2) if all(back) else None,
        "median_reconnected_s": round(statistics.median(back_at), 2) if back_at else None,
        "failed_tries": dict(retries),
        "last_drop_noticed_s": round(max(noticed_at), 2) if noticed_at else None,
        "leases_freed_s": None if leases_s is None else round(leases_s, 2),
        "left_registry_s": None if registry_s is None else round(registry_s, 2),
    }


def node_death(seeds: Sequence[str], *, clients: int = 1000, lease_ttl_s: float = 5.0) -> dict[str, Any]:
    auth = Auth.new()
    with cluster_nodes(seeds, 3, auth=auth, lease_ttl_s=lease_ttl_s, max_connections=3 * clients) as nodes:
        result = asyncio.run(_node_death(seeds, nodes, clients))
    return {
        "broker": "market-bridge",
        "lease_ttl_s": lease_ttl_s,
        **result,
        "targets": "all reconnected <= 10 s; leases freed <= lease_ttl_s",
    }


def available() -> bool:
    """A local Redis Cluster needs redis-server and redis-cli (``--cluster create``)."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def run_all(*, quick: bool = False) -> Iterator[dict[str, Any]]:
    """``make bench``'s cluster scenario: a fresh local Redis Cluster, both lines, stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-nodes-"))
    cluster = ClusterProcesses(workdir)
    cluster.start()
    try:
        yield {"scenario": "cluster_fanout", **cluster_fanout(cluster.startup_nodes, quick=quick)}
        clients = 200 if quick else 1000
        yield {"scenario": "node_death", **node_death(cluster.startup_nodes, clients=clients)}
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
