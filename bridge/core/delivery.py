"""The one delivery pipeline: localise once per zone, encode once per group, append to outboxes.

Every message the broker sends to subscribers comes through here: live ticks, retained
snapshots, user messages, wills, service notices, at every QoS. Subscribers are grouped by
what their bytes depend on: the subscriber's time zone (payload variant), whether their
outbox takes WebSocket frames or bare packets, and the QoS they get (the lower of the
publish and subscription QoS [MQTT-3.8.4-6]). Per group the message is encoded once; per
subscriber it is one append to its connection's outbox, which batches and writes.

A :class:`Plan` is a topic's groups, built from the subscription index on the first message
after any change to subscriptions or connections and reused until the next change, so a
tick costs one dict lookup plus one encode per group.

Pure and amqtt-free: QoS levels are ints, an outbox is anything with the :class:`Sink`
methods, and a QoS 1/2 PUBLISH is :class:`AckedPublish`, plain data the outbox completes
with a packet id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from bridge.core.wire import publish_acked_parts, publish_qos0, ws_binary_frame

__all__ = [
    "QOS_0",
    "QOS_1",
    "QOS_2",
    "AckedPublish",
    "Encoded",
    "Pipeline",
    "Plan",
    "Sink",
    "Target",
    "group",
    "push_all",
]

QOS_0: Final = 0
QOS_1: Final = 1
QOS_2: Final = 2


class AckedPublish:
    """A QoS 1 or 2 PUBLISH encoded once: ``head + packet id + tail`` is one connection's copy."""

    __slots__ = ("head", "payload", "qos", "retain", "size", "tail", "topic")

    def __init__(
        self, topic: str, head: bytes, tail: bytes, payload: bytes, *, qos: int = QOS_1, retain: bool = False
    ) -> None:
        self.topic = topic
        self.head = head
        self.tail = tail
        self.payload = payload  # kept for a resend with DUP after reconnecting
        self.qos = qos
        self.retain = retain
        self.size = len(head) + 2 + len(tail)  # bytes on the wire


class Sink(Protocol):
    """What the pipeline needs of a connection's outbox."""

    @property
    def websocket(self) -> bool:
        """True: give it WebSocket frames; False: bare MQTT packets."""

    def push(self, topic: str, data: bytes) -> None:
        """A market QoS 0 message: may be conflated (latest per topic) while the client lags."""

    def push_acked(self, publish: AckedPublish) -> None:
        """A market QoS 1/2 message: may be conflated like QoS 0 while the client lags."""

    def push_message(self, item: bytes | AckedPublish) -> None:
        """A message never conflated (user messages, wills, retained snapshots, notices)."""


# zone -> the message's payload with timestamps in that zone (None: as published).
Localize = Callable[["str | None"], bytes]
GroupKey = tuple["str | None", bool, int]


@dataclass(frozen=True, slots=True)
class Target:
    outbox: Sink
    zone: str | None
    qos: int  # the subscription's QoS


@dataclass(slots=True)
class Plan:
    # (zone, websocket, subscription qos) -> outboxes, one entry per matching subscription
    groups: list[tuple[GroupKey, list[Sink]]] = field(default_factory=list)
    subscribers: int = 0


def group(targets: Iterable[Target]) -> Plan:
    """Targets grouped by what their bytes depend on."""
    plan = Plan()
    groups: dict[GroupKey, list[Sink]] = {}
    for target in targets:
        plan.subscribers += 1
        key = (target.zone, target.outbox.websocket, target.qos)
        groups.setdefault(key, []).append(target.outbox)
    plan.groups = list(groups.items())
    return plan


