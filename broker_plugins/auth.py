"""The auth plugin on the named hooks (bridge/core/hooks.py): who may connect, subscribe and
publish, and how many connections each user and the broker may hold.

A thin adapter over pure code: the token decision is :class:`~bridge.token_cache.TokenCache`
(:func:`bridge.auth.decide_auth`, a token verified once is remembered until its ``exp``), the
permissions :func:`bridge.acl.acl_for`, the will :func:`bridge.acl.will_refusal`, and the
accounting an :class:`~bridge.cluster.limits.AsyncConnectionLimits` (this node's counts, or the
cluster's in Redis: the lease hooks await it). No I/O of its own, no clock (``now`` arrives in
the request), no amqtt.

- :class:`JwtAuth`: the token is the MQTT password and the username must be its ``sub``.
  Every refusal is CONNACK 5 (not authorized), a missing token included (public access is
  a separate plugin, :class:`AnonymousAccess`); the ACL decided at CONNECT is the connection's
  ``policy``.
- :class:`AllowAll` (``auth.enabled: false``): anyone may connect and do anything; the will
  and the connection limits are held to the same rules.
- :class:`AnonymousAccess` (``auth.anonymous.enabled``, registered before :class:`JwtAuth`):
  a CONNECT without a password gets a read-only session (:func:`bridge.anonymous.decide_anonymous`),
  counted against its own cap, never the JWT users' limits. Its ACL is an :class:`Acl`, so
  :class:`JwtAuth`'s subscribe and publish hooks judge it like any other connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.acl import ALLOW_ALL, Acl, acl_for, will_refusal
from bridge.anonymous import ANONYMOUS_USER, AnonymousPolicy, decide_anonymous
from bridge.core.connect import CONNACK_NOT_AUTHORIZED, CONNACK_SERVER_UNAVAILABLE
from bridge.core.hooks import Admitted, ConnectRequest, Principal, Refused
from bridge.errors import AuthError, ClusterUnavailable
from bridge.limits import Lease, LimitRefusal
from bridge.logs import clip
from bridge.token_cache import TokenCache

if TYPE_CHECKING:  # the protocol only: the plugins load no Redis client
    from bridge.cluster.limits import AsyncConnectionLimits
    from bridge.config import AnonymousConfig

__all__ = ["AllowAll", "AnonymousAccess", "JwtAuth"]

_REFUSE = 0x80  # SUBACK failure


class _Limits:
    """The lease hooks over connection limits (per user and global counts): this node's
    (:class:`~bridge.cluster.limits.LocalAsyncLimits`) or the cluster's, counted in Redis."""

    def __init__(self, limits: AsyncConnectionLimits, *, max_topic_bytes: int) -> None:
        self.limits = limits
        self.max_topic_bytes = max_topic_bytes

    async def on_lease(self, user: str, replacing: object | None) -> Lease | Refused:
        try:
            lease = await self.limits.acquire(
                user, replacing=replacing if isinstance(replacing, Lease) else None
            )
        except ClusterUnavailable as exc:
            # Fail closed: a node that cannot count cluster-wide admits nobody.
            return Refused(CONNACK_SERVER_UNAVAILABLE, "cluster_unavailable", f"{clip(user)}: {exc}")
        if isinstance(lease, LimitRefusal):
            return Refused(CONNACK_SERVER_UNAVAILABLE, lease.reason, f"{clip(user)}: {lease.detail}")
        return lease

    async def on_release(self, lease: object) -> None:
        if isinstance(lease, Lease):
            await self.limits.release(lease)

    def _will(self, request: ConnectRequest, acl: Acl) -> Refused | None:
        will = request.will
        if will is None:
            return None
        # Refused now rather than dropped later: the client learns at once that its will
        # would never be published, and nothing it may not publish ever is.
        problem = will_refusal(acl, will.topic, will.payload, max_topic_bytes=self.max_topic_bytes)
        if problem is None:
            return None
        return Refused(CONNACK_NOT_AUTHORIZED, "will_refused", f"client {clip(request.client_id)}: {problem}")


