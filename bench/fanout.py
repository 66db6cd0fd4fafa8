"""Fan-out baseline: 1 TCP feed publisher, N WebSocket subscribers on ``market/#``.

Starts ``market-bridge run`` as a subprocess on ephemeral loopback ports, subscribers in
worker processes (paho, one network thread per client), and a publisher. Prints one JSON
line: deliveries/s summed over subscribers, loss, p50/p99 latency, broker CPU time.

Latency: the publisher writes its send time (ns, wall clock) into the tick's
``volume_24h`` field, a valid decimal string, so the tick passes broker validation
unchanged; each subscriber subtracts it from its receive time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bridge.auth import Role, SigningKey, mint_token

ROOT = Path(__file__).resolve().parent.parent
TOPICS = [f"market/luno/{base}-ZAR" for base in ("BTC", "ETH", "SOL", "XRP", "USDT", "USDC", "ADA", "DOT")]


SECRET = secrets.token_urlsafe(48)
KEY = SigningKey(kid="bench", key=SECRET.encode(), algorithm="HS256")
AUTH_YAML = f"auth: {{keys: [{{kid: bench, algorithms: [HS256], secret: {SECRET}}}]}}\n"


ZONES = ("Africa/Lagos", "Africa/Nairobi", "Africa/Cairo", "Africa/Johannesburg", "Africa/Casablanca")


def token(sub: str, role: Role, tz: str | None = None) -> str:
    return mint_token(KEY, sub=sub, role=role, now=time.time(), ttl_s=3600, tz=tz)


def _start_broker(config_text: str) -> tuple[subprocess.Popen[str], int, int]:
    workdir = Path(tempfile.mkdtemp(prefix="market-bridge-bench-"))
    config = workdir / "bench.yaml"
    if "http:" not in config_text:
        config_text += "http: {port: 0}\n"
    if "store:" not in config_text:
        # A fresh embedded store per run: snapshots from an earlier run would skew counts.
        config_text += f"store: {{path: {workdir / 'store.sqlite3'}}}\n"
    config.write_text(config_text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "run", "--config", str(config)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MARKET_BRIDGE_")},
    )
    ports: dict[str, int] = {}
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while len(ports) < 2 and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"listener (ws|tcp) bound to [\d.]+:(\d+)", line):
            ports[match.group(1)] = int(match.group(2))
    if len(ports) < 2:
        proc.kill()
        raise SystemExit("broker did not start")
    # Keep draining stderr so the broker never blocks on a full pipe.
    log_path = os.environ.get("BENCH_BROKER_LOG", os.devnull)

    def drain() -> None:
        with open(log_path, "a") as sink:
            for line in proc.stderr or ():
                sink.write(line)

    threading.Thread(target=drain, daemon=True).start()
    return proc, ports["ws"], ports["tcp"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_mosquitto() -> tuple[subprocess.Popen[str], int, int]:
    """Mosquitto on its own loopback ports (TCP + WebSocket, anonymous), for the ratio."""
    binary = shutil.which("mosquitto")
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    tcp, ws = _free_port(), _free_port()
    config = Path(tempfile.mkdtemp(prefix="mosquitto-bench-")) / "mosquitto.conf"
    config.write_text(
        f"listener {tcp} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\nallow_anonymous true\n"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", tcp), timeout=0.2).close()
            return proc, ws, tcp
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def _subscriber_worker(
    port: int, clients: int, expected: int, ready: Barrier, done: Event, results: mp.Queue[Any]
) -> None:
    lock = threading.Lock()
    latencies: list[int] = []
    counts = [0] * clients
    first_last = [0.0, 0.0]
    finished = threading.Event()

    def on_message(index: int) -> Any:
        def handler(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            now = time.time_ns()
            sent = int(json.loads(msg.payload)["volume_24h"])
            with lock:
                counts[index] += 1
                latencies.append(now - sent)
                if not first_last[0]:
                    first_last[0] = time.monotonic()
                first_last[1] = time.monotonic()
                if sum(counts) >= expected * clients:
                    finished.set()

        return handler

    subscribed = threading.Semaphore(0)
    conns = []
    for index in range(clients):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, transport="websockets", protocol=mqtt.MQTTv311)
        client.ws_set_options(path="/mqtt")
        user = f"bench-{os.getpid()}-{index}"
        client.username_pw_set(user, token(user, "subscriber", ZONES[index % len(ZONES)]))
        client.on_message = on_message(index)
        client.on_subscribe = lambda *_a: subscribed.release()
        client.connect("127.0.0.1", port, keepalive=60)
        client.loop_start()
        client.subscribe("market/#", 0)
        conns.append(client)
    for _ in range(clients):
        subscribed.acquire(timeout=20)
    ready.wait(30)
    finished.wait(120)
    done.wait(5)
    results.put({"counts": counts, "latencies": latencies, "first": first_last[0], "last": first_last[1]})
    for client in conns:
        client.disconnect()
        client.loop_stop()


def _tick(topic: str, seq: int) -> bytes:
    pair = topic.rsplit("/", 1)[1]
    return json.dumps(
        {
            "exchange": "luno",
            "pair": pair,
            "bid": "100",
            "ask": "101",
            "last": str(100 + seq % 7),
            "volume_24h": str(time.time_ns()),
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "seq": seq,
        },
        separators=(",", ":"),
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--messages", type=int, default=5000, help="ticks published")
    parser.add_argument("--rate", type=float, default=0, help="ticks/s to publish; 0 = as fast as possible")
    parser.add_argument("--tz", choices=["on", "off"], default="on", help="timestamp rewriting per zone")
    parser.add_argument("--broker", choices=["market-bridge", "mosquitto"], default="market-bridge")
    args = parser.parse_args()

    if args.broker == "mosquitto":
        broker, ws_port, tcp_port = _start_mosquitto()
    else:
        broker, ws_port, tcp_port = _start_broker(
            "listeners: {ws: {port: 0}, tcp: {port: 0}}\nfeeds: []\nlogging: {level: INFO}\n"
            f"timezones: {{enabled: {'true' if args.tz == 'on' else 'false'}}}\n" + AUTH_YAML
        )
    broker_ps = psutil.Process(broker.pid)
    try:
        per_proc = [args.subscribers // args.processes] * args.processes
        per_proc[0] += args.subscribers - sum(per_proc)
        ready = mp.Barrier(args.processes + 1)
        done = mp.Event()
        results: mp.Queue[Any] = mp.Queue()
        workers = [
            mp.Process(target=_subscriber_worker, args=(ws_port, n, args.messages, ready, done, results))
            for n in per_proc
        ]
        for worker in workers:
            worker.start()
        ready.wait(60)

        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        publisher.max_queued_messages_set(0)
        publisher.username_pw_set("bench-feed", token("bench-feed", "feed"))
        publisher.connect("127.0.0.1", tcp_port)
        publisher.loop_start()
        cpu_before = broker_ps.cpu_times()
        start = time.monotonic()
        for seq in range(args.messages):
            publisher.publish(TOPICS[seq % len(TOPICS)], _tick(TOPICS[seq % len(TOPICS)], seq), qos=0)
            if args.rate:
                target = start + (seq + 1) / args.rate
                while (pause := target - time.monotonic()) > 0:
                    time.sleep(pause)
        publish_s = time.monotonic() - start
        gathered = [results.get(timeout=180) for _ in workers]
        done.set()
        cpu_after = broker_ps.cpu_times()
        for worker in workers:
            worker.join(10)
        publisher.disconnect()
        publisher.loop_stop()
    finally:
        broker.terminate()
        broker.wait(20)

    received = sum(sum(r["counts"]) for r in gathered)
    expected = args.messages * args.subscribers
    latencies = sorted(lat for r in gathered for lat in r["latencies"])
    span = max(r["last"] for r in gathered) - start
    cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    print(
        json.dumps(
            {
                "scenario": "fanout_qos0_ws_mosquitto"
                if args.broker == "mosquitto"
                else f"fanout_qos0_ws_tz_{args.tz}",
                "subscribers": args.subscribers,
                "published": args.messages,
                "publish_rate_target": args.rate or "max",
                "publish_s": round(publish_s, 3),
                "deliveries": received,
                "loss": round(1 - received / expected, 4),
                "deliveries_per_s": round(received / span) if span > 0 else None,
                "p50_ms": round(statistics.median(latencies) / 1e6, 2) if latencies else None,
                "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] / 1e6, 2) if latencies else None,
                "broker_cpu_us_per_delivery": round(cpu_s / received * 1e6, 1) if received else None,
            }
        )
    )


if __name__ == "__main__":
    main()
