"""``--workers 1`` vs ``--workers 2`` on this host, in the same run: connection admission and fan-out.

    python -m bench.workers [--quick] [--connections N] [--rounds R]

One real ``redis-server`` (cluster backbone and store; AOF, ``appendfsync everysec``) on a
free loopback port; each broker
is ``market-bridge run --workers N`` on fixed free ports with ``cluster.enabled`` (so 1 and 2
workers run the same code path: leases, client ids and ticks through Redis), HTTP off.

- ``workers_admission``: N WebSocket clients, each with its own HS256 token (one user each),
  open the WebSocket, CONNECT and hold the connection; ``--generators`` load-generator
  processes (bench/loadgen.py) with ``--concurrency`` handshakes in flight each.
  Connections/s from the first handshake to the last CONNACK, broker CPU per connection
  (supervisor + workers), generator CPU. Rounds alternate 1, 2, 1, 2 ... workers so drift in
  the machine's load hits both; the figures are each round's and the median.
- ``workers_fanout``: the ``qos0`` scenario (1 TCP publisher, 50 WebSocket subscribers on
  ``market/#``, saturated) against each; with 2 workers the publisher lands on one and the
  ticks cross Redis to the other's subscribers.

The load generator runs on the same 2 cores: every figure says how many cores the broker and
the generator used and how busy the rest of the machine was (``other_cpu_cores``).
Prints one JSON line per measurement, then ``workers_summary`` with the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

import psutil

from bench import offline
from bench.brokers import RunningBroker, running
from bench.connect import settle
from bench.loadgen import ClientsSpec, Fleet, cpu_seconds, raise_nofile_limit, spread
from bench.scenarios import FanoutOptions, ScenarioError, fanout

__all__ = ["admission", "main", "run"]

READY_LINE = "workers: {n} ready"


def _redis(redis_url: str, command: bytes) -> bytes:
    """One inline command to the bench's Redis, its whole reply (small replies only)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        reply = sock.recv(65536)
        if reply.startswith(b"$"):  # a bulk string: read to its announced length
            size = int(reply[1 : reply.index(b"\r\n")])
            while len(reply) < reply.index(b"\r\n") + 2 + size:
                reply += sock.recv(65536)
        return reply


def _flush(redis_url: str) -> None:
    """Each broker starts on an empty Redis (no leases, snapshots or sessions of the last one)."""
    if not _redis(redis_url, b"FLUSHALL").startswith(b"+OK"):
        raise ScenarioError("FLUSHALL failed")


def redis_cpu_s(redis_url: str) -> float:
    """CPU seconds the Redis server has used (INFO cpu), to tell its share from other jobs'."""
    fields = dict(
        line.split(":", 1) for line in _redis(redis_url, b"INFO cpu").decode().splitlines() if ":" in line
    )
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


@contextlib.contextmanager
def workers_broker(redis_url: str, workers: int, max_connections: int) -> Iterator[RunningBroker]:
    """``market-bridge run --workers N`` on the bench's fixed free ports, all workers ready (1: the
    broker itself, listening)."""
    _flush(redis_url)
    extra = {
        "http": {"enabled": False},
        "store": {"redis_url": redis_url},
        "cluster": {"enabled": True, "node_id": "bench", "redis_url": redis_url},
    }
    with running(
        "market-bridge", max_connections=max_connections, extra=extra, args=("--workers", str(workers))
    ) as broker:
        deadline = time.monotonic() + 60
        while workers > 1 and broker.log_lines_with(READY_LINE.format(n=workers)) == 0:
            if not broker.alive() or time.monotonic() > deadline:
                raise ScenarioError(f"--workers {workers} not ready:\n{broker.log_tail()}")
            time.sleep(0.05)
        yield broker


