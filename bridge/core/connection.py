"""One client connection's life, written as a table: states, the events that move it, and
what each move obliges the broker to do.

Pure data and one small class; the broker reports events and carries out the obligations.
Reading the table answers "what happens if the client vanishes now?" for every moment of a
connection, and the tests check it as a property: from any state, a closed socket leads to
CLOSED with every resource taken back (the connection slot, the fan-out entry) and the will
published exactly when MQTT says so ([MQTT-3.1.2-8]).

::

    CONNECTING --connect_read--> AUTHENTICATING --admitted--> ADMITTED --connack_sent--> LIVE
        |                            |                           |                        |
        +-- socket_closed,           +-- refused, socket_closed  +-- socket_closed ...    +-- disconnect_packet,
            protocol_error,              protocol_error              (will: yes)              socket_closed, ...
            timeout --> CLOSED           --> CLOSED                                            --> DRAINING
                                                                                         DRAINING --released--> CLOSED
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from bridge.errors import MarketBridgeError

__all__ = ["TRANSITIONS", "Duties", "Event", "IllegalTransition", "Lifecycle", "State", "advance"]


class State(Enum):
    CONNECTING = "connecting"  # socket open, no CONNECT yet (pre-login budget applies)
    AUTHENTICATING = "authenticating"  # CONNECT read, token being checked; nothing touched
    ADMITTED = "admitted"  # slot (lease) held, session adopted, CONNACK not yet written
    LIVE = "live"  # CONNACK written: in the fan-out, reading packets
    DRAINING = "draining"  # ending: will decided, session being released
    CLOSED = "closed"  # nothing of it is left in the broker


class Event(Enum):
    CONNECT_READ = "connect_read"
    REFUSED = "refused"  # CONNACK with a refusal code (auth, limits, will)
    ADMITTED = "admitted"
    CONNACK_SENT = "connack_sent"
    DISCONNECT_PACKET = "disconnect_packet"  # the client said goodbye: no will
    SOCKET_CLOSED = "socket_closed"  # gone without DISCONNECT: will
    PROTOCOL_ERROR = "protocol_error"  # we close it: will
    TIMEOUT = "timeout"  # no CONNECT in time, or keep-alive: will once admitted
    CLOSED_BY_BROKER = "closed_by_broker"  # token expiry, takeover, shutdown: no will
    RELEASED = "released"  # the broker has taken everything back


@dataclass(frozen=True, slots=True)
class Duties:
    """What a move obliges the broker to do."""

    release_slot: bool = False  # give the connection lease back
    publish_will: bool = False
    leave_fanout: bool = False


_NONE = Duties()
_ABANDON = Duties(release_slot=True, publish_will=True)  # admitted, CONNACK never written
_GONE = Duties(release_slot=True, publish_will=True, leave_fanout=True)
_GOODBYE = Duties(release_slot=True, leave_fanout=True)

# (state, event) -> (next state, duties). Anything else is a bug of ours: IllegalTransition.
TRANSITIONS: Mapping[tuple[State, Event], tuple[State, Duties]] = {
    (State.CONNECTING, Event.CONNECT_READ): (State.AUTHENTICATING, _NONE),
    (State.CONNECTING, Event.SOCKET_CLOSED): (State.CLOSED, _NONE),
    (State.CONNECTING, Event.PROTOCOL_ERROR): (State.CLOSED, _NONE),
    (State.CONNECTING, Event.TIMEOUT): (State.CLOSED, _NONE),
    (State.CONNECTING, Event.CLOSED_BY_BROKER): (State.CLOSED, _NONE),
    (State.AUTHENTICATING, Event.REFUSED): (State.CLOSED, _NONE),
    (State.AUTHENTICATING, Event.ADMITTED): (State.ADMITTED, _NONE),
    (State.AUTHENTICATING, Event.SOCKET_CLOSED): (State.CLOSED, _NONE),
    (State.AUTHENTICATING, Event.PROTOCOL_ERROR): (State.CLOSED, _NONE),
    (State.AUTHENTICATING, Event.CLOSED_BY_BROKER): (State.CLOSED, _NONE),
    # An accepted session whose CONNACK could not be written ended without DISCONNECT.
    (State.ADMITTED, Event.CONNACK_SENT): (State.LIVE, _NONE),
    (State.ADMITTED, Event.SOCKET_CLOSED): (State.DRAINING, _ABANDON),
    (State.ADMITTED, Event.PROTOCOL_ERROR): (State.DRAINING, _ABANDON),
    (State.ADMITTED, Event.CLOSED_BY_BROKER): (State.DRAINING, Duties(release_slot=True)),
    (State.LIVE, Event.DISCONNECT_PACKET): (State.DRAINING, _GOODBYE),
    (State.LIVE, Event.SOCKET_CLOSED): (State.DRAINING, _GONE),
    (State.LIVE, Event.PROTOCOL_ERROR): (State.DRAINING, _GONE),
    (State.LIVE, Event.TIMEOUT): (State.DRAINING, _GONE),
    (State.LIVE, Event.CLOSED_BY_BROKER): (State.DRAINING, _GOODBYE),
    (State.DRAINING, Event.RELEASED): (State.CLOSED, _NONE),
}
# Once ending, a later report of how it ended (the socket, a takeover's timeout, shutdown)
# changes nothing and owes nothing.
_ENDS = (
    Event.DISCONNECT_PACKET,
    Event.SOCKET_CLOSED,
    Event.PROTOCOL_ERROR,
    Event.TIMEOUT,
    Event.CLOSED_BY_BROKER,
)
TRANSITIONS = {
    **TRANSITIONS,
    **{(State.DRAINING, end): (State.DRAINING, _NONE) for end in _ENDS},
    **{(State.CLOSED, end): (State.CLOSED, _NONE) for end in _ENDS},
}


class IllegalTransition(MarketBridgeError):
    """Our bug: the broker reported an event the table does not allow in this state."""

    def __init__(self, state: State, event: Event) -> None:
        self.state = state
        self.event = event
        super().__init__(f"connection event {event.value} in state {state.value}")


def advance(state: State, event: Event) -> tuple[State, Duties]:
    """The move ``event`` makes from ``state``; :class:`IllegalTransition` if there is none."""
    move = TRANSITIONS.get((state, event))
    if move is None:
        raise IllegalTransition(state, event)
    return move


class Lifecycle:
    """A connection's position in :data:`TRANSITIONS`; ``fire`` returns the move's duties."""

    __slots__ = ("state",)

    def __init__(self, state: State = State.CONNECTING) -> None:
        self.state = state

    def fire(self, event: Event) -> Duties:
        self.state, duties = advance(self.state, event)
        return duties

    @property
    def live(self) -> bool:
        return self.state is State.LIVE
