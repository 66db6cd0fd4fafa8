"""The broker's WebSocket connection: websockets' own, with bounds on what a client can queue.

websockets answers every ping with a pong by itself, written straight to the transport with
no back-pressure. A client that sends pings and never reads grows the broker's memory
without limit (1M pings in 6 s: +120 MB, before any login). So:

- before the CONNECT is accepted, a connection may send at most :data:`PREAUTH_PINGS` pings
  and the largest message it may send is the CONNECT budget (a few KB plus the largest
  token); more closes it;
- always: when bytes the client has not read pass ``max_unsent`` (small before login; after
  it, room for the broker's own bounded output plus slack), the client is not consuming what
  its own frames cause and the connection is aborted.
"""

from __future__ import annotations

from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

__all__ = ["PREAUTH_PINGS", "PREAUTH_UNSENT", "MqttWsConnection", "connection_class"]

PREAUTH_PINGS = 16
# Before login the broker sends nothing but pongs (and the handshake, already gone).
PREAUTH_UNSENT = 16 * 1024


class MqttWsConnection(ServerConnection):
    """``create_connection`` for ``websockets.serve`` (see module docstring)."""

    # Class defaults: an idle connection carries no per-instance copies of these.
    authenticated = False
    pings = 0
    max_unsent = PREAUTH_UNSENT
    overrun: str | None = None
    connect_budget = 16 * 1024  # set per listener by connection_class()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_message = self.protocol.max_size
        self.protocol.max_size = self.connect_budget

    def accept(self, max_unsent: int) -> None:
        """The CONNECT was accepted: full message size, the post-login bound on unread bytes."""
        self.authenticated = True
        self.protocol.max_size = self._max_message
        self.max_unsent = max_unsent

    def process_event(self, event: Event) -> None:
        if not self.authenticated and isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pings += 1
            if self.pings > PREAUTH_PINGS:
                self._abort(f"more than {PREAUTH_PINGS} pings before CONNECT")
                return
        super().process_event(event)

    def data_received(self, data: bytes) -> None:
        if self.overrun is not None:
            return
        super().data_received(data)
        unsent = self.transport.get_write_buffer_size()
        if unsent > self.max_unsent:
            self._abort(f"{unsent} bytes unread by the client")

    def _abort(self, why: str) -> None:
        if self.overrun is None:
            self.overrun = why
            self.transport.abort()


def connection_class(connect_budget: int) -> type[MqttWsConnection]:
    """The connection class for one listener, whose CONNECT may take ``connect_budget`` bytes."""
    return type("MqttWsConnection", (MqttWsConnection,), {"connect_budget": connect_budget})
