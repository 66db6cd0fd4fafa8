"""Connect rate with HS256 and RS256 tokens, and the WebSocket connect storm with retained snapshots.

Default: starts ``market-bridge run`` (auth on, both keys trusted) on loopback; one asyncio
client connects over TCP, waits for CONNACK, disconnects, ``--connections`` times per
algorithm. Prints one JSON line per algorithm.

``--storm N``: N WebSocket clients (``--workers`` generator processes, ``--concurrency`` each
at a time), each with its own HS256 token, CONNECT, SUBSCRIBE ``market/#`` and receive
``--retained`` snapshots, and stay connected; then all disconnect and the same clients
reconnect with the same tokens (a reconnect storm). One JSON line per phase: broker CPU per
connection (from the first CONNECT to the last snapshot delivered), connections per second,
and broker CPU per disconnect (from the clients' DISCONNECT until the broker is idle).
``--token-cache-size 0`` runs it without the token cache; ``--profile DIR`` samples the
broker with py-spy over each phase. (Idle-connection memory is the ``idle`` scenario of
bench/run.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import mqttws
from bench.brokers import RunningBroker, running
from bench.loadgen import ClientsSpec, Credentials, Fleet, cpu_seconds, raise_nofile_limit, spread
from bench.profile import Sampler
from bench.scenarios import ScenarioError, publish_retained

CONNACK_OK = b"\x20\x02\x00\x00"


async def _tcp_connect(port: int, packet: bytes) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(packet)
    reply = await reader.readexactly(4)
    elapsed = time.perf_counter() - start
    if reply != CONNACK_OK:
        raise RuntimeError(f"refused: {reply!r}")
    writer.write(mqttws.DISCONNECT)
    writer.close()
    await writer.wait_closed()
    return elapsed


async def connect_rate(port: int, packets: list[bytes], concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(packet: bytes) -> None:
        async with gate:
            latencies.append(await asyncio.wait_for(_tcp_connect(port, packet), 30))

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in packets))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "connections": len(packets),
        "concurrency": concurrency,
        "connections_per_s": round(len(packets) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


def run(*, connections: int, concurrency: int) -> list[dict[str, Any]]:
    """One result per algorithm (``scenario`` key included), from one broker trusting both keys."""
    secret = secrets.token_urlsafe(48)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = Path(tempfile.mkdtemp(prefix="bench-connect-")) / "rsa.pub.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    auth = {
        "keys": [
            {"kid": "hs", "algorithms": ["HS256"], "secret": secret},
            {"kid": "rs", "algorithms": ["RS256"], "public_key_file": str(pem)},
        ]
    }
    signing: dict[str, tuple[str, Any]] = {"HS256": ("hs", secret), "RS256": ("rs", private)}
    results = []
    with running("market-bridge", extra={"auth": auth}, max_connections=connections + 100) as broker:
        for algorithm, (kid, key) in signing.items():
            now = int(time.time())
            packets = [
                mqttws.connect(
                    f"u{i}",
                    f"u{i}",
                    jwt.encode(
                        {"sub": f"u{i}", "role": "subscriber", "iat": now, "exp": now + 3600},
                        key,
                        algorithm=algorithm,
                        headers={"kid": kid},
                    ),
                    keepalive=300,
                )
                for i in range(connections)
            ]
            cpu_before = broker.cpu_s()
            result = asyncio.run(connect_rate(broker.tcp_port, packets, concurrency))
            cpu_s = broker.cpu_s() - cpu_before
            result["broker_cpu_us_per_connect"] = round(cpu_s / connections * 1e6)
            results.append({"scenario": f"connect_rate_{algorithm.lower()}", "broker": broker.kind, **result})
    return results


def settle(pids: list[int], *, quiet_s: float = 0.3, limit_s: float = 30.0) -> None:
    """Wait until ``pids`` together use under 5% of a core for ``quiet_s`` (start-up, disconnects done)."""
    deadline = time.monotonic() + limit_s
    before = sum(cpu_seconds(pids).values())
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = sum(cpu_seconds(pids).values())
        if now - before < 0.05 * quiet_s:
            return
        before = now


def storm(
    *,
    connections: int,
    retained: int = 100,
    workers: int = 2,
    concurrency: int = 50,
    token_cache_size: int | None = None,
    profile_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """The first connect and the reconnect storm (same clients, same tokens), one result each.

    ``token_cache_size``: ``auth.token_cache_size`` (None: the default; 0: no cache).
    ``profile_dir``: py-spy samples of the broker over each measured window, into
    ``<phase>.txt`` there (``python -m bench.profile`` reads them).
    """
    results = []
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    extra = {} if token_cache_size is None else {"auth": {"token_cache_size": token_cache_size}}
    with running("market-bridge", max_connections=connections + 100, extra=extra) as broker:
        asyncio.run(publish_retained(broker, retained))
        credentials = broker.subscribers("storm", connections)
        for phase in ("first", "reconnect"):
            profile = None if profile_dir is None else profile_dir / f"{phase}.txt"
            result = _storm_phase(broker, credentials, retained, workers, concurrency, profile)
            results.append(
                {
                    "scenario": f"connect_storm_{phase}",
                    "broker": broker.kind,
                    "token_cache_size": token_cache_size,
                    **result,
                }
            )
    return results


def _storm_phase(
    broker: RunningBroker,
    credentials: list[Credentials],
    retained: int,
    workers: int,
    concurrency: int,
    profile: Path | None,
) -> dict[str, Any]:
    connections = len(credentials)
    slots = tuple(range(workers))
    phase_s = 60 + connections / 50
    with Fleet(slots=workers) as fleet:
        names = []
        for slot, group in zip(slots, spread(credentials, workers), strict=True):
            name = f"storm-{slot}"
            fleet.add(
                ClientsSpec(
                    name=name,
                    endpoint=broker.ws,
                    credentials=tuple(group),
                    slot=slot,
                    subscribe=("market/#", 0),
                    concurrency=concurrency,
                    keepalive=600,  # no PINGREQ inside the measured window
                    connect_phase_s=phase_s,
                )
            )
            names.append(name)
        pids = fleet.pids()
        settle([broker.process.pid, *pids])  # the workers' start-up and the last phase's disconnects
        with contextlib.nullcontext() if profile is None else Sampler(broker.process.pid, profile):
            gen0, cpu0, wall0 = cpu_seconds(pids), broker.cpu_s(), time.monotonic()
            fleet.control.go.set()
            ready = fleet.collect("ready", names, timeout=phase_s + 60)
            connected = sum(r["connected"] for r in ready.values())
            if connected < connections or any(r["not_granted"] for r in ready.values()):
                raise ScenarioError(f"{connected}/{connections} connected; {ready}")
            expected = connections * retained
            deadline = time.monotonic() + 60
            while fleet.received(slots) < expected and time.monotonic() < deadline:
                time.sleep(0.002)
            wall, cpu = time.monotonic() - wall0, broker.cpu_s() - cpu0
            gen1 = cpu_seconds(pids)
        received = fleet.received(slots)
        fleet.control.stop.set()
        fleet.collect("done", names, timeout=60)
    settle([broker.process.pid])  # every client has disconnected: the broker's share of that
    disconnect_cpu = broker.cpu_s() - cpu0 - cpu
    gen = sum(gen1[p] - gen0.get(p, 0.0) for p in gen1)
    return {
        "transport": "ws",
        "connections": connections,
        "retained_topics": retained,
        "snapshots_received": received,
        "snapshots_expected": expected,
        "wall_s": round(wall, 2),
        "connections_per_s": round(connections / wall),
        "broker_cpu_ms_per_connection": round(cpu / connections * 1000, 3),
        "broker_cpu_cores": round(cpu / wall, 2),
        "broker_cpu_ms_per_disconnect": round(disconnect_cpu / connections * 1000, 3),
        "generator_cpu_cores": round(gen / wall, 2),
        "generator_processes": workers,
        "concurrency": concurrency * workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--concurrency", type=int, default=50, help="connections in flight (per worker: --storm)"
    )
    parser.add_argument("--storm", type=int, metavar="N", help="WebSocket connect storm of N clients instead")
    parser.add_argument("--retained", type=int, default=100, help="retained snapshots (--storm)")
    parser.add_argument("--workers", type=int, default=2, help="generator processes (--storm)")
    parser.add_argument("--token-cache-size", type=int, help="auth.token_cache_size (--storm; 0: no cache)")
    parser.add_argument("--profile", type=Path, help="directory for py-spy samples of each phase (--storm)")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.storm:
        results = storm(
            connections=args.storm,
            retained=args.retained,
            workers=args.workers,
            concurrency=args.concurrency,
            token_cache_size=args.token_cache_size,
            profile_dir=args.profile,
        )
    else:
        results = run(connections=args.connections, concurrency=args.concurrency)
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
