"""Direct QoS 0 delivery: a stalled subscriber costs bounded memory and never slows the others."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    Client,
    authed_connect,
    bridge_config,
    make_tick,
    subscribe_packet,
    unique,
    wait_until,
)

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
