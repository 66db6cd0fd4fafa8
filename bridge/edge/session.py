"""A lighter amqtt Session: the same three states without a `transitions` Machine per session.

amqtt builds a `transitions.Machine` for every session (new -> connected <-> disconnected):
about 1 ms of CPU per CONNECT and several KB of memory per connection, for three states.
:class:`SessionState` keeps amqtt's interface (``state``, ``connect()``, ``disconnect()``,
``is_connected()``) and its enter callbacks. The session's two message queues are
:class:`~bridge.edge.lean.LeanQueue` (~6 KB less per connection while they are empty). The
broker-side handler creates :class:`MarketSession` (see :func:`install`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from amqtt.mqtt.protocol import broker_handler
from amqtt.session import ApplicationMessage, IncomingApplicationMessage, OutgoingApplicationMessage, Session

from bridge.core.context import ConnectionContext
from bridge.edge.lean import LeanQueue

__all__ = ["MarketSession", "SessionState", "context_of", "install"]


class SessionState:
    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            # transitions raised MachineError here; amqtt code catches ValueError too.
            raise ValueError("session is already connected")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"

    def is_new(self) -> bool:
        return self.state == "new"


class MarketSession(Session):
    # amqtt's Session.__init__ sets 29 attributes, most to None/False/0: with ours that is
    # past the 30 keys CPython keeps as compact shared-key values, so every session carried
    # a full ~1.6 KB dict. Those defaults live on the class instead (an instance entry
    # appears only when one is set); __init__ makes just the mutable ones.
    remote_address: str | None = None
    remote_port: int | None = None
    client_id: str | None = None
    clean_session: bool | None = None
    will_flag: bool = False
    will_message: bytes | bytearray | None = None
    will_qos: int | None = None
    will_retain: bool | None = None
    will_topic: str | None = None
    keep_alive: int = 0
    publish_retry_delay: int = 0
    broker_uri: str | None = None
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    capath: str | None = None
    cadata: bytes | None = None
    _packet_id: int = 0
    parent: int = 0
    last_connect_time: int | None = None
    ssl_object: Any = None
    last_disconnect_time: int | None = None
    is_anonymous: bool = False

    def __init__(self) -> None:  # amqtt's Session.__init__ on purpose not called (see above)
        self._init_states()
        self.attributes: dict[str, Any] = {}
        self.inflight_out: OrderedDict[int, OutgoingApplicationMessage] = OrderedDict()
        self.inflight_in: OrderedDict[int, IncomingApplicationMessage] = OrderedDict()
        # What the broker decided about this session (owner, claims, ACL, zone, ...), typed.
        self.context = ConnectionContext()
        # amqtt's Session builds two asyncio.Queue objects; an idle connection needs neither.
        self.retained_messages: LeanQueue[ApplicationMessage] = LeanQueue()
        self.delivered_message_queue: LeanQueue[ApplicationMessage] = LeanQueue()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.retained_messages = LeanQueue()
        self.delivered_message_queue = LeanQueue()

    def _init_states(self) -> None:
        self.transitions = SessionState(self)  # type: ignore[assignment]


def context_of(session: Session) -> ConnectionContext:
    """The session's context; one is made for a session amqtt built itself (never admitted)."""
    context = getattr(session, "context", None)
    if not isinstance(context, ConnectionContext):
        context = ConnectionContext()
        session.context = context  # type: ignore[attr-defined]
    return context


def install() -> None:
    """Make amqtt's broker-side CONNECT handling create :class:`MarketSession` objects.

    ``BrokerProtocolHandler.init_from_connect`` (amqtt 0.12.1) builds ``Session()`` by name
    from its module; pointing that name at our subclass is the narrowest hook there is.
    """
    setattr(broker_handler, "Session", MarketSession)  # noqa: B010 - a module global, on purpose
