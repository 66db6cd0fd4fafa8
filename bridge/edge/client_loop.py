"""amqtt's per-connection client loop, waiting on one future instead of four tasks.

amqtt 0.12.1's ``Broker._client_message_loop`` wraps four waits in tasks (disconnect, next
SUBSCRIBE, next UNSUBSCRIBE, next inbound PUBLISH) and ``asyncio.wait``\\s on them: an idle
connection holds four Tasks, seven coroutine frames, their getter futures and the wait's
callbacks, ~4.5 KB. Here one future is parked in the three queues' getter lists (a put
completes it as it would a waiting ``get()``) and on the disconnect future; when it fires,
whatever is queued is handled with amqtt's own ``_handle_*`` methods, then the disconnect.

Order differs from amqtt's in one respect: packets queued before the disconnect are handled
before it (amqtt handled at most one of each, after it), so a PUBLISH followed by DISCONNECT
is routed and a will comes after the client's last messages.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from functools import partial
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

__all__ = ["client_message_loop"]


def _done(loop: asyncio.AbstractEventLoop, result: Any) -> asyncio.Future[Any]:
    """amqtt's ``_handle_*`` methods take the future a wait completed."""
    future = loop.create_future()
    future.set_result(result)
    return future


def _wake(wake: asyncio.Future[None], _: object = None) -> None:
    if not wake.done():
        wake.set_result(None)


async def client_message_loop(broker: Broker, session: Session, handler: BrokerProtocolHandler) -> None:
    """Serve one connection's SUBSCRIBE, UNSUBSCRIBE and inbound PUBLISH until it disconnects."""
    loop = asyncio.get_running_loop()
    disconnect = handler._disconnect_waiter
    queues: tuple[asyncio.Queue[Any], ...] = (
        handler._pending_subscriptions,
        handler._pending_unsubscriptions,
        session.delivered_message_queue,
    )
    subscriptions, unsubscriptions, inbound = queues
    try:
        while True:
            if not subscriptions.empty():
                await broker._handle_subscription(session, handler, _done(loop, subscriptions.get_nowait()))
            elif not unsubscriptions.empty():
                await broker._handle_unsubscription(
                    session, handler, _done(loop, unsubscriptions.get_nowait())
                )
            elif not inbound.empty():
                if not await broker._handle_message_delivery(
                    session, handler, _done(loop, inbound.get_nowait())
                ):
                    return
            elif disconnect is None or disconnect.done():
                await broker._handle_disconnect(session, handler, disconnect or _done(loop, None))
                return
            else:
                # Until something is put on one of the queues or the disconnect completes
                # (inline, not a helper coroutine: one frame less per idle connection).
                wake: asyncio.Future[None] = loop.create_future()
                for queue in queues:
                    # asyncio.Queue wakes its getters by completing the futures in this list.
                    queue._getters.append(wake)  # type: ignore[attr-defined]
                wake_on_done = partial(_wake, wake)
                disconnect.add_done_callback(wake_on_done)
                try:
                    await wake
                finally:
                    disconnect.remove_done_callback(wake_on_done)
                    for queue in queues:
                        with suppress(ValueError):
                            queue._getters.remove(wake)  # type: ignore[attr-defined]
                    del wake, wake_on_done
    except asyncio.CancelledError:
        # As amqtt's loop: a cancelled client loop ends quietly and the caller cleans up.
        return
