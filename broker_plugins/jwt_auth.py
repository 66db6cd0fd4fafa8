"""Thin amqtt auth plugin: the decision is :func:`bridge.auth.decide_auth`, pure and tested apart,
taken through the broker's :class:`~bridge.token_cache.TokenCache` (a token seen before is not
verified again, its time and username still are).

The token travels in the MQTT password and the username must equal its ``sub``. The plugin
stores the decision (``Claims`` or ``AuthError``) in the session's attributes so the broker
can word the refusal, count it, and derive the session's ACL once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from bridge.auth import AUTH_DECISION, Claims
from bridge.token_cache import TokenCache

__all__ = ["JwtAuthPlugin"]


class JwtAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        # Typed Any: dacite copies these objects through untouched.
        tokens: Any  # TokenCache: the broker's keys, policy and verified tokens
        clock: Any

    async def authenticate(self, *, session: Session) -> bool | None:
        config = self.config
        tokens: TokenCache = config.tokens
        clock: Callable[[], float] = config.clock
        decision = tokens.decide(session.password, session.username, clock())
        session.attributes[AUTH_DECISION] = decision
        return isinstance(decision, Claims)
