"""Connect rate with HS256 and RS256 tokens, and broker memory per idle WebSocket connection.

Starts ``market-bridge run`` (auth on, both keys trusted) on loopback, then from one asyncio
load generator: opens connections ``--concurrency`` at a time (CONNECT -> CONNACK timed),
and holds ``--idle`` WebSocket connections to read the broker's RSS growth per connection.
Prints one JSON line per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.fanout import _start_broker
from bridge.auth import SigningKey, mint_token

CONNACK_OK = b"\x20\x02\x00\x00"


def _mqtt_str(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(user: str, token: str) -> bytes:
    body = _mqtt_str(b"MQTT") + bytes([4, 0xC2]) + (300).to_bytes(2, "big")
    body += _mqtt_str(user.encode()) + _mqtt_str(user.encode()) + _mqtt_str(token.encode())
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return b"\x10" + bytes(encoded) + body


async def _tcp_connect(port: int, packet: bytes) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(packet)
    reply = await reader.readexactly(4)
    elapsed = time.perf_counter() - start
    if reply != CONNACK_OK:
        raise RuntimeError(f"refused: {reply!r}")
    writer.write(b"\xe0\x00")  # DISCONNECT
    writer.close()
    await writer.wait_closed()
    return elapsed


async def connect_rate(port: int, packets: list[bytes], concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(packet: bytes) -> None:
        async with gate:
            latencies.append(await _tcp_connect(port, packet))

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in packets))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "connections": len(packets),
        "connections_per_s": round(len(packets) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


async def idle_ws(
    port: int, broker: psutil.Process, count: int, tokens: list[tuple[str, str]]
) -> dict[str, Any]:
    before = broker.memory_info().rss
    conns = []
    start = time.perf_counter()
    for user, token in tokens[:count]:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")]
        )
        await ws.send(connect_packet(user, token))
        reply = await ws.recv()
        if reply != CONNACK_OK:
            raise RuntimeError(f"refused: {reply!r}")
        conns.append(ws)
    elapsed = time.perf_counter() - start
    await asyncio.sleep(1)  # let the broker settle its allocations before reading RSS
    after = broker.memory_info().rss
    for ws in conns:
        await ws.close()
    return {
        "idle_ws_connections": count,
        "connect_s": round(elapsed, 2),
        "broker_rss_mb_before": round(before / 2**20, 1),
        "broker_rss_mb_after": round(after / 2**20, 1),
        "bytes_per_connection": round((after - before) / count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    secret = secrets.token_urlsafe(48)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = Path(tempfile.mkdtemp()) / "rsa.pub.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = (
        "listeners: {ws: {port: 0}, tcp: {port: 0}}\nfeeds: []\nlogging: {level: INFO}\n"
        f"limits: {{max_connections: {args.idle + args.connections + 100}}}\n"
        f"auth: {{keys: [{{kid: hs, algorithms: [HS256], secret: {secret}}},"
        f" {{kid: rs, algorithms: [RS256], public_key_file: {pem}}}]}}\n"
    )
    keys = {
        "HS256": SigningKey("hs", secret.encode(), "HS256"),
        "RS256": SigningKey("rs", private, "RS256"),
    }
    proc, ws_port, tcp_port = _start_broker(config)
    broker = psutil.Process(proc.pid)
    try:
        now = time.time()
        for name, key in keys.items():
            users = [f"u{i}" for i in range(args.connections)]
            packets = [
                connect_packet(u, mint_token(key, sub=u, role="subscriber", now=now, ttl_s=3600))
                for u in users
            ]
            cpu_before = broker.cpu_times()
            result = asyncio.run(connect_rate(tcp_port, packets, args.concurrency))
            cpu_after = broker.cpu_times()
            cpu_s = cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
            result["broker_cpu_us_per_connect"] = round(cpu_s / args.connections * 1e6)
            print(json.dumps({"scenario": f"connect_rate_{name.lower()}", **result}), flush=True)
        tokens = [
            (f"idle{i}", mint_token(keys["HS256"], sub=f"idle{i}", role="subscriber", now=now, ttl_s=3600))
            for i in range(args.idle)
        ]
        result = asyncio.run(idle_ws(ws_port, broker, args.idle, tokens))
        print(json.dumps({"scenario": "idle_ws_memory", **result}), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
