"""Direct QoS 0 delivery: a stalled subscriber costs bounded memory and never slows the others."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.mqtt.publish import PublishPacket

from bridge.auth import Role
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    authed_connect,
    bridge_config,
    make_tick,
    subscribe_packet,
    token_for,
    unique,
    wait_until,
)
from tests.edge.test_handler import RawClient, publish_packet

ClientFactory = Callable[..., Client]
HIGH_WATER = 4096
TOPICS = [("luno", "BTC-ZAR"), ("valr", "ETH-ZAR"), ("quidax", "USDT-NGN")]


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    config = bridge_config(
        broker={"max_outbound_bytes": HIGH_WATER, "socket_send_buffer_bytes": 4096},
        # The tests burst thousands of ticks from one feed: no inbound publish limit.
        limits={"rate": {"publish_per_s": 0}},
    )
    with BrokerThread(config) as running:
        yield running


def _stalled_subscriber(port: int) -> socket.socket:
    """Subscribes to market/#, then never reads again (a phone in a tunnel)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(DEADLINE_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(authed_connect(unique("staller"), role="subscriber"))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    sock.sendall(subscribe_packet(1, "market/#"))
    assert sock.recv(5) == b"\x90\x03\x00\x01\x00"
    return sock


def _until_latest(client: Client, last_seq: int, topics: int = len(TOPICS)) -> dict[str, int]:
    """Read until ``topics`` topics have reached ``last_seq``; seq must rise strictly per topic."""
    latest: dict[str, int] = {}
    while len(latest) < topics or min(latest.values()) < last_seq:
        tick = json.loads(client.expect(1)[0].payload)
        assert tick["seq"] > latest.get(tick["pair"], 0)
        latest[tick["pair"]] = tick["seq"]
    return latest


