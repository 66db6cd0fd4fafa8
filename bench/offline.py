"""Offline delivery throughput: store a 10,000-message backlog over MQTT, then replay it.

Starts ``market-bridge run`` on the embedded store or on a Redis URL (``--redis-url``), or
Mosquitto with persistence on (``--broker mosquitto``; its PUBACK is not durable: it writes
its file only periodically). A user makes a persistent session and goes away; a service
publishes ``--messages`` QoS 1 messages to them with 100 unacknowledged at most (each
PUBACK arrives only once the message is stored: stored/s is end to end); the user
reconnects and the time to the last message is taken (replayed/s). :func:`run_all` runs
every variant ``make bench`` reports: SQLite, Redis with AOF ``everysec`` and ``always``
(a redis-server started for it), and Mosquitto when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.brokers import Auth, BrokerKind, mosquitto_available, running
from bench.profile import Sampler


def _client(port: int, user: str, token: str, *, client_id: str = "", clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(user, token)
    client.max_inflight_messages_set(100)
    return client


def _sampled(pid: int, profile: Path | None, phase: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if profile is None else Sampler(pid, profile / f"{phase}.txt")


@contextlib.contextmanager
def redis_server(appendfsync: str) -> Iterator[str]:
    """A redis-server on a free port with AOF on and ``appendfsync`` as given; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", workdir, "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", appendfsync]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def run(
    *,
    messages: int,
    redis_url: str | None = None,
    profile: Path | None = None,
    broker_kind: BrokerKind = "market-bridge",
) -> dict[str, Any]:
    """Store a ``messages`` backlog for an offline user, then replay it; one result (``scenario`` included)."""
    auth = Auth.new()
    store: dict[str, Any] = {
        "queue_max_messages": messages,
        "queue_max_bytes": 104857600,
    }
    if redis_url:
        store["redis_url"] = redis_url
    result: dict[str, Any] = {
        "scenario": "offline_backlog",
        "broker": broker_kind,
        "store": "redis" if redis_url else "sqlite",
    }
    if broker_kind == "mosquitto":
        result["store"] = "persistence"
        extra: dict[str, Any] = {"persistence": "true", "max_queued_messages": str(2 * messages)}
    else:
        extra = {"store": store}
    with running(broker_kind, auth=auth, extra=extra) as broker:
        port = broker.tcp_port
        phone = _client(
            port, "alice", auth.token("alice", "subscriber"), client_id="alice-phone", clean=False
        )
        subscribed = threading.Event()
        phone.on_subscribe = lambda *_a: subscribed.set()
        phone.connect("127.0.0.1", port)
        phone.loop_start()
        phone.subscribe("user/alice/#", 1)
        subscribed.wait(10)
        phone.disconnect()
        phone.loop_stop()

        service = _client(port, "svc", auth.token("svc", "service"))
        acked = threading.Semaphore(0)
        service.on_publish = lambda *_a: acked.release()
        service.connect("127.0.0.1", port)
        service.loop_start()
        ps = broker.ps
        cpu = sum(ps.cpu_times()[:2])
        with _sampled(broker.process.pid, profile, "store"):
            start = time.perf_counter()
            for index in range(messages):
                service.publish("user/alice/fills", json.dumps({"n": index}).encode(), qos=1)
            for _ in range(messages):
                if not acked.acquire(timeout=120):
                    break
            stored_s = time.perf_counter() - start
        store_cpu = sum(ps.cpu_times()[:2]) - cpu
        service.disconnect()
        service.loop_stop()

        received: queue.Queue[bytes] = queue.Queue()
        phone = _client(
            port, "alice", auth.token("alice", "subscriber"), client_id="alice-phone", clean=False
        )
        phone.on_message = lambda _c, _u, msg: received.put(bytes(msg.payload))
        cpu = sum(ps.cpu_times()[:2])
        with _sampled(broker.process.pid, profile, "replay"):
            start = time.perf_counter()
            phone.connect("127.0.0.1", port)
            phone.loop_start()
            count = 0
            try:
                while count < messages:
                    received.get(timeout=60)
                    count += 1
            except queue.Empty:
                pass
            replay_s = time.perf_counter() - start
        replay_cpu = sum(ps.cpu_times()[:2]) - cpu
        phone.disconnect()
        phone.loop_stop()
    return result | {
        "messages": messages,
        "stored_per_s": round(messages / stored_s),
        # Broker CPU per message: steadier than rates on a shared machine.
        "store_cpu_us_per_message": round(store_cpu / messages * 1e6),
        "replay_cpu_us_per_message": round(replay_cpu / max(count, 1) * 1e6),
        "replayed": count,
        "reconnect_to_last_message_s": round(replay_s, 2),
        "replayed_per_s": round(count / replay_s),
    }


def run_all(*, messages: int) -> Iterator[dict[str, Any]]:
    """The backlog on every store (and Mosquitto when installed), one result each."""
    yield run(messages=messages)
    for appendfsync in ("everysec", "always"):
        with redis_server(appendfsync) as url:
            yield run(messages=messages, redis_url=url) | {"appendfsync": appendfsync}
    if mosquitto_available():
        yield run(messages=messages, broker_kind="mosquitto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--redis-url")
    parser.add_argument("--broker", choices=["market-bridge", "mosquitto"], default="market-bridge")
    parser.add_argument("--profile", type=Path, help="sample the broker with py-spy into this directory")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    result = run(
        messages=args.messages, redis_url=args.redis_url, profile=args.profile, broker_kind=args.broker
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
