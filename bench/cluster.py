"""Cluster building blocks on a real local Redis Cluster (3 masters + 3 replicas): one JSON
line per scenario.

    python -m bench.cluster                 # every scenario
    python -m bench.cluster --quick         # short runs
    python -m bench.cluster --scenarios burst,failover

In the first five, two :class:`~bridge.cluster.bus.TickBus` instances in one process play
node 1 (feeds) and node 2 (receives) without a broker: the costs the cluster adds per tick,
not delivery rates.

- ``trickle``: one tick per loop step, 1,000/s: the worst case for batching.
- ``burst``: 100 ticks (different topics) every 10 ms, like a poller's all-tickers answer.
- ``saturate``: node 1 publishes as fast as it can (64 ticks per loop step, up to 8 steps
  ahead of their seqs, as a feed does not wait for them): what the bus passes at most.
- ``failover``: ticks at 200/s while the shard of their partition fails over
  (``CLUSTER FAILOVER``, and then ``kill -9`` of a master): the longest gap on node 2.
- ``nodes`` and ``death``: real broker processes (bench/cluster_nodes.py): the feed on node 1
  and 50 WebSocket subscribers over nodes 1 and 2 (``cluster_fanout``: per-node latency and
  CPU per delivery, Redis operations per tick); ``kill -9`` of a node holding 1,000 clients
  (``node_death``: time to all reconnected elsewhere, leases freed, registry).

Figures per scenario: ticks/s through, Redis round trips per tick (scripts sent by node 1),
Redis commands per tick executed on the masters (INFO commandstats, including the commands
inside the scripts and every other client's), the seq's cost (publish() to the seq known:
what local delivery would wait) and cross-node latency (publish() on node 1 to on_batch on
node 2), p50/p99 in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cluster_nodes import cluster_fanout, master_commands, node_death
from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone
from bridge.cluster.bus import Batch, TickBus
from bridge.cluster.local import RedisCluster as ClusterProcesses

PARTITIONS = 16
IN_FLIGHT = 8  # saturate: loop steps published ahead of their seqs


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Receiver:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.arrivals: list[float] = []
        self.count = 0
        self._arrived = asyncio.Event()

    async def wait_for(self, count: int, deadline_s: float) -> None:
        """Until ``count`` ticks arrived or the deadline passed (lost ticks show in the line)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_s):
                while self.count < count:
                    self._arrived.clear()
                    await self._arrived.wait()

    def on_batch(self, batch: Batch) -> None:
        now = time.perf_counter()
        self.arrivals.append(now)
        self.count += len(batch.entries)
        self._arrived.set()
        for entry in batch.entries:
            (sent,) = struct.unpack_from("!d", entry.payload)
            self.latencies_ms.append((now - sent) * 1000)

    def longest_gap(self, after: float) -> float:
        times = [t for t in self.arrivals if t >= after]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _payload() -> bytes:
    # The send time first, then ~200 bytes like a tick.
    return struct.pack("!d", time.perf_counter()) + b'{"bid":"1234567.00","ask":"1234568.00"}' * 5


def _ignore(_batch: Batch) -> None:
    pass


class Pair:
    """Node 1 and node 2, each with its own connection to the cluster."""

    def __init__(self, nodes: list[str], receiver: Receiver) -> None:
        self.backbones = [Backbone(cluster_nodes=nodes), Backbone(cluster_nodes=nodes)]
        self.one = TickBus(self.backbones[0], node_id="node1", partitions=PARTITIONS, on_batch=_ignore)
        self.two = TickBus(
            self.backbones[1], node_id="node2", partitions=PARTITIONS, on_batch=receiver.on_batch
        )

    async def start(self) -> tuple[TickBus, TickBus]:
        await self.one.start()
        await self.two.start()
        return self.one, self.two

    async def stop(self) -> None:
        await self.one.stop()
        await self.two.stop()
        for backbone in self.backbones:
            await backbone.aclose()


async def _run_load(
    nodes: list[str],
    name: str,
    duration_s: float,
    step: Callable[[TickBus, int], list[asyncio.Future[int]]],
    pace_s: float,
) -> dict[str, Any]:
    receiver = Receiver()
    pair = Pair(nodes, receiver)
    one, _ = await pair.start()
    seq_ms: list[float] = []
    outstanding: collections.deque[list[asyncio.Future[int]]] = collections.deque()
    try:
        before = await master_commands(nodes)
        trips = one.ledger.round_trips
        start = time.perf_counter()
        sent = 0
        i = 0
        while time.perf_counter() - start < duration_s:
            t0 = time.perf_counter()
            futures = step(one, i)
            i += 1
            sent += len(futures)
            for future in futures:
                future.add_done_callback(_timer(seq_ms, t0))
            if pace_s:
                # Paced: the next step comes on time, whether the seqs are back or not.
                await asyncio.sleep(max(0.0, start + i * pace_s - time.perf_counter()))
            else:
                # Saturated: up to IN_FLIGHT steps ahead of the seqs (a feed does not wait
                # for them), so ticks pile up behind the batches in flight.
                outstanding.append(futures)
                if len(outstanding) > IN_FLIGHT:
                    await asyncio.gather(*outstanding.popleft())
                else:
                    await asyncio.sleep(0)
        await receiver.wait_for(sent, deadline_s=10)
        elapsed = time.perf_counter() - start
        round_trips = one.ledger.round_trips - trips
        commands = await master_commands(nodes) - before
    finally:
        await pair.stop()
    return {
        "scenario": name,
        "ticks": sent,
        "received": receiver.count,
        "ticks_per_s": round(receiver.count / elapsed),
        "redis_round_trips_per_tick": round(round_trips / max(sent, 1), 4),
        "redis_commands_per_tick": round(commands / max(sent, 1), 3),
        "seq_ms_p50": round(_pct(seq_ms, 0.5), 3),
        "seq_ms_p99": round(_pct(seq_ms, 0.99), 3),
        "cross_node_ms_p50": round(_pct(receiver.latencies_ms, 0.5), 3),
        "cross_node_ms_p99": round(_pct(receiver.latencies_ms, 0.99), 3),
        "cross_node_ms_mean": round(statistics.fmean(receiver.latencies_ms), 3)
        if receiver.latencies_ms
        else None,
    }