class Encoded:
    """One message's bytes per (zone, transport, QoS), each variant built on first use."""

    __slots__ = ("_acked", "_localize", "_qos0", "_retain", "_topic_bytes", "topic")

    def __init__(self, topic: str, localize: Localize, *, retain: bool = False) -> None:
        self.topic = topic
        self._topic_bytes = topic.encode()
        self._localize = localize
        self._retain = retain
        self._qos0: dict[tuple[str | None, bool], bytes] = {}
        self._acked: dict[tuple[str | None, bool, int], AckedPublish] = {}

    def qos0(self, zone: str | None, websocket: bool) -> bytes:
        frame = self._qos0.get((zone, websocket))
        if frame is None:
            packet = self._qos0.get((zone, False))
            if packet is None:
                packet = self._qos0[(zone, False)] = publish_qos0(
                    self._topic_bytes, self._localize(zone), retain=self._retain
                )
            frame = self._qos0[(zone, websocket)] = ws_binary_frame(packet) if websocket else packet
        return frame

    def acked(self, zone: str | None, websocket: bool, qos: int) -> AckedPublish:
        key = (zone, websocket, qos)
        publish = self._acked.get(key)
        if publish is None:
            payload = self._localize(zone)
            head, tail = publish_acked_parts(
                self._topic_bytes, payload, qos=qos, retain=self._retain, websocket=websocket
            )
            publish = self._acked[key] = AckedPublish(
                self.topic, head, tail, payload, qos=qos, retain=self._retain
            )
        return publish


def push_all(plan: Plan, message: Encoded, qos: int, *, conflate: bool) -> int:
    """Append ``message`` (published at ``qos``) to every outbox of ``plan``; returns how many.

    ``conflate``: market data, which a lagging client may get only the latest of per topic.
    """
    sent = 0
    for (zone, websocket, sub_qos), outboxes in plan.groups:
        level = sub_qos if sub_qos < qos else qos
        if level == QOS_0:
            frame = message.qos0(zone, websocket)
            if conflate:
                topic = message.topic
                for outbox in outboxes:
                    outbox.push(topic, frame)
            else:
                for outbox in outboxes:
                    outbox.push_message(frame)
        else:
            publish = message.acked(zone, websocket, level)
            for outbox in outboxes:
                if conflate:
                    outbox.push_acked(publish)
                else:
                    outbox.push_message(publish)
        sent += len(outboxes)
    return sent


class Pipeline:
    """Plans per topic, invalidated whenever subscriptions or connections change."""

    def __init__(
        self,
        matching: Callable[[str], Iterable[tuple[Any, int]]],
        resolve: Callable[[Any, int], Target | None],
        *,
        max_plans: int = 100_000,
    ) -> None:
        self._matching = matching
        self._resolve = resolve
        self._plans: dict[str, Plan] = {}
        self._max_plans = max_plans
        self._best: dict[str, list[tuple[Any, int]]] = {}

    def invalidate(self) -> None:
        self._plans.clear()
        self._best.clear()

    def best_per_session(self, topic: str) -> list[tuple[Any, int]]:
        """Every session subscribed to ``topic``, once, with its best QoS (connected or not):
        a burst of user messages to one topic resolves its sessions once."""
        best = self._best.get(topic)
        if best is None:
            per_session: dict[str, tuple[Any, int]] = {}
            for session, sub_qos in self._matching(topic):
                key = session.client_id or ""
                if key not in per_session or per_session[key][1] < sub_qos:
                    per_session[key] = (session, sub_qos)
            best = list(per_session.values())
            if len(self._best) >= self._max_plans:
                self._best.clear()
            self._best[topic] = best
        return best

    def plan(self, topic: str) -> Plan:
        plan = self._plans.get(topic)
        if plan is None:
            resolve = self._resolve
            plan = group(
                target
                for session, sub_qos in self._matching(topic)
                if (target := resolve(session, sub_qos)) is not None
            )
            if len(self._plans) >= self._max_plans:
                self._plans.clear()  # bounded: topics are few in practice, this is a backstop
            self._plans[topic] = plan
        return plan

    def deliver(self, topic: str, qos: int, localize: Localize, *, conflate: bool = True) -> int:
        """``topic``'s message to its planned subscribers; returns how many it was queued for."""
        plan = self.plan(topic)
        if not plan.subscribers:
            return 0
        return push_all(plan, Encoded(topic, localize), qos, conflate=conflate)
