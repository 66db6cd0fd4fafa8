"""Many users draining their mailboxes at once while live ticks fan out.

``--users`` users each make a persistent session and go away; a service stores
``--per-user`` QoS 1 messages for each (window of 100 unacknowledged publishes); then every
user reconnects at once and acknowledges what comes. Meanwhile a feed publishes QoS 0
ticks as fast as the broker takes them to ``--subscribers`` live subscribers on
``market/#``: their delivery rate during the drain is compared with the same fan-out
alone. Reports drain time (reconnect -> every user's last message), the slowest and
fastest user (fairness) and the broker's peak RSS (memory bounded by pages, not queues).

Raw asyncio MQTT clients (bench/mqttws.py codec) in this process: 1,000 paho clients would
be 1,000 threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench import mqttws
from bench.brokers import Auth, RunningBroker, running
from bench.loadgen import TickMaker, raise_nofile_limit

__all__ = ["run"]


def _connect(client_id: str, user: str, token: str, *, clean: bool) -> bytes:
    packet = bytearray(mqttws.connect(client_id, user, token))
    if not clean:
        # Flags byte: after the fixed header, the protocol name (6) and level (1).
        offset = 1 + (len(packet) > 129) + 1 + 6 + 1
        packet[offset] &= ~0x02
    return bytes(packet)


class _Conn:
    """One TCP client: counts PUBLISHes, PUBACKs QoS 1 ones, notes the last arrival."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.acks = 0  # PUBACKs to us (as a publisher)
        self.connack = asyncio.get_running_loop().create_future()
        self.suback = asyncio.Event()
        self.progress = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        buffer = bytearray()
        try:
            while chunk := await self.reader.read(65536):
                buffer += chunk
                acks = []
                while len(buffer) >= 2:
                    length, shift, index = 0, 0, 1
                    while True:
                        if index >= len(buffer):
                            break
                        byte = buffer[index]
                        length |= (byte & 0x7F) << shift
                        index += 1
                        shift += 7
                        if not byte & 0x80:
                            break
                    else:
                        break
                    if byte & 0x80 or len(buffer) < index + length:
                        break
                    kind, body = buffer[0], bytes(buffer[index : index + length])
                    del buffer[: index + length]
                    if kind >> 4 == 3:
                        now = time.monotonic()
                        self.first_at = self.first_at or now
                        self.last_at = now
                        self.received += 1
                        qos = (kind >> 1) & 3
                        if qos:
                            topic_len = int.from_bytes(body[:2], "big")
                            acks.append(
                                mqttws.puback(int.from_bytes(body[2 + topic_len : 4 + topic_len], "big"))
                            )
                    elif kind >> 4 == 2 and not self.connack.done():
                        self.connack.set_result(body[1])
                    elif kind >> 4 == 9:
                        self.suback.set()
                    elif kind >> 4 == 4:
                        self.acks += 1
                    self.progress.set()
                if acks:
                    self.writer.write(b"".join(acks))
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        await asyncio.gather(self.task, return_exceptions=True)


async def _open(port: int, client_id: str, user: str, token: str, *, clean: bool) -> _Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = _Conn(reader, writer)
    writer.write(_connect(client_id, user, token, clean=clean))
    code = await asyncio.wait_for(conn.connack, 30)
    if code != 0:
        raise RuntimeError(f"{client_id}: CONNACK {code}")
    return conn


async def _fanout(
    port: int,
    auth: Auth,
    subscribers: list[_Conn],
    seconds: float,
    until: asyncio.Event | None = None,
    rate: float = 0,
) -> float:
    """Deliveries/s to ``subscribers`` while a feed publishes ticks as fast as it can (or
    ``rate`` ticks/s), for ``seconds`` at least and, with ``until``, until it is set."""
    feed = await _open(port, "bench-feed", "feed", auth.token("feed", "feed"), clean=True)
    maker = TickMaker([f"market/luno/{base}-ZAR" for base in ("BTC", "ETH", "SOL", "XRP", "ADA", "DOT")])
    before = sum(s.received for s in subscribers)
    started = time.monotonic()
    end = started + seconds
    sent = 0
    while time.monotonic() < end or (until is not None and not until.is_set()):
        packets, _ = maker.packets(50, qos=0, retain=False, packet_id=1)
        feed.writer.write(packets)
        sent += 50
        await feed.writer.drain()
        ahead = sent / rate - (time.monotonic() - started) if rate else 0
        await asyncio.sleep(max(0.0, ahead))
    rate = (sum(s.received for s in subscribers) - before) / (time.monotonic() - started)
    await feed.close()
    return rate


