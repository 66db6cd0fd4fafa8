"""The delivery pipeline without a broker: who gets what, at which QoS, encoded how often.

Outboxes here are :class:`Recorder`, a real implementation of the ``Sink`` protocol that
keeps what it is given; the wire bytes are checked against bridge/core/wire.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from bridge.core.delivery import (
    QOS_0,
    QOS_1,
    QOS_2,
    AckedPublish,
    Encoded,
    Pipeline,
    Sink,
    Target,
    group,
    push_all,
)
from bridge.core.wire import publish_acked_parts, publish_qos0, ws_binary_frame

TOPIC = "market/luno/BTC-ZAR"


@dataclass(eq=False)
class Recorder:
    websocket: bool = False
    market: list[tuple[str, bytes | AckedPublish]] = field(default_factory=list)
    messages: list[bytes | AckedPublish] = field(default_factory=list)

    def push(self, topic: str, data: bytes) -> None:
        self.market.append((topic, data))

    def push_acked(self, publish: AckedPublish) -> None:
        self.market.append((publish.topic, publish))

    def push_message(self, item: bytes | AckedPublish) -> None:
        self.messages.append(item)


def localizer(calls: Counter[str | None]) -> Callable[[str | None], bytes]:
    def localize(zone: str | None) -> bytes:
        calls[zone] += 1
        return b"payload" if zone is None else f"payload@{zone}".encode()

    return localize


def test_a_recorder_is_a_sink() -> None:
    sink: Sink = Recorder()
    assert sink.websocket is False


@pytest.mark.parametrize(
    ("publish_qos", "sub_qos", "delivered_qos"),
    [(p, s, min(p, s)) for p in (QOS_0, QOS_1, QOS_2) for s in (QOS_0, QOS_1, QOS_2)],
)
def test_each_subscriber_gets_the_lower_of_publish_and_subscription_qos(
    publish_qos: int, sub_qos: int, delivered_qos: int
) -> None:
    outbox = Recorder()
    message = Encoded(TOPIC, lambda zone: b"x")
    assert push_all(group([Target(outbox, None, sub_qos)]), message, publish_qos, conflate=True) == 1
    ((topic, item),) = outbox.market
    assert topic == TOPIC
    if delivered_qos == QOS_0:
        assert item == publish_qos0(TOPIC.encode(), b"x")
    else:
        assert isinstance(item, AckedPublish)
        assert item.qos == delivered_qos
        assert (item.head, item.tail) == publish_acked_parts(
            TOPIC.encode(), b"x", qos=delivered_qos, websocket=False
        )


@pytest.mark.parametrize(
    ("retain", "websocket", "qos"),
    [(r, w, q) for r in (False, True) for w in (False, True) for q in (QOS_0, QOS_1, QOS_2)],
)
def test_bytes_per_transport_and_retain_flag(retain: bool, websocket: bool, qos: int) -> None:
    outbox = Recorder(websocket=websocket)
    message = Encoded(TOPIC, lambda zone: b"{}", retain=retain)
    push_all(group([Target(outbox, None, qos)]), message, qos, conflate=False)
    (item,) = outbox.messages
    if qos == QOS_0:
        packet = publish_qos0(TOPIC.encode(), b"{}", retain=retain)
        assert item == (ws_binary_frame(packet) if websocket else packet)
    else:
        assert isinstance(item, AckedPublish)
        assert (item.head, item.tail, item.retain) == (
            *publish_acked_parts(TOPIC.encode(), b"{}", qos=qos, retain=retain, websocket=websocket),
            retain,
        )


def test_localised_once_per_zone_and_encoded_once_per_group() -> None:
    calls: Counter[str | None] = Counter()
    zones = [None, "Africa/Lagos", "Africa/Lagos", "UTC", None, "UTC"]
    outboxes = [Recorder(websocket=n % 2 == 0) for n in range(len(zones) * 4)]
    targets = [Target(o, zones[n % len(zones)], QOS_0) for n, o in enumerate(outboxes)]
    message = Encoded(TOPIC, localizer(calls))
    assert push_all(group(targets), message, QOS_0, conflate=True) == len(outboxes)
    assert calls == {None: 1, "Africa/Lagos": 1, "UTC": 1}
    frames: dict[tuple[str | None, bool], bytes | AckedPublish] = {}
    for target in targets:
        ((_, data),) = target.outbox.market  # type: ignore[attr-defined]
        key = (target.zone, target.outbox.websocket)
        assert frames.setdefault(key, data) is data, "one object per (zone, transport)"
    assert frames[("UTC", False)] == publish_qos0(TOPIC.encode(), b"payload@UTC")


def test_qos1_and_qos2_subscribers_share_one_payload_variant_per_zone() -> None:
    calls: Counter[str | None] = Counter()
    a, b, c = Recorder(), Recorder(), Recorder()
    plan = group([Target(a, "UTC", QOS_1), Target(b, "UTC", QOS_2), Target(c, "UTC", QOS_0)])
    push_all(plan, Encoded(TOPIC, localizer(calls)), QOS_2, conflate=False)
    assert [type(x.messages[0]).__name__ for x in (a, b, c)] == ["AckedPublish", "AckedPublish", "bytes"]
    assert [getattr(x.messages[0], "qos", 0) for x in (a, b, c)] == [1, 2, 0]
    assert calls["UTC"] == 3  # once per distinct packet; the caller memoises the payload per zone


@pytest.mark.parametrize(("conflate", "market", "messages"), [(True, 2, 0), (False, 0, 2)])
def test_conflatable_market_data_and_never_conflated_messages_go_to_their_own_queues(
    conflate: bool, market: int, messages: int
) -> None:
    outbox = Recorder()
    plan = group([Target(outbox, None, QOS_0), Target(outbox, None, QOS_1)])  # overlapping filters
    push_all(plan, Encoded(TOPIC, lambda zone: b"x"), QOS_1, conflate=conflate)
    assert (len(outbox.market), len(outbox.messages)) == (market, messages)


def test_plans_are_cached_until_invalidated() -> None:
    first, second = Recorder(), Recorder()
    subscribers: list[tuple[Recorder, int]] = [(first, QOS_0)]
    built: list[str] = []

    def matching(topic: str) -> list[tuple[Recorder, int]]:
        built.append(topic)
        return list(subscribers)

    pipeline = Pipeline(matching, lambda outbox, qos: Target(outbox, None, qos))
    assert pipeline.deliver(TOPIC, QOS_0, lambda zone: b"1") == 1
    subscribers.append((second, QOS_0))
    assert pipeline.deliver(TOPIC, QOS_0, lambda zone: b"2") == 1  # the cached plan
    pipeline.invalidate()
    assert pipeline.deliver(TOPIC, QOS_0, lambda zone: b"3") == 2
    assert built == [TOPIC, TOPIC]
    assert len(first.market) == 3
    assert len(second.market) == 1


def test_unresolved_subscribers_are_left_out() -> None:
    live, gone = Recorder(), Recorder()
    pipeline = Pipeline(
        lambda topic: [(live, QOS_0), (gone, QOS_1)],
        lambda outbox, qos: None if outbox is gone else Target(outbox, None, qos),
    )
    plan = pipeline.plan(TOPIC)
    assert plan.subscribers == 1
    assert pipeline.deliver(TOPIC, QOS_1, lambda zone: b"x") == 1
    assert not gone.market


def test_no_subscribers_no_encoding() -> None:
    calls: Counter[str | None] = Counter()
    pipeline = Pipeline(lambda topic: [], lambda outbox, qos: None)
    assert pipeline.deliver(TOPIC, QOS_0, localizer(calls)) == 0
    assert not calls


def test_plans_are_bounded() -> None:
    pipeline = Pipeline(lambda topic: [], lambda outbox, qos: None, max_plans=3)
    for n in range(10):
        pipeline.plan(f"market/x/T{n}-ZAR")
    assert len(pipeline._plans) <= 3


@dataclass(frozen=True)
class _Session:
    client_id: str


def test_best_per_session_takes_each_sessions_highest_qos_once_until_invalidated() -> None:
    a, b = _Session("a"), _Session("b")
    matched: list[tuple[_Session, int]] = [(a, QOS_0), (b, QOS_1), (a, QOS_1)]
    calls: list[str] = []

    def matching(topic: str) -> list[tuple[_Session, int]]:
        calls.append(topic)
        return list(matched)

    pipeline = Pipeline(matching, lambda outbox, qos: None, max_plans=2)
    assert pipeline.best_per_session("user/u/x") == [(a, QOS_1), (b, QOS_1)]
    matched.append((b, 2))
    assert pipeline.best_per_session("user/u/x") == [(a, QOS_1), (b, QOS_1)]  # cached
    pipeline.invalidate()
    assert pipeline.best_per_session("user/u/x") == [(a, QOS_1), (b, 2)]
    assert calls == ["user/u/x", "user/u/x"]
    for n in range(5):
        pipeline.best_per_session(f"user/u/{n}")
    assert len(pipeline._best) <= 2
