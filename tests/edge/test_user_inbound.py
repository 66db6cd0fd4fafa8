"""UserInbound: one connection's PUBLISHes to user/..., decided once per topic; no broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from bridge.edge.user_inbound import MAX_TOPICS, UserInbound

pytestmark = pytest.mark.timeout(10)


def _settle(_stored: bool) -> None:
    pass


class Recorder:
    """The callbacks a broker would give, recording what reached them."""

    def __init__(self, *, allowed: bool = True, dropped_by_sender: bool = False) -> None:
        self.allowed = allowed
        self.dropped_by_sender = dropped_by_sender
        self.acl_checks: list[str] = []
        self.sent: list[tuple[str, bytes, int]] = []
        self.settles: list[Callable[[bool], None]] = []
        self.dropped: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    def may_publish(self, topic: str) -> bool:
        self.acl_checks.append(topic)
        return self.allowed

    def send(self, topic: str, payload: bytes, qos: int, settle: Callable[[bool], None]) -> bool:
        self.sent.append((topic, payload, qos))
        self.settles.append(settle)
        return self.dropped_by_sender  # True: done at once, nothing to wait for

    def inbound(self, max_topic: int = 64) -> UserInbound:
        return UserInbound(
            "svc",
            max_topic=max_topic,
            may_publish=self.may_publish,
            send=self.send,
            dropped=self.dropped,
            received=self.received,
        )


@pytest.mark.parametrize(
    ("topic", "allowed", "verdict", "dropped"),
    [
        ("user/bob/fills", True, "pending", None),
        ("user/bob/fills", False, True, "acl"),
        ("user/bob/" + "x" * 100, True, True, "topic_too_long"),
        ("user/bob/+", True, False, "invalid_topic"),
        ("user/bob/#", True, False, "invalid_topic"),
        ("user/bob/a\x00", True, False, "invalid_topic"),
    ],
)
def test_take_decides_each_topic(topic: str, allowed: bool, verdict: Any, dropped: str | None) -> None:
    recorder = Recorder(allowed=allowed)
    got = recorder.inbound().take(topic, b"p", 1, _settle)
    if verdict == "pending":
        assert got is None
        assert recorder.sent == [(topic, b"p", 1)]
        assert recorder.settles == [_settle]
    else:
        assert got is verdict
        assert recorder.sent == []
    assert recorder.dropped == (Counter({dropped: 1}) if dropped else Counter())
    assert recorder.received == Counter(user=1)


def test_a_topic_is_checked_once_and_every_refusal_counted() -> None:
    recorder = Recorder(allowed=False)
    inbound = recorder.inbound()
    assert [inbound.take("user/bob/x", b"p", 1, _settle) for _ in range(3)] == [True, True, True]
    assert recorder.acl_checks == ["user/bob/x"]
    assert recorder.dropped == Counter(acl=3)


def test_the_topic_memory_is_bounded() -> None:
    recorder = Recorder()
    inbound = recorder.inbound()
    for index in range(MAX_TOPICS + 1):
        inbound.take(f"user/u{index}/x", b"p", 1, _settle)
    inbound.take("user/u0/x", b"p", 1, _settle)  # forgotten when the memory started again: checked again
    assert len(recorder.acl_checks) == MAX_TOPICS + 2


def test_a_message_the_sender_drops_needs_no_wait() -> None:
    recorder = Recorder(dropped_by_sender=True)
    assert recorder.inbound().take("user/bob/x", b"not an envelope", 0, _settle) is True
    assert recorder.sent == [("user/bob/x", b"not an envelope", 0)]
