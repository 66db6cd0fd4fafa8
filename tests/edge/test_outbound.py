"""Outbound QoS 1/2 (bridge/edge/outbound.py): in flight until acknowledged, re-sent as they were
on reconnect."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import BrokerThread, Client, subscribe_packet, unique
from tests.edge.test_handler import RawClient, puback_packet

ClientFactory = Callable[..., Client]


# --- outbound QoS 1/2: in flight until acknowledged, re-sent as they were on reconnect ---------


def _subscribe_raw(client: RawClient, topic_filter: str, qos: int) -> None:
    client.send(subscribe_packet(1, topic_filter, qos))
    suback = client.read()
    assert (suback.first, suback.body) == (0x90, b"\x00\x01" + bytes([qos]))


def _persistent_phone(broker: BrokerThread, clients: ClientFactory) -> tuple[str, RawClient, Client]:
    """A raw persistent session on ``status/#`` at QoS 2, and a connected publisher."""
    client_id = unique("phone")
    phone = RawClient(broker.tcp_port, role="admin", client_id=client_id, clean=False)
    _subscribe_raw(phone, "status/#", 2)
    publisher = clients(broker.tcp_port)
    publisher.connect()
    return client_id, phone, publisher


def test_unacknowledged_qos1_and_qos2_are_resent_with_their_ids_and_dup_on_reconnect(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    client_id, phone, publisher = _persistent_phone(broker, clients)
    publisher.publish("status/a", b"one", qos=1)
    publisher.publish("status/b", b"two", qos=2)
    one, two = phone.read(), phone.read()
    assert [(p.topic, p.qos, p.dup) for p in (one, two)] == [("status/a", 1, False), ("status/b", 2, False)]
    assert one.packet_id is not None
    assert two.packet_id is not None
    phone.send(b"\x50\x02" + two.packet_id.to_bytes(2, "big"))  # PUBREC: QoS 2 half done
    pubrel = phone.read()
    assert (pubrel.first, pubrel.packet_id) == (0x62, two.packet_id)
    phone.close()  # no PUBACK for "one", no PUBCOMP for "two"

    # Well past amqtt's 5 s give-up would not matter: nothing is timed here, only reconnects.
    back = RawClient(broker.tcp_port, role="admin", client_id=client_id, clean=False)
    assert back.session_present
    again, rel = back.read(), back.read()
    assert (again.kind, again.topic, again.qos, again.dup, again.packet_id, again.payload) == (
        3,
        "status/a",
        1,
        True,  # [MQTT-3.3.1-1]
        one.packet_id,  # [MQTT-4.4.0-1]
        b"one",
    )
    assert (rel.first, rel.packet_id) == (0x62, two.packet_id)
    back.send(puback_packet(one.packet_id) + b"\x70\x02" + two.packet_id.to_bytes(2, "big"))
    assert back.ping() == []
    back.close()
    # Settled: a third connection gets nothing again.
    third = RawClient(broker.tcp_port, role="admin", client_id=client_id, clean=False)
    assert third.ping() == []
    third.close()


def test_a_qos2_message_not_yet_received_is_resent_as_a_publish(
    broker: BrokerThread, clients: ClientFactory
) -> None:
    client_id, phone, publisher = _persistent_phone(broker, clients)
    publisher.publish("status/c", b"three", qos=2)
    first = phone.read()
    phone.close()  # neither PUBREC nor anything else
    back = RawClient(broker.tcp_port, role="admin", client_id=client_id, clean=False)
    again = back.read()
    assert (again.topic, again.qos, again.dup, again.packet_id) == ("status/c", 2, True, first.packet_id)
    assert again.packet_id is not None
    back.send(b"\x50\x02" + again.packet_id.to_bytes(2, "big"))  # PUBREC
    pubrel = back.read()
    assert (pubrel.first, pubrel.packet_id) == (0x62, again.packet_id)
    back.send(b"\x70\x02" + again.packet_id.to_bytes(2, "big"))  # PUBCOMP
    assert back.ping() == []
    back.close()
