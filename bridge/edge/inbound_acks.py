"""Inbound QoS 1 of one connection: every PUBLISH owes a PUBACK, in the order they came.

Every inbound QoS 1 PUBLISH owes a PUBACK, and PUBACKs leave in the order the PUBLISHes
came ([MQTT-4.6.0-2]) whichever path decided them: ``_owed`` holds them in arrival order
and releases the decided ones at its head. A PUBACK is only written once the message is
stored or delivered, so a publisher that disconnects never loses an acknowledged message
(amqtt acknowledged on queueing). A failed hand-off (store down) gets no PUBACK and ends
the connection: the publisher's library sends it again.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, IncomingApplicationMessage, OutgoingApplicationMessage

__all__ = ["InboundAcksMixin", "Owed"]


class InboundAcksMixin(BrokerProtocolHandler):
    """The handler's owed PUBACKs: recorded, decided, released in order."""

    __slots__ = ()  # the attributes are MarketProtocolHandler's slots

    _release_due: bool

    if TYPE_CHECKING:

        def _push_acks(self, packet_ids: list[int]) -> None: ...
        def end(self, reason: str) -> None: ...

    def _owe(self, packet_id: int, accepted: bool | None) -> Owed:
        entry = Owed(packet_id, accepted)
        self._append_owed(entry)
        return entry

    def _append_owed(self, entry: Owed) -> None:
        owed = self.__dict__.get("_owed_acks")
        if owed is None:
            owed = self.__dict__["_owed_acks"] = deque()
        owed.append(entry)

    @property
    def _owed(self) -> deque[Owed] | None:
        """Inbound QoS 1 PUBLISHes not yet acknowledged, oldest first (None: never any)."""
        owed: deque[Owed] | None = self.__dict__.get("_owed_acks")
        return owed

    def _settle_owed(self, entry: Owed, accepted: bool) -> None:
        """Decided; the PUBACKs now due go out once per event-loop step, in one write."""
        entry.accepted = accepted
        if not self._release_due:
            self._release_due = True
            self._loop.call_soon(self._release_owed)

    def _release_owed(self) -> None:
        """Write the PUBACKs now due (with this step's batch); a refused hand-off ends the connection."""
        self._release_due = False
        owed = self._owed
        if not owed:
            return
        due: list[int] = []
        refused = False
        while owed and owed[0].accepted is not None:
            entry = owed.popleft()
            if entry.accepted:
                due.append(entry.packet_id)
            else:
                refused = True
        if due:
            self._push_acks(due)
        if refused:
            self.end("handoff_failed")

    async def _incoming_qos1(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        """amqtt's inbound QoS 1 (topics other than ``market/`` and ``user/``): queued for the
        broker's client loop, acknowledged on its :meth:`hand_off`, not on queueing."""
        if app_message.packet_id is None or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        entry = self._owed_amqtt(app_message.packet_id, claimed=False)
        if entry is None:  # read by amqtt's own reader: owed from now
            entry = self._owe(app_message.packet_id, None)
            entry.via_amqtt = True
        entry.claimed = True
        await self.session.delivered_message_queue.put(app_message)

    def hand_off(self, message: ApplicationMessage, accepted: bool) -> None:
        """The broker is done with an inbound message that came through amqtt's flow."""
        if message.qos != QOS_1 or message.packet_id is None:
            return
        entry = self._owed_amqtt(message.packet_id, claimed=True)
        if entry is not None:
            self._settle_owed(entry, accepted)

    def _owed_amqtt(self, packet_id: int, *, claimed: bool) -> Owed | None:
        """The oldest undecided entry of amqtt's flow for ``packet_id`` (few: its window)."""
        for entry in self._owed or ():
            if (
                entry.via_amqtt
                and entry.claimed is claimed
                and entry.accepted is None
                and entry.packet_id == packet_id
            ):
                return entry
        return None


class Owed:
    """One inbound QoS 1 PUBLISH's PUBACK: ``accepted`` None until decided."""

    __slots__ = ("accepted", "claimed", "packet_id", "via_amqtt")

    def __init__(self, packet_id: int, accepted: bool | None) -> None:
        self.packet_id = packet_id
        self.accepted = accepted
        self.via_amqtt = False  # decided by the broker's hand_off after amqtt's flow
        self.claimed = False  # amqtt's flow has queued it (so hand_off may decide it)
