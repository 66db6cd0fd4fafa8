"""Offline delivery throughput: store a 10,000-message backlog over MQTT, then replay it.

Starts ``market-bridge run`` on the embedded store or on a Redis URL (``--redis-url``). A
user makes a persistent session and goes away; a service publishes ``--messages`` QoS 1
messages to them (each PUBACK arrives only once the message is stored: stored/s is end to
end); the user reconnects and the time to the last message is taken (replayed/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.brokers import Auth, running
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


def run(*, messages: int, redis_url: str | None = None, profile: Path | None = None) -> dict[str, Any]:
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
        "broker": "market-bridge",
        "store": "redis" if redis_url else "sqlite",
    }
    with running("market-bridge", auth=auth, extra={"store": store}) as broker:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--redis-url")
    parser.add_argument("--profile", type=Path, help="sample the broker with py-spy into this directory")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(messages=args.messages, redis_url=args.redis_url, profile=args.profile)), flush=True)


if __name__ == "__main__":
    main()