def _timer(into: list[float], t0: float) -> Callable[[asyncio.Future[int]], None]:
    def done(_future: asyncio.Future[int]) -> None:
        into.append((time.perf_counter() - t0) * 1000)

    return done


def _trickle(bus: TickBus, i: int) -> list[asyncio.Future[int]]:
    return [bus.publish(f"market/x/P{i % 200}", _payload())]


def _burst(bus: TickBus, i: int) -> list[asyncio.Future[int]]:
    return [bus.publish(f"market/x/P{k}", _payload()) for k in range(100)]


def _saturate(bus: TickBus, i: int) -> list[asyncio.Future[int]]:
    return [bus.publish(f"market/x/P{(i * 64 + k) % 500}", _payload()) for k in range(64)]


async def _fault(nodes: list[str], cluster: ClusterProcesses, kind: str) -> dict[str, Any]:
    receiver = Receiver()
    pair = Pair(nodes, receiver)
    one, two = await pair.start()
    errors = 0
    stop = asyncio.Event()

    async def feed() -> None:
        nonlocal errors
        i = 0
        while not stop.is_set():
            try:
                await one.publish(f"market/x/P{i % 10}", _payload())
            except Exception:
                errors += 1
            i += 1
            await asyncio.sleep(0.005)

    feeder = asyncio.create_task(feed())
    try:
        await receiver.wait_for(50, 5.0)  # ticks flowing before the fault
        master = cluster.master_of(keys.partition_channel(0))  # P0..P9 spread over shards
        target = master if kind == "failover" else cluster.master_of(keys.partition_channel(1))
        began = time.perf_counter()
        if kind == "failover":
            await asyncio.to_thread(cluster.failover, target)
        else:
            await asyncio.to_thread(cluster.kill_master, target)
        switched = time.perf_counter() - began
        await receiver.wait_for(receiver.count + 200, 10.0)  # flowing again (or the deadline)
        stop.set()
        await feeder
        gap = receiver.longest_gap(began - 0.5)
    finally:
        await pair.stop()
        if kind == "kill":
            await asyncio.to_thread(cluster.restart, target)
    return {
        "scenario": kind,
        "redis_switch_s": round(switched, 2),
        "longest_gap_on_node2_s": round(gap, 2),
        "resubscribes_node2": two.resubscribes,
        "publish_errors": errors,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scenarios", default="trickle,burst,saturate,failover,kill,nodes,death")
    parser.add_argument("--death-clients", type=int, help="clients on the killed node (1000; quick 200)")
    args = parser.parse_args()
    duration = 2.0 if args.quick else 6.0
    chosen = args.scenarios.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = ClusterProcesses(workdir)
    cluster.start()
    try:
        nodes = cluster.startup_nodes
        for name, step, pace in (
            ("trickle", _trickle, 0.001),
            ("burst", _burst, 0.01),
            ("saturate", _saturate, 0.0),
        ):
            if name in chosen:
                print(json.dumps(await _run_load(nodes, name, duration, step, pace)), flush=True)
        for kind in ("failover", "kill"):
            if kind in chosen:
                live = [f"127.0.0.1:{n.port}" for n in cluster.nodes if n.alive]
                print(json.dumps(await _fault(live, cluster, kind)), flush=True)
        cluster.wait_ok()  # after the kill scenario's restart
        live = [f"127.0.0.1:{n.port}" for n in cluster.nodes if n.alive]
        # Real broker processes; their own event loops (asyncio.run) run in a worker thread.
        if "nodes" in chosen:
            line = await asyncio.to_thread(cluster_fanout, live, quick=args.quick)
            print(json.dumps({"scenario": "cluster_fanout", **line}), flush=True)
        if "death" in chosen:
            clients = args.death_clients or (200 if args.quick else 1000)
            line = await asyncio.to_thread(node_death, live, clients=clients)
            print(json.dumps({"scenario": "node_death", **line}), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the Redis nodes' data and logs


if __name__ == "__main__":
    asyncio.run(main())
