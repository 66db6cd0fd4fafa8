"""The session registry (bridge/edge/sessions.py): the per-user cap on persistent sessions,
expiry, and what a restarted broker restores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.core.store import QueueLimits, SessionRecord
from bridge.edge.session import context_of
from bridge.sqlite_store import SqliteStore
from tests.conftest import BrokerThread, Client, Transport, bridge_config, token_for, unique, wait_until

TRANSPORTS: list[Transport] = ["tcp", "websockets"]
ClientFactory = Callable[..., Client]


# ---------------------------------------------------------------- persistent session cap and expiry


class Clock:
    """Wall time plus an offset the test moves forward; tokens are minted at this time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _device(
    running: BrokerThread,
    clients: ClientFactory,
    transport: Transport,
    user: str,
    client_id: str,
    clock: Clock,
) -> Client:
    """A not-yet-connected persistent client of ``user`` whose token is valid at ``clock``."""
    return clients(
        running.port(transport),
        transport=transport,
        client_id=client_id,
        clean_session=False,
        username=user,
        password=token_for(user, "subscriber", now=clock()),
    )


def _use_and_leave(
    running: BrokerThread,
    clients: ClientFactory,
    transport: Transport,
    user: str,
    client_id: str,
    clock: Clock,
) -> None:
    """Connect ``client_id`` (persistent), follow the user's topics, disconnect; saved with the time."""
    device = _device(running, clients, transport, user, client_id, clock)
    device.connect()
    assert device.subscribe(f"user/{user}/#", qos=1) == [1]
    device.close()
    wait_until(
        lambda: _stored_disconnect(running, user).get(client_id) is not None, what=f"{client_id} saved"
    )


def _stored_disconnect(running: BrokerThread, user: str) -> dict[str, float | None]:
    """client id -> disconnected_at of ``user``'s sessions in the store."""
    store = running.broker.store
    assert store is not None
    return {r.client_id: r.disconnected_at for r in running.run(store.user_sessions(user))}


def _sessions_held(running: BrokerThread, user: str) -> set[str]:
    """Client ids of ``user``'s persistent sessions in the broker's memory."""

    def read() -> set[str]:
        return {
            client_id
            for client_id, (session, _) in running.broker.sessions.items()
            if not session.clean_session and context_of(session).user == user
        }

    return running.call(read)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_new_persistent_session_past_the_cap_replaces_the_longest_disconnected(
    transport: Transport, clients: ClientFactory
) -> None:
    clock = Clock()
    with BrokerThread(bridge_config(limits={"max_sessions_per_user": 3}), clock=clock) as running:
        user = unique("alice")
        first, second, third, fourth = (unique("device") for _ in range(4))
        for client_id in (first, second, third):
            _use_and_leave(running, clients, transport, user, client_id, clock)
            clock.offset += 10
        # The first is used again: the second is now the one disconnected longest.
        _use_and_leave(running, clients, transport, user, first, clock)
        clock.offset += 10

        newest = _device(running, clients, transport, user, fourth, clock)
        newest.connect()
        assert newest.session_present is False
        assert newest.subscribe(f"user/{user}/#", qos=1) == [1]
        assert _sessions_held(running, user) == {first, third, fourth}
        assert set(_stored_disconnect(running, user)) == {first, third, fourth}
        assert second not in running.call(lambda: dict(running.broker._session_filters))
        assert running.call(lambda: running.broker.stats.sessions_evicted) == 1

        # Its owner comes back to nothing, and in turn replaces the longest disconnected (third).
        back = _device(running, clients, transport, user, second, clock)
        back.connect()
        assert back.session_present is False
        assert _sessions_held(running, user) == {first, second, fourth}
        assert running.call(lambda: running.broker.stats.sessions_evicted) == 2
        assert running.call(lambda: dict(running.broker.stats.refusals)).get("session_limit", 0) == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_new_persistent_session_is_refused_when_all_of_the_users_sessions_are_connected(
    transport: Transport, clients: ClientFactory
) -> None:
    clock = Clock()
    with BrokerThread(bridge_config(limits={"max_sessions_per_user": 3}), clock=clock) as running:
        user = unique("alice")
        devices = [_device(running, clients, transport, user, unique("device"), clock) for _ in range(3)]
        for device in devices:
            device.connect()

        extra = _device(running, clients, transport, user, unique("device"), clock)
        extra.connect(expect=3)
        assert running.call(lambda: running.broker.stats.refusals["session_limit"]) == 1
        assert running.call(lambda: running.broker.stats.sessions_evicted) == 0
        assert _sessions_held(running, user) == {d.client_id for d in devices}
        # The refused CONNECT gave its connection slot back.
        assert running.call(lambda: running.broker.limits.count(user)) == 3

        # Resuming one of them never counts as new, nor does a clean session.
        again = _device(running, clients, transport, user, devices[0].client_id, clock)
        again.connect()
        assert again.session_present is True
        clean = clients(
            running.port(transport),
            transport=transport,
            username=user,
            password=token_for(user, "subscriber", now=clock()),
        )
        clean.connect()
        assert running.call(lambda: running.broker.stats.refusals["session_limit"]) == 1

        # Once one is disconnected, a new one takes its place.
        devices[1].close()
        wait_until(lambda: devices[1].client_id not in _connected(running), what="disconnected")
        late = _device(running, clients, transport, user, unique("device"), clock)
        late.connect()
        assert _sessions_held(running, user) == {devices[0].client_id, devices[2].client_id, late.client_id}


