"""MarketSession: amqtt's three session states without a transitions Machine, lean queues."""

from __future__ import annotations

from typing import Any, cast

import pytest
from amqtt.mqtt.protocol import broker_handler
from amqtt.session import ApplicationMessage, Session

from bridge.core.context import ConnectionContext
from bridge.core.hooks import Admitted
from bridge.edge.handler import MarketProtocolHandler
from bridge.edge.lean import LeanQueue
from bridge.edge.session import MarketSession, context_of, install


def test_states_and_callbacks_follow_amqtt() -> None:
    session = MarketSession()
    assert session.transitions.state == "new"
    assert not session.transitions.is_connected()
    session.transitions.connect()
    assert (session.transitions.state, session.last_disconnect_time) == ("connected", None)
    assert session.last_connect_time is not None
    with pytest.raises(ValueError, match="already connected"):
        session.transitions.connect()
    session.transitions.disconnect()
    assert session.transitions.state == "disconnected"
    assert session.last_disconnect_time is not None
    session.transitions.disconnect()  # disconnected -> disconnected is allowed, as in amqtt
    session.transitions.connect()
    assert session.transitions.is_connected()
    assert "state=connected" in repr(session)


def test_offline_session_starts_disconnected() -> None:
    session = MarketSession()
    session.transitions.disconnect()
    assert session.transitions.state == "disconnected"


def test_install_points_amqtt_connect_handling_at_market_session() -> None:
    install()
    # init_from_connect in amqtt 0.12.1 builds Session() by this module-level name.
    assert broker_handler.Session is MarketSession  # type: ignore[attr-defined]


def test_session_queues_are_lean_and_work() -> None:
    session = MarketSession()
    assert isinstance(session.retained_messages, LeanQueue)
    assert isinstance(session.delivered_message_queue, LeanQueue)
    session.retained_messages.put_nowait(ApplicationMessage(None, "a/b", 0, b"x", False))
    assert session.retained_messages_count == 1
    session.clear_queues()
    assert session.retained_messages.empty()


async def test_handler_queues_are_lean() -> None:
    handler = MarketProtocolHandler(cast(Any, None))
    assert isinstance(handler._pending_subscriptions, LeanQueue)
    assert isinstance(handler._pending_unsubscriptions, LeanQueue)


def test_context_of_is_the_sessions_one_context() -> None:
    session = MarketSession()
    context = context_of(session)
    assert context is session.context
    assert context_of(session) is context
    assert (context.user, context.admitted, context.disconnected_at) == (None, False, None)
    context.admit(Admitted("alice", claims="c", policy="p", zone="Africa/Lagos"))
    assert (context.user, context.claims, context.policy, context.zone, context.admitted) == (
        "alice",
        "c",
        "p",
        "Africa/Lagos",
        True,
    )


def test_a_session_amqtt_built_gets_a_context_once() -> None:
    session = Session()
    context = context_of(session)
    assert isinstance(context, ConnectionContext)
    assert context_of(session) is context
