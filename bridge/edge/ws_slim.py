"""What an open WebSocket connection keeps from its opening handshake and no longer needs.

websockets 15 keeps, for each connection's lifetime, the handshake request and response
with their headers (~3 KB), and two deques (760 bytes each while empty: frames waiting to
be read, writers waiting for the buffer to drain). Once the connection is open, :func:`slim`
drops the headers and the response, and swaps the deques for lists
(:class:`~bridge.edge.lean.SmallDeque`). The request object itself stays: websockets tells the
handshake from later frames by ``connection.request is None``.
"""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.protocol import State

from bridge.edge.lean import SmallDeque

__all__ = ["slim"]

# Shared by every slimmed request: nothing reads or writes handshake headers once open.
_NO_HEADERS = Headers()


def slim(connection: ServerConnection) -> None:
    """Free an open connection's handshake leftovers (a no-op before the handshake is done)."""
    if connection.protocol.state is not State.OPEN or connection.request is None:
        return
    connection.request.headers = _NO_HEADERS
    connection.response = None
    frames = connection.recv_messages.frames
    if not frames.queue:
        frames.queue = SmallDeque()  # type: ignore[assignment]
    if not connection.drain_waiters:
        connection.drain_waiters = SmallDeque()  # type: ignore[assignment]
