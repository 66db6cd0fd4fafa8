"""The user mailbox without a broker: pure rules table-driven, replay over a real SQLite store
and an in-process connection (:class:`Link`) that acknowledges as a test tells it to."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.core.mailbox import (
    FAIR_PAGE,
    STORE_TURNS,
    Mailbox,
    eviction_notice,
    mailbox_packet_id,
    user_topic,
)
from bridge.core.store import NewMessage, OfflineMessage, Priority, QueueLimits
from bridge.errors import MessageError
from bridge.sqlite_store import SqliteStore
from bridge.stats import BrokerStats

NOW = 1000.0


@pytest.mark.parametrize(
    ("user", "topic", "full"),
    [
        ("alice", "alerts", "user/alice/alerts"),
        ("alice", "user/alice/a/b", "user/alice/a/b"),
        ("alice", "user/bob/alerts", None),
        ("", "alerts", None),
        ("a/b", "alerts", None),
        ("alice", "user/alice/", None),
        ("alice", "a/+/b", None),
        ("alice", "a/#", None),
    ],
)
def test_user_topic(user: str, topic: str, full: str | None) -> None:
    if full is None:
        with pytest.raises(MessageError) as raised:
            user_topic(user, topic)
        assert raised.value.reason == "bad_address"
    else:
        assert user_topic(user, topic) == full


@pytest.mark.parametrize(
    ("store_id", "taken", "expected"),
    [
        ("1", set(), 2),
        ("65534", set(), 65535),
        ("65535", set(), 1),  # wraps within 1..65535
        ("7", {8}, 999),  # held by another message in flight: a fresh one
        ("abc", set(), 999),  # not numeric (Redis ids are): a fresh one
    ],
)
def test_mailbox_packet_id(store_id: str, taken: set[int], expected: int) -> None:
    assert mailbox_packet_id(store_id, taken.__contains__, lambda: 999) == expected


def test_eviction_notice_names_every_dropped_message() -> None:
    dropped = (
        OfflineMessage("", "u", "user/u/a", b"x", Priority.LOW, 1, 5.0, 9.0),
        OfflineMessage("3", "u", "user/u/b", b"y", Priority.NORMAL, 1, 4.0, 9.0),
    )
    assert json.loads(eviction_notice("u", dropped)) == {
        "user": "u",
        "reason": "queue_full",
        "evicted": [
            {"topic": "user/u/a", "priority": "LOW", "created_at": 5.0, "new": True},
            {"topic": "user/u/b", "priority": "NORMAL", "created_at": 4.0, "new": False},
        ],
    }


class Link:
    """A connection as the mailbox sees it; ``ack`` decides what the client acknowledges."""

    client_id = "phone"

    def __init__(self, ack: Callable[[OfflineMessage], bool] = lambda _m: True) -> None:
        self.ack = ack
        self.sent: list[tuple[str, bool]] = []  # (store id, dup)
        self.settled: set[str] = set()
        self.resent: dict[str, int] = {}  # store id -> packet id, in flight from a reconnect
        self.gate: asyncio.Event | None = None  # when given, sends wait for it
        self.sending = asyncio.Event()  # set on every send

    def acknowledged(self, store_id: str) -> bool:
        return store_id in self.settled

    def in_flight(self, store_id: str) -> int | None:
        return self.resent.get(store_id)

    async def await_ack(self, packet_id: int) -> None:
        return None

    def publish(
        self, message: OfflineMessage, *, dup: bool, on_ack: Callable[[], None]
    ) -> asyncio.Future[None]:
        self.sent.append((message.id, dup))
        self.sending.set()
        return asyncio.ensure_future(self._acknowledge(message))

    async def _acknowledge(self, message: OfflineMessage) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if not self.ack(message):
            raise ConnectionError("connection closed before PUBACK")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(tmp_path / "mailbox.sqlite3", QueueLimits(100, 1 << 20))
    try:
        yield store
    finally:
        await store.close()


async def _fill(mailbox: Mailbox, user: str, count: int, priority: Priority = Priority.NORMAL) -> list[str]:
    ids = []
    for index in range(count):
        result = await mailbox.enqueue(user, NewMessage(f"user/{user}/m", b"%d" % index, priority))
        assert result.stored is not None
        ids.append(result.stored.id)
    return ids


def _mailbox(store: SqliteStore, window: int = 3) -> Mailbox:
    return Mailbox(store, window=window, clock=lambda: NOW, stats=BrokerStats())


@pytest.mark.timeout(20)
async def test_replay_delivers_in_priority_order_and_empties_the_queue(store: SqliteStore) -> None:
    mailbox = _mailbox(store)
    low = await _fill(mailbox, "u", 2, Priority.LOW)
    urgent = await _fill(mailbox, "u", 2, Priority.URGENT)
    link = Link()
    result = await mailbox.replay("u", link, lambda _t: True, asyncio.Event())
    assert result is not None
    assert result.complete
    assert result.replayed == 4
    assert [i for i, _ in link.sent] == urgent + low
    assert await store.queue_size("u") == (0, 0)


@pytest.mark.timeout(20)
async def test_unacknowledged_messages_stay_and_come_again_with_dup(store: SqliteStore) -> None:
    mailbox = _mailbox(store, window=1)
    ids = await _fill(mailbox, "u", 3)
    first = Link(ack=lambda m: m.id != ids[1])  # the connection drops before the second PUBACK
    result = await mailbox.replay("u", first, lambda _t: True, asyncio.Event())
    assert result is not None
    assert not result.complete
    assert result.replayed == 1
    second = Link()
    await mailbox.replay("u", second, lambda _t: True, asyncio.Event())
    assert second.sent == [(ids[1], True), (ids[2], False)]
    assert await store.queue_size("u") == (0, 0)


@pytest.mark.timeout(20)
async def test_a_message_acknowledged_on_a_resend_is_not_sent_again(store: SqliteStore) -> None:
    mailbox = _mailbox(store)
    ids = await _fill(mailbox, "u", 2)
    link = Link()
    link.settled.add(ids[0])  # PUBACKed after the reconnect resent it
    link.resent[ids[1]] = 42  # still in flight under its original packet id
    await mailbox.replay("u", link, lambda _t: True, asyncio.Event())
    assert link.sent == []
    assert await store.queue_size("u") == (0, 0)


@pytest.mark.timeout(20)
async def test_topics_the_session_does_not_take_stay_stored(store: SqliteStore) -> None:
    mailbox = _mailbox(store)
    await mailbox.enqueue("u", NewMessage("user/u/other", b"x"))
    taken = await _fill(mailbox, "u", 1)
    link = Link()
    await mailbox.replay("u", link, lambda topic: topic == "user/u/m", asyncio.Event())
    assert [i for i, _ in link.sent] == taken
    assert (await store.queue_size("u"))[0] == 1


@pytest.mark.timeout(20)
async def test_the_window_bounds_messages_in_flight_and_wake_sends_new_ones(store: SqliteStore) -> None:
    mailbox = _mailbox(store, window=2)
    await _fill(mailbox, "u", 3)
    link = Link()
    link.gate = asyncio.Event()
    wake = asyncio.Event()
    running = asyncio.create_task(mailbox.replay("u", link, lambda _t: True, wake))
    async with asyncio.timeout(5):
        while len(link.sent) < 2:
            link.sending.clear()
            await link.sending.wait()
    link.sending.clear()
    with pytest.raises(TimeoutError):  # the third waits for a PUBACK
        await asyncio.wait_for(link.sending.wait(), 0.2)
    assert len(link.sent) == 2
    link.gate.set()
    result = await asyncio.wait_for(running, 5)
    assert result is not None
    assert result.replayed == 3


@pytest.mark.timeout(20)
async def test_a_pipelined_replay_sends_each_message_once_in_order(store: SqliteStore) -> None:
    """Acks that land while earlier ones are being removed are not read back as pending."""
    mailbox = _mailbox(store, window=8)
    ids = await _fill(mailbox, "u", 60)
    link = Link()
    result = await mailbox.replay("u", link, lambda _t: True, asyncio.Event())
    assert result is not None
    assert result.complete
    assert link.sent == [(i, False) for i in ids]
    assert result.pages < 60  # read in pages, not per message
    assert await store.queue_size("u") == (0, 0)


@pytest.mark.timeout(60)
async def test_a_huge_queue_delays_a_small_one_by_one_page_at_most(tmp_path: Path) -> None:
    """Six users with 1,000 messages each and one with 5 replay at once (the small one last).
    Four rounds start at once with whole windows; once others wait, each round is one
    FAIR_PAGE: the users who came after the first four had one page each (not a window)
    before the small user had all of its messages."""
    big_store = await SqliteStore.open(tmp_path / "fair.sqlite3", QueueLimits(5000, 1 << 24))
    try:
        mailbox = Mailbox(big_store, window=500, clock=lambda: NOW, stats=BrokerStats())
        bigs = [f"big{i}" for i in range(6)]
        for user in [*bigs, "small"]:
            count = 5 if user == "small" else 1000
            group = [(user, NewMessage(f"user/{user}/m", b"%d" % i)) for i in range(count)]
            await big_store.enqueue_many(group, now=NOW)
        order: list[str] = []

        class Recording(Link):
            def __init__(self, user: str) -> None:
                super().__init__()
                self.user = user

            def publish(
                self, message: OfflineMessage, *, dup: bool, on_ack: Callable[[], None]
            ) -> asyncio.Future[None]:
                order.append(self.user)
                return super().publish(message, dup=dup, on_ack=on_ack)

        replays = [
            asyncio.create_task(mailbox.replay(user, Recording(user), lambda _t: True, asyncio.Event()))
            for user in [*bigs, "small"]
        ]
        results = await asyncio.gather(*replays)
        assert all(result.complete for result in results)
        assert order.count("small") == 5
        before_small_done = order[: len(order) - order[::-1].index("small")]
        late_bigs = bigs[STORE_TURNS:]
        assert [before_small_done.count(user) for user in late_bigs] == [FAIR_PAGE] * len(late_bigs)
        assert all(before_small_done.count(user) <= 500 for user in bigs)
    finally:
        await big_store.close()