def test_stalled_subscriber_is_conflated_and_bounded_while_others_get_everything(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    staller = _stalled_subscriber(broker.tcp_port)
    healthy = clients(broker.ws_port, transport="websockets", role="subscriber")
    healthy.connect()
    healthy.subscribe("market/#")
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    total = 3000
    for index in range(total):
        exchange, pair = TOPICS[index % len(TOPICS)]
        feed.publish(f"market/{exchange}/{pair}", make_tick(exchange, pair, last=str(index + 1)).encode())
    # A burst may be conflated for anyone who falls behind; nobody misses the latest tick,
    # and seq only moves forward.
    assert _until_latest(healthy, total // len(TOPICS)) == {pair: total // len(TOPICS) for _, pair in TOPICS}

    def buffered() -> tuple[int, int]:
        connection = next(c for c in broker.broker._connections.values() if c.user.startswith("staller"))
        assert connection.outbox is not None
        return connection.outbox._transport.get_write_buffer_size(), connection.outbox.pending

    size, pending = broker.call(buffered)
    # Bounded: at most the high-water mark plus one frame, and one held message per topic.
    assert size <= HIGH_WATER + 512
    assert pending <= len(TOPICS)
    assert broker.call(lambda: broker.broker.stats.publishes_dropped["conflated"]) > 0

    # When the phone reads again it gets the latest tick of each topic, gaps visible in seq.
    staller.settimeout(0.5)
    seen: dict[str, int] = {}
    data = b""
    try:
        while True:
            chunk = staller.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    staller.close()
    for exchange, pair in TOPICS:
        marker = f'"exchange":"{exchange}","pair":"{pair}"'.encode()
        positions = [i for i in range(len(data)) if data.startswith(marker, i)]
        assert positions, f"no tick for {exchange}/{pair}"
        last = json.loads(data[positions[-1] - 1 : data.index(b"}", positions[-1]) + 1])
        seen[pair] = last["seq"]
    assert seen == {pair: total // len(TOPICS) for _, pair in TOPICS}


def test_conflation_keeps_memory_flat_while_the_stall_lasts(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    staller = _stalled_subscriber(broker.tcp_port)
    feed = clients(broker.tcp_port, role="feed")
    feed.connect()
    watcher = clients(broker.tcp_port, role="subscriber")
    watcher.connect()
    watcher.subscribe("market/luno/#")
    for round_ in range(5):
        for index in range(500):
            feed.publish("market/luno/BTC-ZAR", make_tick(last=str(index + 1)).encode())
        _until_latest(watcher, 500 * (round_ + 1), topics=1)
        pending = broker.call(
            lambda: [c.outbox.pending for c in broker.broker._connections.values() if c.outbox]
        )
        assert max(pending) <= 1, f"round {round_}: {pending}"
    wait_until(
        lambda: broker.call(lambda: broker.broker.stats.publishes_dropped["conflated"]) > 0, what="conflation"
    )
    staller.close()


# --- per-subscriber rate limit ----------------------------------------------------------------


class TimedClient(Client):
    """A paho client that notes when each message arrived (monotonic seconds)."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        super().__init__(port, **kwargs)
        self.arrivals: list[tuple[float, dict[str, Any], int]] = []  # (time, tick, qos)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.arrivals.append((time.monotonic(), json.loads(msg.payload), msg.qos))
        super()._on_message(client, userdata, msg)

    def per_topic(self) -> dict[str, list[tuple[float, int]]]:
        out: dict[str, list[tuple[float, int]]] = {}
        for at, tick, _ in list(self.arrivals):
            out.setdefault(tick["pair"], []).append((at, tick["seq"]))
        return out


@pytest.fixture
def timed_clients() -> Iterator[Callable[..., TimedClient]]:
    made: list[TimedClient] = []

    def factory(port: int, role: Role, **claims: Any) -> TimedClient:
        user = unique(role)
        client = TimedClient(port, username=user, password=token_for(user, role, **claims))
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


RATE_PAIRS = ["BTC-ZAR", "ETH-ZAR"]
PUBLISH_S = 2.0
TICKS_PER_S = 50  # per topic


def _publish_paced(port: int) -> int:
    """Ticks on RATE_PAIRS at TICKS_PER_S each for PUBLISH_S, QoS 1; returns ticks per topic."""
    feed = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    feed.sendall(authed_connect(unique("feed"), role="feed"))
    assert feed.recv(4) == b"\x20\x02\x00\x00"
    per_topic = int(PUBLISH_S * TICKS_PER_S)
    step = 1.0 / (TICKS_PER_S * len(RATE_PAIRS))
    started = time.monotonic()
    packet_id = 0
    for n in range(per_topic):
        for pair in RATE_PAIRS:
            packet_id += 1
            # Pacing, not waiting for a result: the feed's schedule is the input under test.
            threading.Event().wait(max(0.0, started + packet_id * step - time.monotonic()))
            tick = make_tick("luno", pair, last=str(n + 1))
            feed.sendall(
                bytes(PublishPacket.build(tick.topic, tick.encode(), packet_id, False, 1, False).to_bytes())
            )
    acks = b""
    while len(acks) < 4 * packet_id:
        chunk = feed.recv(65536)
        assert chunk, "feed closed"
        acks += chunk
    feed.close()
    return per_topic


def test_rate_limited_subscribers_get_spaced_updates_and_always_the_latest(
    timed_clients: Callable[..., TimedClient],
) -> None:
    config = bridge_config(limits={"rate": {"topic_updates_per_s": {"subscriber": 4}}})
    with BrokerThread(config) as broker:
        # (client, updates per second per topic or None for all, subscription QoS)
        cases = [
            (timed_clients(broker.tcp_port, "subscriber", rate=2), 2.0, 0),  # the claim wins
            (timed_clients(broker.tcp_port, "subscriber"), 4.0, 0),  # the role's setting
            (timed_clients(broker.tcp_port, "subscriber", rate=2), 2.0, 1),  # QoS 1 is gated too
            (timed_clients(broker.tcp_port, "admin"), None, 0),  # the admin role: no limit
        ]
        for client, _, qos in cases:
            client.connect()
            client.subscribe("market/#", qos=qos)
        per_topic = _publish_paced(broker.tcp_port)

        def settled() -> bool:
            return all(
                len(client.per_topic()) == len(RATE_PAIRS)
                and all(got[-1][1] == per_topic for got in client.per_topic().values())
                for client, _, _ in cases
            )

        # Whatever the limit, each subscriber ends with the latest tick of every topic.
        wait_until(settled, what="every subscriber to reach the latest tick")
        for client, rate, qos in cases:
            assert {q for _, _, q in client.arrivals} == {qos}
            for pair, got in client.per_topic().items():
                seqs = [seq for _, seq in got]
                assert seqs == sorted(set(seqs)), f"{pair}: seq not strictly increasing: {seqs}"
                if rate is None:
                    assert seqs == list(range(1, per_topic + 1)), pair
                    continue
                interval = 1.0 / rate
                gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(got)]
                # Sent at least an interval apart; arrival jitter gets 40% of it.
                assert min(gaps) >= 0.6 * interval, (rate, pair, gaps)
                # About rate x duration updates: the first at once, one per interval, the last.
                assert PUBLISH_S * rate - 1 <= len(got) <= PUBLISH_S * rate + 2, (rate, pair, seqs)
        assert broker.call(lambda: broker.broker.stats.publishes_dropped["conflated"]) > 0


# --- the high-water bound -----------------------------------------------------------------------


def test_a_burst_never_takes_the_transport_buffer_past_high_water_plus_one_frame(
    broker: BrokerThread,
) -> None:
    # The module's promise: memory per connection is bounded by high_water (plus one frame
    # being written, plus one held message per topic), however the ticks arrive.
    staller = _stalled_subscriber(broker.tcp_port)
    feed = RawClient(broker.tcp_port, role="feed")
    try:

        def buffered() -> int:
            connection = next(c for c in broker.broker._connections.values() if c.user.startswith("staller"))
            assert connection.outbox is not None
            return connection.outbox._transport.get_write_buffer_size()

        # One tick per write until the stalled connection's buffer is past half the high-water
        # mark (and so, one frame at a time, still below it): nothing is held yet.
        n = 0
        while broker.call(buffered) <= HIGH_WATER // 2:
            n += 1
            assert n < 10_000, "the kernel never filled up"
            tick = make_tick(last=str(n))
            feed.send(publish_packet(tick.topic, tick.encode(), qos=1, packet_id=n % 60_000 + 1))
            assert feed.read().kind == 4  # handed off, so the staller's batch is written
        frame = len(publish_packet(tick.topic, tick.encode()))
        # Then one write of 40 ticks (10 topics): more than the high-water mark in one step.
        burst = [make_tick("luno", f"T{k % 10}-ZAR", last=str(n + k)) for k in range(1, 41)]
        feed.send(b"".join(publish_packet(t.topic, t.encode()) for t in burst))
        feed.send(publish_packet(tick.topic, tick.encode(), qos=1, packet_id=65_000))
        while feed.read().packet_id != 65_000:
            pass
        assert broker.call(buffered) <= HIGH_WATER + frame
    finally:
        feed.close()
        staller.close()
