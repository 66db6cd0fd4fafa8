"""Market fan-out: who gets a topic's ticks, worked out once, and each tick encoded once.

A *plan* per topic lists the matching subscriptions of connected sessions, grouped by what
their bytes depend on: the subscriber's time zone (payload variant), transport (a WebSocket
frame or a bare packet) and subscription QoS. It is built from the topic index on the
first tick after any change to subscriptions or connections and reused for every tick
until the next change, so a tick costs one dict lookup plus, per group, one encode, and per
subscriber one append to its connection's batch.

Subscribers the direct path cannot serve (a compressed WebSocket, sessions without a
connection of ours) are in the plan's ``slow`` part; the broker delivers those through
amqtt. Ticks are published at QoS 0 or 1 on this path (QoS 2 publishes take amqtt's), so a
QoS 2 subscription receives them at the publish QoS and stays direct.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from amqtt.mqtt.constants import QOS_0

from bridge.core.wire import publish_qos0, publish_qos1_parts, ws_binary_frame
from bridge.edge.outbox import Outbox, Qos1Publish

__all__ = ["FanOut", "Plan", "Target"]

# (session, subscription QoS) -> where and how its bytes go, or None to skip it.
Resolve = Callable[[Any, int], "Target | None"]
# zone -> this message's payload with timestamps in that zone (memoised by the caller).
Localize = Callable[["str | None"], bytes]


@dataclass(frozen=True, slots=True)
class Target:
    outbox: Outbox | None  # None: deliver through amqtt (the plan's slow part)
    zone: str | None
    qos: int


@dataclass(slots=True)
class Plan:
    # (zone, websocket, subscription qos) -> outboxes, one entry per matching subscription
    groups: list[tuple[tuple[str | None, bool, int], list[Outbox]]] = field(default_factory=list)
    slow: list[tuple[Any, int]] = field(default_factory=list)
    subscribers: int = 0


class FanOut:
    """Plans per topic, invalidated whenever subscriptions or connections change."""

    def __init__(
        self,
        matching: Callable[[str], Iterable[tuple[Any, int]]],
        resolve: Resolve,
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
        """Every session subscribed to ``topic``, once, with its best QoS (connected or not)."""
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
            plan = self._build(topic)
            if len(self._plans) >= self._max_plans:
                self._plans.clear()  # bounded: topics are few in practice, this is a backstop
            self._plans[topic] = plan
        return plan

    def _build(self, topic: str) -> Plan:
        plan = Plan()
        groups: dict[tuple[str | None, bool, int], list[Outbox]] = {}
        for session, sub_qos in self._matching(topic):
            target = self._resolve(session, sub_qos)
            if target is None:
                continue
            plan.subscribers += 1
            if target.outbox is None:
                plan.slow.append((session, sub_qos))
                continue
            key = (target.zone, target.outbox.websocket, target.qos)
            groups.setdefault(key, []).append(target.outbox)
        plan.groups = list(groups.items())
        return plan

    def deliver(self, plan: Plan, topic: str, qos: int, localize: Localize) -> int:
        """Queue ``data`` (published at QoS 0 or 1) on every direct subscriber; returns how many.

        Each gets it at the lower of the publish and subscription QoS [MQTT-3.8.4-6].
        """
        qos0: dict[tuple[str | None, bool], bytes] = {}
        qos1: dict[tuple[str | None, bool], Qos1Publish] = {}
        topic_bytes = topic.encode()
        sent = 0
        for (zone, websocket, sub_qos), outboxes in plan.groups:
            if QOS_0 in (sub_qos, qos):
                frame = qos0.get((zone, websocket))
                if frame is None:
                    packet = qos0.get((zone, False))
                    if packet is None:
                        packet = qos0[(zone, False)] = publish_qos0(topic_bytes, localize(zone))
                    frame = qos0[(zone, websocket)] = ws_binary_frame(packet) if websocket else packet
                for outbox in outboxes:
                    outbox.push(topic, frame)
            else:
                publish = qos1.get((zone, websocket))
                if publish is None:
                    payload = localize(zone)
                    head, tail = publish_qos1_parts(topic_bytes, payload, websocket=websocket)
                    publish = qos1[(zone, websocket)] = Qos1Publish(topic, head, tail, payload)
                for outbox in outboxes:
                    outbox.push_qos1(publish)
            sent += len(outboxes)
        return sent