def _connected(running: BrokerThread) -> set[str]:
    return running.call(lambda: set(running.broker._connections))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sessions_disconnected_past_expiry_go_and_the_last_ones_take_the_queue(
    transport: Transport, clients: ClientFactory
) -> None:
    clock = Clock()
    with BrokerThread(bridge_config(broker={"session_expiry_s": 3600}), clock=clock) as running:
        broker = running.broker
        user = unique("alice")
        phone, tablet = unique("phone"), unique("tablet")
        _use_and_leave(running, clients, transport, user, phone, clock)
        clock.offset = 3000
        _use_and_leave(running, clients, transport, user, tablet, clock)
        stored = running.run(broker.send_to_user(user, "alerts", b"while away")).stored
        assert stored is not None

        clock.offset = 3700  # the phone has been gone 3700 s, the tablet 700 s
        assert running.run(broker.expire_sessions()) == 1
        assert _sessions_held(running, user) == {tablet}
        assert set(_stored_disconnect(running, user)) == {tablet}
        assert running.call(lambda: (broker.stats.sessions_expired, broker.stats.offline_purged)) == (1, 0)
        assert _queue_size(running, user) == (1, len(b"while away"))  # the tablet will want it

        clock.offset = 3000 + 3601  # now the tablet too
        assert running.run(broker.expire_sessions()) == 1
        assert _sessions_held(running, user) == set()
        assert _stored_disconnect(running, user) == {}
        assert running.call(lambda: (broker.stats.sessions_expired, broker.stats.offline_purged)) == (2, 1)
        assert _queue_size(running, user) == (0, 0)
        assert running.run(broker.expire_sessions()) == 0

        for client_id in (phone, tablet):
            back = _device(running, clients, transport, user, client_id, clock)
            back.connect()
            assert back.session_present is False


def test_expiry_keeps_connected_sessions_however_old(clients: ClientFactory) -> None:
    clock = Clock()
    with BrokerThread(bridge_config(broker={"session_expiry_s": 60}), clock=clock) as running:
        user = unique("alice")
        device = _device(running, clients, "tcp", user, unique("device"), clock)
        device.connect()
        clock.offset = 600
        assert running.run(running.broker.expire_sessions()) == 0
        assert _sessions_held(running, user) == {device.client_id}


def test_the_expiry_sweep_runs_by_itself(clients: ClientFactory) -> None:
    """Every min(60 s, expiry / 10) of loop time, a task named session-expiry sweeps."""
    clock = Clock()
    with BrokerThread(bridge_config(broker={"session_expiry_s": 1.0}), clock=clock) as running:
        tasks = running.call(lambda: {t.get_name() for t in asyncio.all_tasks()})
        assert "session-expiry" in tasks
        user, client_id = unique("alice"), unique("device")
        _use_and_leave(running, clients, "tcp", user, client_id, clock)
        clock.offset += 5
        wait_until(lambda: _sessions_held(running, user) == set(), what="the sweep")
        assert _stored_disconnect(running, user) == {}
        assert running.call(lambda: running.broker.stats.sessions_expired) == 1


