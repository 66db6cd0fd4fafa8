"""bridge.core.connection: the table is the connection's life, checked as properties."""

from __future__ import annotations

import itertools

import pytest

from bridge.core.connection import TRANSITIONS, Duties, Event, IllegalTransition, Lifecycle, State, advance

REACHABLE_BY = {
    State.CONNECTING: [],
    State.AUTHENTICATING: [Event.CONNECT_READ],
    State.ADMITTED: [Event.CONNECT_READ, Event.ADMITTED],
    State.LIVE: [Event.CONNECT_READ, Event.ADMITTED, Event.CONNACK_SENT],
}


def _run(events: list[Event]) -> tuple[State, list[Duties]]:
    life = Lifecycle()
    return life.state, ([life.fire(event) for event in events] and []) or []


def _walk(events: list[Event]) -> tuple[State, Duties]:
    """Fire ``events``; the final state and the sum of the duties along the way."""
    life = Lifecycle()
    total = {"release_slot": 0, "publish_will": 0, "leave_fanout": 0}
    for event in events:
        duties = life.fire(event)
        for name in total:
            total[name] += getattr(duties, name)
    assert all(count <= 1 for count in total.values()), f"a duty owed twice: {events} {total}"
    return life.state, Duties(**{name: bool(count) for name, count in total.items()})


@pytest.mark.parametrize("state", list(REACHABLE_BY), ids=lambda s: s.value)
@pytest.mark.parametrize(
    "end", [Event.SOCKET_CLOSED, Event.PROTOCOL_ERROR, Event.CLOSED_BY_BROKER], ids=lambda e: e.value
)
def test_a_client_that_vanishes_at_any_moment_leaves_nothing_behind(state: State, end: Event) -> None:
    events = [*REACHABLE_BY[state], end]
    final, duties = _walk(events)
    if final is State.DRAINING:
        final, more = _walk([*events, Event.RELEASED])
        duties = Duties(*(a or b for a, b in zip(_fields(duties), _fields(more), strict=True)))
    assert final is State.CLOSED
    admitted = state in (State.ADMITTED, State.LIVE)
    # The slot is given back exactly when one was taken; the fan-out left when joined.
    assert duties.release_slot is admitted
    assert duties.leave_fanout is (state is State.LIVE)
    # [MQTT-3.1.2-8]: the will goes when an accepted session ends without DISCONNECT, unless
    # the broker itself ended it (expiry, takeover, shutdown).
    assert duties.publish_will is (admitted and end is not Event.CLOSED_BY_BROKER)


def _fields(duties: Duties) -> tuple[bool, bool, bool]:
    return duties.release_slot, duties.publish_will, duties.leave_fanout


def test_a_goodbye_owes_no_will() -> None:
    final, duties = _walk([*REACHABLE_BY[State.LIVE], Event.DISCONNECT_PACKET, Event.RELEASED])
    assert (final, duties) == (State.CLOSED, Duties(release_slot=True, leave_fanout=True))


def test_every_sequence_of_events_ends_closed_or_is_refused_as_our_bug() -> None:
    """Exhaustively, up to six events: a legal sequence never owes a duty twice, and from
    wherever it stops, the socket closing and the broker releasing end it in CLOSED."""
    events = list(Event)
    for length in range(7):
        for sequence in itertools.product(events, repeat=length):
            life = Lifecycle()
            try:
                for event in sequence:
                    life.fire(event)
            except IllegalTransition:
                continue
            state, _ = _walk(list(sequence))
            state_after, _ = advance(state, Event.SOCKET_CLOSED)
            if state_after is State.DRAINING:
                state_after, _ = advance(state_after, Event.RELEASED)
            assert state_after is State.CLOSED, sequence


def test_nothing_leaves_closed() -> None:
    assert Event.RELEASED not in {event for (state, event) in TRANSITIONS if state is State.CLOSED}
    assert all(
        after is State.CLOSED for (state, _), (after, _) in TRANSITIONS.items() if state is State.CLOSED
    )


def test_an_event_the_table_does_not_allow_is_our_bug() -> None:
    life = Lifecycle()
    with pytest.raises(IllegalTransition, match="connack_sent in state connecting"):
        life.fire(Event.CONNACK_SENT)
    assert life.state is State.CONNECTING
