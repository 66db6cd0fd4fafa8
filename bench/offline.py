"""Offline delivery throughput: store a 10,000-message backlog over MQTT, then replay it.

Starts ``market-bridge run`` on the embedded store or on a Redis URL (``--redis-url``). A
user makes a persistent session and goes away; a service publishes ``--messages`` QoS 1
messages to them (each PUBACK arrives only once the message is stored: stored/s is end to
end); the user reconnects and the time to the last message is taken (replayed/s).
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.brokers import Auth, running


def _client(port: int, user: str, token: str, *, client_id: str = "", clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(user, token)
    client.max_inflight_messages_set(100)
    return client


def run(*, messages: int, redis_url: str | None = None) -> dict[str, Any]:
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
        start = time.perf_counter()
        for index in range(messages):
            service.publish("user/alice/fills", json.dumps({"n": index}).encode(), qos=1)
        for _ in range(messages):
            if not acked.acquire(timeout=120):
                break
        stored_s = time.perf_counter() - start
        service.disconnect()
        service.loop_stop()

        received: queue.Queue[bytes] = queue.Queue()
        phone = _client(
            port, "alice", auth.token("alice", "subscriber"), client_id="alice-phone", clean=False
        )
        phone.on_message = lambda _c, _u, msg: received.put(bytes(msg.payload))
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
        phone.disconnect()
        phone.loop_stop()
    return result | {
        "messages": messages,
        "stored_per_s": round(messages / stored_s),
        "replayed": count,
        "reconnect_to_last_message_s": round(replay_s, 2),
        "replayed_per_s": round(count / replay_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    print(json.dumps(run(messages=args.messages, redis_url=args.redis_url)), flush=True)


if __name__ == "__main__":
    main()
