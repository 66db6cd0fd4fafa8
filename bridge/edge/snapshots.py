"""Retained snapshots: what a new subscription gets at once, built once and kept.

The broker keeps the last valid tick per topic as its retained snapshot (whatever the
publisher's retain flag) and sends each retained topic matching a SUBSCRIBE's granted
filters once, at the best granted QoS, only to the subscriber's own new subscriptions.
The QoS 0 snapshots of one SUBSCRIBE are one frame and one write; that frame is cached per
(granted filters, zone, transport) until a snapshot changes, each topic's packet per zone
until its tick does, and which topics a filter set selects until a topic appears or goes.
Every cache is bounded (the filters are the clients' choice).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from amqtt.mqtt.constants import QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridge.core.delivery import Encoded, Plan, push_all
from bridge.core.tick import TickParts
from bridge.core.topics import matcher
from bridge.core.versioned_cache import VersionedCache
from bridge.core.wire import publish_qos0, ws_binary_frame
from bridge.edge.session import context_of
from bridge.edge.state import BrokerState

__all__ = ["SnapshotsMixin"]


# Snapshot caches (per filter set; frames also per zone and transport): few entries in
# practice, but filter sets are the clients' choice, so entries and bytes are bounded.
_SNAPSHOT_ENTRIES = 256
_SNAPSHOT_BYTES = 32 << 20


class SnapshotsMixin(BrokerState):
    """Snapshot frames, packets and topic selection for new subscriptions."""

    def _init_snapshots(self) -> None:
        # Retained snapshots per zone: topic -> (the payload they came from, zone -> variant);
        # a tick's are the ones its live fan-out built, so a snapshot in a zone that had
        # subscribers costs nothing more.
        self._retained_variants: dict[str, tuple[bytes, dict[str | None, bytes]]] = {}
        self._retained_packets: dict[str, tuple[bytes, dict[str | None, bytes]]] = {}
        # The last tick per topic in parts, so its snapshot is localised without parsing JSON.
        self._tick_parts: dict[str, TickParts] = {}
        # Retained snapshot frames per (granted filters, zone, transport): valid while
        # _retained_version is what it was when they were built (bumped on every change).
        self._retained_version = 0
        self._snapshot_frames: VersionedCache[tuple[Any, ...], bytes] = VersionedCache(
            max_entries=_SNAPSHOT_ENTRIES, max_bytes=_SNAPSHOT_BYTES
        )
        # Which retained topics each set of granted filters selects, at which QoS: valid
        # while _retained_topics (bumped when a topic appears or goes) is unchanged.
        self._retained_topics = 0
        self._snapshot_members: VersionedCache[tuple[tuple[str, int], ...], list[tuple[str, int]]] = (
            VersionedCache(max_entries=_SNAPSHOT_ENTRIES)
        )

    def _retained_packet(self, topic: str, data: bytes, zone: str | None) -> bytes:
        """The QoS 0 retained PUBLISH of ``topic``'s snapshot in ``zone``, built once per zone."""
        entry = self._retained_packets.get(topic)
        if entry is None or entry[0] is not data:
            entry = self._retained_packets[topic] = (data, {})
        memo = entry[1]
        packet = memo.get(zone)
        if packet is None:
            payload = self._retained_localized(topic, data, zone)
            packet = memo[zone] = publish_qos0(topic.encode(), payload, retain=True)
        return packet

    def _retained_localized(self, topic: str, data: bytes, zone: str | None) -> bytes:
        source, memo = self._retained_variants.get(topic, (None, {}))
        if source is not data:
            memo = {}
            self._retained_variants[topic] = (data, memo)
        parts = self._tick_parts.get(topic)
        if zone is None or parts is None or parts.data is not data:
            return self._localized(topic, data, zone, memo)
        variant = memo.get(zone)
        if variant is None:
            variant = memo[zone] = self._tick_variant(topic, parts, zone)
        return variant

    async def _send_retained(
        self, session: Session, handler: BrokerProtocolHandler, granted: list[tuple[str, int]]
    ) -> None:
        """Each retained topic matching this SUBSCRIBE's granted filters, once, at the best QoS.

        One WebSocket frame may carry many MQTT packets (MQTT 3.1.1 section 6), so the QoS 0
        snapshots (every tick's) are one frame, one append to the outbox and one write; that
        frame is cached per (filters, zone, transport) until a snapshot changes.
        """
        connection = self._connections.get(session.client_id or "")
        outbox = connection.outbox if connection is not None and connection.session is session else None
        if not granted or outbox is None:
            return
        zone = context_of(session).zone
        filters = tuple(granted)
        key = (filters, zone, outbox.websocket)
        cached = self._snapshot_frames.get(key, self._retained_version)
        if cached is not None:
            outbox.push_message(cached)
            return
        packets, acked = self._snapshot_packets(self._snapshot_topics(filters), zone)
        frame = b"".join(packets)
        if frame and outbox.websocket:
            frame = ws_binary_frame(frame)
        if not acked:
            self._snapshot_frames.put(key, self._retained_version, frame, len(frame))
        if frame:
            outbox.push_message(frame)
        target = Plan([((zone, outbox.websocket, QOS_2), [outbox])], 1)
        for topic, data, qos in acked:
            message = Encoded(topic, partial(self._retained_localized, topic, data), retain=True)
            push_all(target, message, qos, conflate=False)

    def _snapshot_packets(
        self, chosen: list[tuple[str, int]], zone: str | None
    ) -> tuple[list[bytes], list[tuple[str, bytes, int]]]:
        """The QoS 0 retained PUBLISHes of ``chosen`` in ``zone`` (each built once per zone and
        kept), and the (topic, payload, QoS) of those sent at QoS 1/2.

        One pass: the packets a zone already has are looked up, the ticks it lacks are
        localised together (the on_deliver_ticks hook) and encoded in a second loop, so a
        cold 500-topic snapshot is not 500 trips through the per-message call chain."""
        retained_messages = self._retained_messages
        cache = self._retained_packets
        packets: list[bytes] = []
        acked: list[tuple[str, bytes, int]] = []
        missing: list[tuple[int, str, bytes]] = []  # (where in packets, topic, payload)
        for topic, granted_qos in chosen:
            retained = retained_messages.get(topic)
            if retained is None:
                continue
            data = bytes(retained.data)
            if granted_qos and retained.qos:
                acked.append((topic, data, min(granted_qos, retained.qos)))
                continue
            entry = cache.get(topic)
            packet = entry[1].get(zone) if entry is not None and entry[0] is data else None
            if packet is None:
                missing.append((len(packets), topic, data))
                packet = b""
            packets.append(packet)
        if missing:
            self._build_retained_packets(missing, zone, packets)
        return packets, acked

    def _build_retained_packets(
        self, missing: list[tuple[int, str, bytes]], zone: str | None, packets: list[bytes]
    ) -> None:
        """Fill ``packets`` at the places ``missing`` names; what :meth:`_retained_packet` does
        for one topic, for many: variants the live fan-out made are reused, the ticks without
        one localised in one hook call."""
        cache = self._retained_packets
        variants = self._retained_variants
        tick_parts = self._tick_parts
        payloads: list[bytes | None] = []
        batch: list[tuple[str, TickParts]] = []
        batched: list[int] = []  # indexes in payloads the batch fills
        for _, topic, data in missing:
            payload = None
            parts = tick_parts.get(topic)
            if zone is None or parts is None or parts.data is not data:
                payload = self._retained_localized(topic, data, zone)
            else:
                known = variants.get(topic)
                if known is not None and known[0] is data:
                    payload = known[1].get(zone)
                if payload is None:
                    batched.append(len(payloads))
                    batch.append((topic, parts))
            payloads.append(payload)
        if batch:
            assert zone is not None
            for index, (topic, parts), variant in zip(
                batched, batch, self.hooks.on_deliver_ticks(batch, zone), strict=True
            ):
                payloads[index] = variant
                known = variants.get(topic)
                if known is None or known[0] is not parts.data:
                    known = variants[topic] = (parts.data, {})
                known[1][zone] = variant
        for (at, topic, data), payload in zip(missing, payloads, strict=True):
            assert payload is not None
            name = topic.encode()
            size = 2 + len(name) + len(payload)
            # publish_qos0(name, payload, retain=True), inline: the usual 2-byte remaining length.
            if 128 <= size < 16384:
                head = bytes((0x31, size & 0x7F | 0x80, size >> 7, len(name) >> 8, len(name) & 0xFF))
                packet = b"".join((head, name, payload))
            else:
                packet = publish_qos0(name, payload, retain=True)
            entry = cache.get(topic)
            if entry is None or entry[0] is not data:
                entry = cache[topic] = (data, {})
            entry[1][zone] = packet
            packets[at] = packet

    def _snapshot_topics(self, filters: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
        """The retained topics ``filters`` select, each once at the best granted QoS."""
        known = self._snapshot_members.get(filters, self._retained_topics)
        if known is not None:
            return known
        chosen = []
        if len(filters) == 1:  # the usual SUBSCRIBE: one filter, compared as a string
            ((topic_filter, qos),) = filters
            selects = matcher(topic_filter)
            chosen = [(topic, qos) for topic in self._retained_messages if selects(topic)]
        else:
            tests = [(matcher(f), q) for f, q in filters]
            for topic in self._retained_messages:
                best = max((q for selects, q in tests if selects(topic)), default=None)
                if best is not None:
                    chosen.append((topic, best))
        self._snapshot_members.put(filters, self._retained_topics, chosen)
        return chosen

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        self._retained_version += 1  # cached snapshot frames are stale
        self._retained_topics += 1  # and maybe which topics there are