def _machine_busy_s() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def admission(
    broker: RunningBroker, redis_url: str, connections: int, generators: int, concurrency: int
) -> dict[str, Any]:
    """``connections`` WebSocket clients with their own tokens CONNECT and stay; the rate."""
    credentials = broker.subscribers("adm", connections)
    phase_s = 60 + connections / 50
    with Fleet(slots=generators) as fleet:
        names = []
        for slot, group in enumerate(spread(credentials, generators)):
            name = f"admit-{slot}"
            fleet.add(
                ClientsSpec(
                    name=name,
                    endpoint=broker.ws,
                    credentials=tuple(group),
                    slot=slot,
                    concurrency=concurrency,
                    keepalive=600,  # no PINGREQ inside the measured window
                    connect_phase_s=phase_s,
                )
            )
            names.append(name)
        pids = fleet.pids()
        settle([*broker.pids(), *pids])  # start-up done: the window holds only the connects
        gen0, cpu0, machine0 = cpu_seconds(pids), broker.cpu_s(), _machine_busy_s()
        redis0, wall0 = redis_cpu_s(redis_url), time.monotonic()
        fleet.control.go.set()
        ready = fleet.collect("ready", names, timeout=phase_s + 60)
        wall = time.monotonic() - wall0
        cpu, machine, gen1 = broker.cpu_s() - cpu0, _machine_busy_s() - machine0, cpu_seconds(pids)
        redis = redis_cpu_s(redis_url) - redis0
        connected = sum(r["connected"] for r in ready.values())
        if connected < connections:
            raise ScenarioError(f"{connected}/{connections} connected; {ready}")
        fleet.control.stop.set()
        fleet.collect("done", names, timeout=60)
    gen = sum(gen1[p] - gen0.get(p, 0.0) for p in gen1)
    return {
        "transport": "ws",
        "auth": "HS256, one token and user per connection",
        "connections": connections,
        "wall_s": round(wall, 2),
        "connections_per_s": round(connections / wall),
        "broker_cpu_ms_per_connection": round(cpu / connections * 1000, 3),
        "broker_cpu_cores": round(cpu / wall, 2),
        "generator_cpu_cores": round(gen / wall, 2),
        "redis_cpu_cores": round(redis / wall, 2),
        # Everything else on the machine (other users' jobs): high means noisy numbers.
        "other_cpu_cores": round(max(0.0, machine - cpu - gen - redis) / wall, 2),
        "generator_processes": generators,
        "concurrency": concurrency * generators,
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def run(
    *, connections: int, rounds: int, generators: int, concurrency: int, fanout_s: float
) -> list[dict[str, Any]]:
    """Every measurement and the summary, as JSON-ready dicts (``scenario`` key included)."""
    results: list[dict[str, Any]] = []
    rates: dict[int, list[float]] = {1: [], 2: []}
    fan: dict[int, float] = {}
    with offline.redis_server("everysec") as redis_url:
        for round_no in range(rounds):
            for workers in (1, 2):
                with workers_broker(redis_url, workers, connections + 200) as broker:
                    line = admission(broker, redis_url, connections, generators, concurrency)
                rates[workers].append(line["connections_per_s"])
                results.append(
                    {"scenario": "workers_admission", "workers": workers, "round": round_no, **line}
                )
        for workers in (1, 2):
            with workers_broker(redis_url, workers, 500) as broker:
                line = fanout(broker, FanoutOptions(duration_s=fanout_s))
            if line.get("deliveries_per_s"):
                fan[workers] = line["deliveries_per_s"]
            results.append({"scenario": "workers_fanout", "workers": workers, **line})
    one, two = _median(rates[1]), _median(rates[2])
    results.append(
        {
            "scenario": "workers_summary",
            "cores": psutil.cpu_count(),
            "admission_per_s_1": one,
            "admission_per_s_2": two,
            "admission_ratio": round(two / one, 2) if one and two else None,
            "admission_ratio_per_round": [round(b / a, 2) for a, b in zip(rates[1], rates[2], strict=True)],
            "admission_target_ratio": 1.6,
            "fanout_per_s_1": fan.get(1),
            "fanout_per_s_2": fan.get(2),
            "fanout_ratio": round(fan[2] / fan[1], 2) if 1 in fan and 2 in fan else None,
            "load_avg_1m": round(psutil.getloadavg()[0], 2),
        }
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 connections, 1 round, 4 s fan-out")
    parser.add_argument("--connections", type=int, help="per admission run (default 3,000; quick 1,000)")
    parser.add_argument("--rounds", type=int, help="admission rounds of 1 then 2 workers (default 2)")
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes in flight per generator")
    args = parser.parse_args()
    raise_nofile_limit()
    results = run(
        connections=args.connections or (1000 if args.quick else 3000),
        rounds=args.rounds or (1 if args.quick else 2),
        generators=args.generators,
        concurrency=args.concurrency,
        fanout_s=4.0 if args.quick else 8.0,
    )
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