def _spread(values: list[float]) -> dict[str, float]:
    """p50, p90 and max of ``values`` (seconds), rounded."""
    ordered = sorted(values)
    if not ordered:
        return {}
    last = len(ordered) - 1
    return {
        "p50": round(ordered[min(last, len(ordered) // 2)], 2),
        "p90": round(ordered[min(last, len(ordered) * 9 // 10)], 2),
        "max": round(ordered[-1], 2),
    }


async def _scenario(
    broker: RunningBroker, users: int, per_user: int, subscribers: int, whole_drain: bool, feed_rate: float
) -> dict[str, Any]:
    port, auth = broker.tcp_port, broker.auth
    assert auth is not None
    names = [f"u{i}" for i in range(users)]
    tokens = {name: auth.token(name, "subscriber") for name in names}
    for start in range(0, users, 100):
        conns = await asyncio.gather(
            *(_open(port, f"{n}-phone", n, tokens[n], clean=False) for n in names[start : start + 100])
        )
        for conn, name in zip(conns, names[start : start + 100], strict=True):
            conn.writer.write(mqttws.subscribe(1, f"user/{name}/#", 1))
        await asyncio.gather(*(asyncio.wait_for(c.suback.wait(), 30) for c in conns))
        await asyncio.gather(*(c.close() for c in conns))

    service = await _open(port, "bench-svc", "svc", auth.token("svc", "service"), clean=True)
    store_started = time.monotonic()
    total = users * per_user
    packet_id = 1
    sent = 0
    for index in range(per_user):
        for name in names:
            while sent - service.acks >= 100:  # a window of 100 unacknowledged publishes
                service.progress.clear()
                await service.progress.wait()
            payload = b'{"n":%d}' % index
            service.writer.write(
                mqttws.publish(f"user/{name}/fills".encode(), payload, qos=1, packet_id=packet_id)
            )
            packet_id = packet_id % 65535 + 1
            sent += 1
    while service.acks < total:
        service.progress.clear()
        await asyncio.wait_for(service.progress.wait(), 60)
    stored_s = time.monotonic() - store_started
    await service.close()

    live = [
        await _open(port, f"live-{i}", f"live{i}", auth.token(f"live{i}", "subscriber"), clean=True)
        for i in range(subscribers)
    ]
    for conn in live:
        conn.writer.write(mqttws.subscribe(1, "market/#", 0))
        await asyncio.wait_for(conn.suback.wait(), 30)
    alone = await _fanout(port, auth, live, 5.0 if feed_rate else 3.0, rate=feed_rate)

    rss_peak = broker.ps.memory_info().rss
    drain_started = time.monotonic()
    phones = await asyncio.gather(*(_open(port, f"{n}-phone", n, tokens[n], clean=False) for n in names))
    drained = asyncio.Event()
    # Fan-out measured over the whole drain (3 s at least), or only over its first 3 s.
    fanout_task = asyncio.create_task(
        _fanout(port, auth, live, 3.0, drained if whole_drain else None, rate=feed_rate)
    )
    deadline = time.monotonic() + 120
    while sum(p.received for p in phones) < total and time.monotonic() < deadline:
        rss_peak = max(rss_peak, broker.ps.memory_info().rss)
        await asyncio.sleep(0.05)
    drained.set()
    drained_s = max(p.last_at for p in phones) - drain_started
    during = await fanout_task
    firsts = sorted(p.first_at - drain_started for p in phones if p.first_at)
    lasts = sorted(p.last_at - drain_started for p in phones if p.last_at)
    received = sum(p.received for p in phones)
    await asyncio.gather(*(p.close() for p in phones + live))
    return {
        "users": users,
        "per_user": per_user,
        "stored_per_s": round(total / stored_s),
        "replayed": received,
        "drain_s": round(drained_s, 2),
        "first_user_done_s": round(lasts[0], 2) if lasts else None,
        "last_user_started_s": round(firsts[-1], 2) if firsts else None,
        # Per user, from the reconnect: its first message and its last (fairness).
        "user_first_message_s": _spread(firsts),
        "user_last_message_s": _spread(lasts),
        "fanout_alone_per_s": round(alone),
        "fanout_during_drain_per_s": round(during),
        "fanout_ratio": round(during / alone, 2) if alone else None,
        "broker_rss_peak_mb": round(rss_peak / 2**20, 1),
    }


def run(
    *,
    users: int = 1000,
    per_user: int = 100,
    subscribers: int = 20,
    redis_url: str | None = None,
    fanout_whole_drain: bool = False,
    feed_rate: float = 0,
) -> dict[str, Any]:
    """With ``fanout_whole_drain`` the feed publishes for the whole drain, else for its first
    3 s; as fast as it can (the drain then competes with a saturating feed), or at
    ``feed_rate`` ticks/s."""
    raise_nofile_limit()
    store: dict[str, Any] = {"queue_max_messages": max(per_user, 1000)}
    if redis_url:
        store["redis_url"] = redis_url
    with running(
        "market-bridge", max_connections=users + subscribers + 100, extra={"store": store}
    ) as broker:
        result = asyncio.run(_scenario(broker, users, per_user, subscribers, fanout_whole_drain, feed_rate))
    kind = "redis" if redis_url else "sqlite"
    window = "whole_drain" if fanout_whole_drain else "first_3s"
    if feed_rate:
        result["feed_ticks_per_s"] = feed_rate
    return {
        "scenario": "mailbox_drain",
        "broker": "market-bridge",
        "store": kind,
        "fanout_window": window,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--per-user", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--redis-url", help="drain from this Redis instead of the embedded store")
    parser.add_argument(
        "--fanout-whole-drain", action="store_true", help="feed at full rate for the whole drain, not 3 s"
    )
    parser.add_argument("--feed-rate", type=float, default=0, help="ticks/s (default: as fast as it can)")
    args = parser.parse_args()
    result = run(
        users=args.users,
        per_user=args.per_user,
        subscribers=args.subscribers,
        redis_url=args.redis_url,
        fanout_whole_drain=args.fanout_whole_drain,
        feed_rate=args.feed_rate,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
