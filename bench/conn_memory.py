"""Broker memory per idle authenticated connection, and which objects hold it.

Default mode starts ``market-bridge run`` (auth on, HS256) on loopback, opens idle
authenticated connections in steps (``--steps 1000 10000``, cumulative, CONNECT -> CONNACK
each) and prints one JSON line per step: broker RSS growth per connection since before the
first step and over that step alone (the memory the warm-up connections freed is reused by
the first new ones, which flatters small steps), connect time and broker CPU per connect.

``--attribute`` runs the broker in a child process with tracemalloc on instead, takes a
snapshot before and after the connections, and prints where the per-connection bytes were
allocated (grouped by the first frame outside the standard library) and how many objects of
each type every connection adds. tracemalloc roughly doubles memory: read its per-site
figures as shares, and the RSS mode for the absolute figure.

    python -m bench.conn_memory --steps 1000 10000
    python -m bench.conn_memory --attribute --steps 1000
    python -m bench.conn_memory --config-extra 'broker: {event_loop: uvloop}'
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import pickle
import re
import resource
import secrets
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
import websockets
from websockets.asyncio.client import ClientConnection

from bench import mqttws
from bench.connect import CONNACK_OK
from bridge.auth import SigningKey, mint_token

ROOT = Path(__file__).resolve().parent.parent
STDLIB = sysconfig.get_paths()["stdlib"]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------- broker side (child)


def _type_census() -> dict[str, tuple[int, int]]:
    """type -> (count, sys.getsizeof total) over gc-tracked objects."""
    census: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for obj in gc.get_objects():
        kind = type(obj)
        entry = census[f"{kind.__module__}.{kind.__qualname__}"]
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)
    return {name: (count, size) for name, (count, size) in census.items()}


def _child(config_path: str, frames: int) -> None:
    """The broker with tracemalloc on; stdin lines ``snap PATH`` write a snapshot to PATH."""
    tracemalloc.start(frames)
    from bridge.config import load_config  # noqa: PLC0415 - after tracemalloc starts
    from bridge.logs import setup_logging  # noqa: PLC0415
    from bridge.runtime import serve  # noqa: PLC0415

    _raise_nofile()
    config = load_config(config_path)
    setup_logging(config.logging)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def snap(path: str) -> None:
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
            data = {
                "snapshot": snapshot,
                "census": _type_census(),
                "rss": psutil.Process().memory_info().rss,
                "traced": tracemalloc.get_traced_memory()[0],
            }
            Path(path).write_bytes(pickle.dumps(data))
            print("done", flush=True)

        def commands() -> None:
            for line in sys.stdin:
                verb, _, arg = line.strip().partition(" ")
                if verb == "snap":
                    loop.call_soon_threadsafe(snap, arg)
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=commands, daemon=True).start()
        await serve(config, stop=stop)

    asyncio.run(main())


def _spawn(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MARKET_BRIDGE_")}, **env},
    )
    assert proc.stderr is not None
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(ports) < 2 and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if match := re.search(r"listener (ws|tcp) bound to [\d.]+:(\d+)", line):
            ports[match.group(1)] = int(match.group(2))
    if len(ports) < 2:
        proc.kill()
        raise SystemExit("broker did not start")
    log_path = os.environ.get("BENCH_BROKER_LOG", os.devnull)

    def drain() -> None:
        with open(log_path, "a") as sink:
            for line in proc.stderr or ():
                sink.write(line)

    threading.Thread(target=drain, daemon=True).start()
    return proc, ports["ws"], ports["tcp"]


# ---------------------------------------------------------------- clients


class Clients:
    """Idle authenticated MQTT connections (WebSocket or TCP), opened ``concurrency`` at a time."""

    def __init__(self, transport: str, port: int, concurrency: int) -> None:
        self.transport = transport
        self.port = port
        self.concurrency = concurrency
        self.ws: list[ClientConnection] = []
        self.tcp: list[asyncio.StreamWriter] = []

    async def _one(self, packet: bytes) -> None:
        if self.transport == "ws":
            ws = await websockets.connect(
                f"ws://127.0.0.1:{self.port}/mqtt",
                subprotocols=[websockets.Subprotocol("mqtt")],
                ping_interval=None,  # like a browser's MQTT client: MQTT keep-alive only
                compression=None,
            )
            await ws.send(packet)
            reply = await ws.recv()
            self.ws.append(ws)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(packet)
            reply = await reader.readexactly(4)
            self.tcp.append(writer)
        if reply != CONNACK_OK:
            raise RuntimeError(f"refused: {reply!r}")

    async def open(self, packets: list[bytes]) -> float:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(packet: bytes) -> None:
            async with gate:
                await self._one(packet)

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in packets))
        return time.perf_counter() - start

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.ws), return_exceptions=True)
        for writer in self.tcp:
            writer.close()
        self.ws.clear()
        self.tcp.clear()


# ---------------------------------------------------------------- attribution


def _owner(traceback: tracemalloc.Traceback) -> str:
    """The most recent frame outside the standard library: who asked for the memory."""
    frames = list(traceback)  # oldest first
    for frame in reversed(frames):
        name = frame.filename
        if not name.startswith(STDLIB) or "site-packages" in name:
            return f"{_short(name)}:{frame.lineno}"
    leaf = frames[-1]
    return f"{_short(leaf.filename)}:{leaf.lineno}"


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", STDLIB + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def attribution(before: dict[str, Any], after: dict[str, Any], count: int, top: int) -> dict[str, Any]:
    diff = after["snapshot"].compare_to(before["snapshot"], "traceback")
    by_owner: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    for stat in diff:
        owner = _owner(stat.traceback)
        leaf = stat.traceback[-1]
        by_owner[owner] += stat.size_diff
        by_leaf[f"{_short(leaf.filename)}:{leaf.lineno}"] += stat.size_diff
        by_package[owner.split("/", 1)[0].split(":", 1)[0]] += stat.size_diff
    census: list[tuple[str, float, float]] = []
    for name, (n_after, size_after) in after["census"].items():
        n_before, size_before = before["census"].get(name, (0, 0))
        if n_after - n_before >= count // 2:
            census.append((name, (n_after - n_before) / count, (size_after - size_before) / count))
    census.sort(key=lambda row: -row[2])
    return {
        "traced_bytes_per_connection": round((after["traced"] - before["traced"]) / count),
        "rss_bytes_per_connection_with_tracemalloc": round((after["rss"] - before["rss"]) / count),
        "by_package": {k: round(v / count) for k, v in by_package.most_common() if abs(v) >= count * 16},
        "by_owner": {k: round(v / count) for k, v in by_owner.most_common(top)},
        "by_leaf": {k: round(v / count) for k, v in by_leaf.most_common(top)},
        "objects_per_connection": [
            {"type": name, "count": round(n, 2), "getsizeof": round(size)} for name, n, size in census[:top]
        ],
    }


# ---------------------------------------------------------------- main


def _config(secret: str, total: int, extra: str) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="market-bridge-conn-memory-"))
    path = workdir / "bench.yaml"
    path.write_text(
        "listeners: {ws: {port: 0}, tcp: {port: 0}}\nfeeds: []\nlogging: {level: INFO}\n"
        "http: {port: 0}\n"
        f"store: {{path: {workdir / 'store.sqlite3'}}}\n"
        f"limits: {{max_connections: {total + 1000}, max_connections_per_user: 10}}\n"
        f"auth: {{keys: [{{kid: hs, algorithms: [HS256], secret: {secret}}}]}}\n" + extra + "\n"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000], help="cumulative totals")
    parser.add_argument("--transport", choices=["ws", "tcp"], default="ws")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=200, help="connections opened and closed first")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle before reading memory")
    parser.add_argument("--attribute", action="store_true", help="tracemalloc attribution (slower)")
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc frames per allocation")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--config-extra", default="", help="YAML appended to the broker's config")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the broker process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.frames)
        return
    _raise_nofile()
    secret = secrets.token_urlsafe(48)
    key = SigningKey("hs", secret.encode(), "HS256")
    total = max(args.steps)
    config = _config(secret, total + args.warmup, args.config_extra)
    env = dict(item.split("=", 1) for item in args.env)
    if args.attribute:
        argv = ["-m", "bench.conn_memory", "--child", str(config), "--frames", str(args.frames)]
    else:
        argv = ["-m", "bridge.cli", "run", "--config", str(config)]
    proc, ws_port, tcp_port = _spawn(argv, env)
    broker = psutil.Process(proc.pid)
    now = time.time()

    def packets(prefix: str, n: int) -> list[bytes]:
        return [
            mqttws.connect(
                f"{prefix}{i}",
                f"{prefix}{i}",
                mint_token(key, sub=f"{prefix}{i}", role="subscriber", now=now, ttl_s=7200),
                keepalive=300,
            )
            for i in range(n)
        ]

    def snap(tag: str) -> dict[str, Any]:
        assert proc.stdin is not None
        assert proc.stdout is not None
        path = config.parent / f"{tag}.pickle"
        proc.stdin.write(f"snap {path}\n")
        proc.stdin.flush()
        proc.stdout.readline()
        data: dict[str, Any] = pickle.loads(path.read_bytes())
        return data

    port = ws_port if args.transport == "ws" else tcp_port

    async def settle() -> None:
        """Wait ``--settle`` seconds, then until the broker is idle (closed connections freed)."""
        await asyncio.sleep(args.settle)
        for _ in range(60):
            before_cpu = sum(broker.cpu_times()[:2])
            await asyncio.sleep(0.5)
            if sum(broker.cpu_times()[:2]) - before_cpu < 0.05:
                return

    async def run() -> None:
        warm = Clients(args.transport, port, args.concurrency)
        await warm.open(packets("warm", args.warmup))
        await warm.close()
        await settle()
        before_rss = broker.memory_info().rss
        before = snap("before") if args.attribute else None
        clients = Clients(args.transport, port, args.concurrency)
        opened, last_rss = 0, before_rss
        for step in sorted(args.steps):
            batch = packets(f"idle{opened}-", step - opened)
            cpu_before = sum(broker.cpu_times()[:2])
            elapsed = await clients.open(batch)
            cpu_s = sum(broker.cpu_times()[:2]) - cpu_before
            new = step - opened
            opened = step
            await settle()
            rss = broker.memory_info().rss
            result: dict[str, Any] = {
                "transport": args.transport,
                "connections": opened,
                "held": len(clients.ws) + len(clients.tcp),
                "broker_alive": proc.poll() is None,
                "connect_s": round(elapsed, 2),
                "connects_per_s": round(new / elapsed),
                "broker_cpu_ms_per_connect": round(cpu_s / new * 1000, 2),
                "broker_rss_mb": round(rss / 2**20, 1),
                "bytes_per_connection": round((rss - before_rss) / opened),
                # Growth over this step alone: free of the warm-up's freed memory being reused.
                "step_bytes_per_connection": round((rss - last_rss) / new),
            }
            last_rss = rss
            if before is not None:
                result.update(attribution(before, snap(f"after{opened}"), opened, args.top))
            print(json.dumps(result, indent=2 if args.attribute else None), flush=True)
        await clients.close()

    try:
        asyncio.run(run())
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