class JwtAuth(_Limits):
    """CONNECT by JWT, SUBSCRIBE and PUBLISH by the token's ACL, connection limits."""

    def __init__(self, tokens: TokenCache, limits: AsyncConnectionLimits, *, max_topic_bytes: int) -> None:
        super().__init__(limits, max_topic_bytes=max_topic_bytes)
        self.tokens = tokens

    def on_connect(self, request: ConnectRequest) -> Admitted | Refused:
        decision = self.tokens.decide(request.password, request.username, request.now)
        if isinstance(decision, AuthError):
            # No password included: public access is off (or this is not it), so not
            # authorized, like any other refused token (issue 16).
            return Refused(CONNACK_NOT_AUTHORIZED, decision.reason, decision.detail)
        acl = acl_for(decision)
        return self._will(request, acl) or Admitted(decision.sub, decision, acl, decision.tz)

    def on_subscribe(self, admitted: Principal, topic_filter: str, qos: int) -> int:
        # Fail closed: a connection without an ACL of ours may subscribe to nothing.
        acl = admitted.policy
        return qos if isinstance(acl, Acl) and acl.may_subscribe(topic_filter) else _REFUSE

    def on_publish(self, admitted: Principal, topic: str) -> bool:
        acl = admitted.policy
        return isinstance(acl, Acl) and acl.may_publish(topic)


class AllowAll(_Limits):
    """``auth.enabled: false``: the user is the username (else the client id)."""

    def on_connect(self, request: ConnectRequest) -> Admitted | Refused:
        return self._will(request, ALLOW_ALL) or Admitted(
            request.username or request.client_id, policy=ALLOW_ALL
        )

    def on_subscribe(self, admitted: Principal, topic_filter: str, qos: int) -> int:
        return qos

    def on_publish(self, admitted: Principal, topic: str) -> bool:
        return True


class AnonymousAccess:
    """Public read-only access: CONNECTs without a password; the others go on to the next
    plugin. ``limits`` counts :data:`~bridge.anonymous.ANONYMOUS_USER` only (its cap is
    ``auth.anonymous.max_connections``); a lease of anyone else is the next plugin's."""

    def __init__(
        self, policy: AnonymousPolicy, limits: AsyncConnectionLimits, *, max_topic_bytes: int
    ) -> None:
        self.policy = policy
        self._limits = _Limits(limits, max_topic_bytes=max_topic_bytes)
        self.admitted = 0  # anonymous connections leased since start (a counter for metrics)

    @classmethod
    def from_config(
        cls, config: AnonymousConfig, limits: AsyncConnectionLimits, *, max_topic_bytes: int
    ) -> AnonymousAccess:
        return cls(AnonymousPolicy.of(config.sub_acl, config.tz), limits, max_topic_bytes=max_topic_bytes)

    @property
    def connections(self) -> int:
        """Anonymous connections counted now (a gauge: this node's, or the cluster's view)."""
        return self._limits.limits.total

    def on_connect(self, request: ConnectRequest) -> Admitted | Refused | None:
        decision = decide_anonymous(request, self.policy)
        if not isinstance(decision, Admitted):
            return decision
        # No will: the anonymous ACL publishes nothing, so any will is refused (CONNACK 5).
        return self._limits._will(request, self.policy.acl) or decision

    async def on_lease(self, user: str, replacing: object | None) -> Lease | Refused | None:
        if user != ANONYMOUS_USER:
            return None
        lease = await self._limits.on_lease(user, replacing)
        if isinstance(lease, Refused):
            if lease.reason in ("global_limit", "user_limit"):
                # Its own reason: a full public cap is not the JWT users' global limit.
                return Refused(lease.code, "anonymous_limit", lease.detail)
            return lease
        self.admitted += 1
        return lease

    async def on_release(self, lease: object) -> None:
        await self._limits.on_release(lease)  # a lease its limiter never issued is ignored
