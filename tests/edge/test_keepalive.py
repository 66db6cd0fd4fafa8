"""Keep-alive and token expiry (bridge/edge/keepalive.py): one timer per connection, end to end."""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from tests.conftest import DEADLINE_S, BrokerThread, Client, unique, wait_until
from tests.edge.test_handler import RawClient, stat

ClientFactory = Callable[..., Client]


# --- keep-alive -------------------------------------------------------------------------------


def test_silent_client_is_dropped_after_one_and_a_half_keepalives_and_pinging_one_is_not(
    broker: BrokerThread, clients: ClientFactory, raw_clients: Callable[..., RawClient]
) -> None:
    watcher = clients(broker.tcp_port)
    watcher.connect()
    will_topic = unique("status")
    watcher.subscribe(will_topic)
    started = time.monotonic()
    silent = raw_clients(broker.tcp_port, keepalive=1, will=(will_topic, b"silent gone"))
    talker = raw_clients(broker.tcp_port, keepalive=1, will=(will_topic, b"talker gone"))
    # The talker pings every 0.4 s while we wait for the silent one's close.
    closed_at = None
    while closed_at is None and time.monotonic() - started < DEADLINE_S:
        assert talker.ping() == []
        readable, _, _ = select.select([silent.sock], [], [], 0.4)
        if readable and silent.wait_closed(timeout=0.01):
            closed_at = time.monotonic() - started
    assert closed_at is not None, "silent client never dropped"
    # 1 s keep-alive, x 1.5 rounded up to whole seconds: 2 s; never before 1.5 s.
    assert 1.5 <= closed_at <= 3.0, closed_at
    (will,) = watcher.expect(1)
    assert (will.topic, will.payload) == (will_topic, b"silent gone")
    # The talker outlives its own 2 s deadline by more than a keep-alive.
    while time.monotonic() - started < closed_at + 1.2:
        assert talker.ping() == []
        readable, _, _ = select.select([talker.sock], [], [], 0.4)
        assert not readable, "the broker wrote to (or closed) a client that keeps pinging"
    assert talker.ping() == []
    wait_until(lambda: stat(broker, lambda s: s.keepalive_timeouts) == 1, what="keep-alive counted")
    assert watcher.messages.empty()