def _queue_size(running: BrokerThread, user: str) -> tuple[int, int]:
    store = running.broker.store
    assert store is not None
    return running.run(store.queue_size(user))


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_a_session_that_expired_while_the_broker_was_down_is_not_restored(
    kind: str, clients: ClientFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store: dict[str, Any] = {"path": str(tmp_path / "store.sqlite3")}
    if kind == "redis":
        store["redis_url"] = request.getfixturevalue("redis_url")
    config = bridge_config(store=store, broker={"session_expiry_s": 3600})
    clock = Clock()
    alice, bob = unique("alice"), unique("bob")
    old, recent, bobs = unique("old"), unique("recent"), unique("bobs")
    with BrokerThread(config, clock=clock) as first:
        _use_and_leave(first, clients, "tcp", alice, old, clock)
        _use_and_leave(first, clients, "tcp", bob, bobs, clock)
        clock.offset = 3000
        _use_and_leave(first, clients, "tcp", alice, recent, clock)
        for user in (alice, bob):
            assert first.run(first.broker.send_to_user(user, "alerts", b"queued")).stored is not None
        # Still connected at shutdown: its expiry counts from the shutdown. (Not following the
        # alerts, so the queued one is not replayed to it.)
        staying = _device(first, clients, "tcp", alice, unique("staying"), clock)
        staying.connect()
        assert staying.subscribe(f"user/{alice}/elsewhere", qos=1) == [1]
        shutdown_at = clock()

    clock.offset = 3000 + 1800  # old and bob's gone 4800 s: expired while down; the others 1800 s
    with BrokerThread(config, clock=clock) as second:
        assert _sessions_held(second, alice) == {recent, staying.client_id}
        assert _sessions_held(second, bob) == set()
        stored = _stored_disconnect(second, alice)
        assert set(stored) == {recent, staying.client_id}
        assert stored[staying.client_id] == pytest.approx(shutdown_at, abs=30)
        assert _stored_disconnect(second, bob) == {}
        stats = second.broker.stats
        assert second.call(lambda: (stats.sessions_expired, stats.offline_purged)) == (2, 1)
        assert _queue_size(second, bob) == (0, 0)  # nobody left to replay it to

        gone = _device(second, clients, "tcp", alice, old, clock)
        gone.connect()
        assert gone.session_present is False
        back = _device(second, clients, "tcp", alice, recent, clock)
        back.connect()
        assert back.session_present is True
        assert back.expect(1)[0].payload == b"queued"


def test_a_restarted_broker_keeps_only_the_most_recent_sessions_of_a_user(tmp_path: Path) -> None:
    """Sessions saved before the cap (or a lower one) are trimmed at restore, and an unknown
    disconnect time (a broker that stopped without saying) is taken as the restart's."""
    config = bridge_config(
        store={"path": str(tmp_path / "store.sqlite3")}, limits={"max_sessions_per_user": 2}
    )
    clock = Clock()
    now = clock()
    user = unique("alice")
    records = [
        SessionRecord("d-oldest", user, {"a/#": 1}, disconnected_at=now - 300),
        SessionRecord("d-old", user, {}, disconnected_at=now - 200),
        SessionRecord("d-unknown", user, {}, disconnected_at=None),
        SessionRecord("d-new", user, {}, disconnected_at=now - 100),
    ]

    async def save() -> None:
        store = await SqliteStore.open(Path(config.store.path), QueueLimits())
        try:
            for record in records:
                await store.save_session(record)
        finally:
            await store.close()

    asyncio.run(save())
    with BrokerThread(config, clock=clock) as running:
        assert _sessions_held(running, user) == {"d-unknown", "d-new"}
        assert running.call(lambda: running.broker.stats.sessions_evicted) == 2
        stored = _stored_disconnect(running, user)
        assert set(stored) == {"d-unknown", "d-new"}
        assert stored["d-unknown"] == pytest.approx(now, abs=30)
