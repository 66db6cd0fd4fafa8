"""Connect rate with HS256 and RS256 tokens: TCP CONNECT -> CONNACK, ``--concurrency`` at a time.

Starts ``market-bridge run`` (auth on, both keys trusted) on loopback; one asyncio client
connects, waits for CONNACK, disconnects, ``--connections`` times per algorithm. Prints one
JSON line per algorithm. (Idle-connection memory is the ``idle`` scenario of bench/run.py.)
"""

from __future__ import annotations

import argparse
import asyncio
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
from bench.brokers import running
from bench.loadgen import raise_nofile_limit

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    raise_nofile_limit()
    for result in run(connections=args.connections, concurrency=args.concurrency):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
