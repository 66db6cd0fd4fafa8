"""Thin amqtt auth plugin: the decision is :func:`bridge.auth.decide_auth`, pure and tested apart.

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

from bridge.auth import AUTH_DECISION, Claims, KeyRing, TokenPolicy, decide_auth

__all__ = ["JwtAuthPlugin"]


class JwtAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        # Typed Any: dacite copies these objects through untouched.
        keys: Any
        policy: Any
        clock: Any

    async def authenticate(self, *, session: Session) -> bool | None:
        config = self.config
        keys: KeyRing = config.keys
        policy: TokenPolicy = config.policy
        clock: Callable[[], float] = config.clock
        decision = decide_auth(session.password, session.username, clock(), keys, policy)
        session.attributes[AUTH_DECISION] = decision
        return isinstance(decision, Claims)
