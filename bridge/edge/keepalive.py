"""Keep-alive and token expiry of one connection, on one timer.

[MQTT-3.1.2-24]: no packet within 1.5 x keep-alive means the client is gone (its will is
published); a token's ``exp`` ends the connection without a will. One timer per connection
serves both deadlines (two TimerHandles, each with its own copied Context, cost an idle
connection ~300 bytes).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from bridge.edge.lean import TIMER_CONTEXT

__all__ = ["KeepAliveMixin"]


class KeepAliveMixin(BrokerProtocolHandler):
    """The handler's watchdog: keep-alive and token expiry."""

    __slots__ = ()  # the attributes are MarketProtocolHandler's slots

    _watchdog: asyncio.TimerHandle | None
    _keepalive: float
    _expires_at: float | None
    _last_read: float

    if TYPE_CHECKING:

        def end(self, reason: str) -> None: ...

    def expire_at(self, deadline: float) -> None:
        """End the connection as ``token_expired`` (no will) at ``deadline`` (loop time)."""
        self._expires_at = deadline
        self._rearm()

    def _arm_watchdog(self) -> None:
        keepalive = self.session.keep_alive if self.session is not None else 0
        if keepalive and keepalive > 0:
            self._keepalive = float(keepalive)
            self._last_read = self._loop.time()
            self._rearm()

    def _rearm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        due = self._expires_at
        if self._keepalive:
            keepalive_due = self._last_read + self._keepalive
            due = keepalive_due if due is None else min(due, keepalive_due)
        self._watchdog = None if due is None else self._loop.call_at(due, self._check, context=TIMER_CONTEXT)

    def _check(self) -> None:
        self._watchdog = None
        now = self._loop.time()
        if self._expires_at is not None and now >= self._expires_at:
            self._expires_at = None
            if self.session is not None:
                self.session.will_flag = False  # the client did nothing wrong on the network
            self.end("token_expired")
        elif self._keepalive and now - self._last_read >= self._keepalive:
            self.handle_read_timeout()
        else:
            self._rearm()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._expires_at = None
        self._keepalive = 0.0
