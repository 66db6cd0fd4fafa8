"""A connection's context: what the broker decided about it, typed, in one record.

Replaces the string keys the broker kept in amqtt's ``session.attributes`` (owner, ACL,
claims, zone, disconnect time). One context per session record, reached through the
session (``bridge.edge.session.context_of``); the auth plugin fills ``user``, ``claims``,
``policy`` and ``zone`` at CONNECT (an :class:`~bridge.core.hooks.Admitted`), the broker
the rest. Pure data: no I/O, no amqtt.

What belongs to one network connection (its limit lease, outbox and state in
``bridge/core/connection.py``) stays on the connection record, not here: a takeover has two
connections on one session for a moment, and the old one must release its own lease.

``admitted`` tells a session that came through CONNECT and the auth hooks from one the
broker made itself (restored from the store before its owner reconnects, amqtt's plugin
API): hooks decide only for the former; what the latter holds was checked when it was made
and is checked again when its owner comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.core.hooks import Admitted

__all__ = ["ConnectionContext"]


@dataclass(eq=False, slots=True)
class ConnectionContext:
    """Who owns a session and what they may do; lives as long as the session record."""

    user: str | None = None  # the owner (token ``sub``): a client id belongs to one user
    claims: Any = None  # the verified token's claims, None without auth
    policy: Any = None  # the auth plugin's decision (an ACL), read by its other hooks
    zone: str | None = None  # IANA zone deliveries are localised to, None: as published
    admitted: bool = False  # came through on_connect (see the module docstring)
    # Persistent sessions only, while disconnected: when, for session expiry.
    disconnected_at: float | None = None

    def admit(self, admitted: Admitted) -> None:
        """Take on_connect's decision (a resumed session gets its new token's)."""
        self.user = admitted.user
        self.claims = admitted.claims
        self.policy = admitted.policy
        self.zone = admitted.zone
        self.admitted = True
