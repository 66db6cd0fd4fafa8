"""Named hooks: where policy attaches to the broker, instead of overriding its internals.

Modelled on gmqtt/EMQX hooks (``OnBasicAuth``, ``OnSubscribe``, ``OnMsgArrived``,
``OnDeliver``), plus the lease hooks that hold connection limits (``on_lease`` when a
connection is about to go live, ``on_release`` when it is gone). A plugin
(``broker_plugins/``) is any object with some of the methods below;
:class:`Hooks` keeps, per hook name, the plugins that have it, in registration order, and
the broker calls the hook, never the plugin. A new policy is a new plugin.

Hooks are synchronous and must not do I/O: they run on the connect and delivery paths, once
per CONNECT, SUBSCRIBE filter, PUBLISH or (zone, message). State a plugin needs (keys, a
store) is given to it when it is built. The types here are the contract; the broker owns
what happens around each call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bridge.core.connect import Will
from bridge.core.tick import TickParts

__all__ = [
    "HOOK_NAMES",
    "Admitted",
    "ConnectRequest",
    "Hooks",
    "OnConnect",
    "OnDeliver",
    "OnLease",
    "OnPublish",
    "OnRelease",
    "OnSubscribe",
    "Principal",
    "Refused",
]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What a CONNECT asks for, as read off the wire (nothing trusted yet)."""

    client_id: str
    username: str | None
    password: bytes | None
    clean_session: bool
    listener: str
    peer: str
    now: float
    will: Will | None = None  # a PUBLISH made in advance: held to the rules of one


@dataclass(frozen=True, slots=True)
class Admitted:
    """on_connect's yes: who the client is and what it may do (``policy`` is the plugin's)."""

    user: str
    claims: Any = None  # the verified token's claims, or None without auth
    policy: Any = None  # the plugin's per-connection decision (an ACL), read by its other hooks
    zone: str | None = None  # IANA zone for on_deliver, None: as published (UTC)
    # The client id the session is kept under, None: the one the CONNECT asked for. Lets a
    # plugin put a class of clients in its own namespace (bridge.anonymous); never sent back.
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """on_connect's no: a CONNACK return code and a reason for logs and metrics."""

    code: int
    reason: str
    detail: str


class Principal(Protocol):
    """Who a connection is, as its hooks read it: an :class:`Admitted`, or the connection's
    context (``bridge.core.context``), which carries the same four fields."""

    @property
    def user(self) -> str | None: ...
    @property
    def claims(self) -> Any: ...
    @property
    def policy(self) -> Any: ...
    @property
    def zone(self) -> str | None: ...


@runtime_checkable
class OnConnect(Protocol):
    def on_connect(self, request: ConnectRequest) -> Admitted | Refused | None:
        """Decide a CONNECT; None: no opinion (the next plugin decides)."""


@runtime_checkable
class OnSubscribe(Protocol):
    def on_subscribe(self, admitted: Principal, topic_filter: str, qos: int) -> int:
        """The QoS to grant (at most ``qos``), or 0x80 to refuse this filter."""


@runtime_checkable
class OnPublish(Protocol):
    def on_publish(self, admitted: Principal, topic: str) -> bool:
        """May this connection publish to ``topic``?"""


@runtime_checkable
class OnDeliver(Protocol):
    def on_deliver(self, payload: bytes, zone: str | None, topic: str) -> bytes:
        """The payload as subscribers in ``zone`` get it: called once per (message, zone), for
        subscribers with a zone (the others get it as published). A plugin may also offer
        ``on_deliver_tick(parts, zone, topic)``, the same result built from a tick's parts,
        and ``on_deliver_ticks(ticks, zone)``, that for many (topic, parts) at once."""


@runtime_checkable
class OnLease(Protocol):
    async def on_lease(self, user: str, replacing: object | None) -> object | Refused | None:
        """Count a connection of ``user`` about to go live: a lease (opaque, given back to
        ``on_release``), a refusal, or None (this plugin holds no limits). ``replacing`` is
        the lease of the live connection it takes over, if any. A coroutine: cluster-wide
        limits ask Redis (bridge.cluster.limits); a local limiter answers without waiting."""


@runtime_checkable
class OnRelease(Protocol):
    async def on_release(self, lease: object) -> None:
        """The connection holding ``lease`` is gone (called once or more: must be idempotent)."""


HOOK_NAMES = ("on_connect", "on_subscribe", "on_publish", "on_deliver", "on_lease", "on_release")


class Hooks:
    """The plugins attached to each named hook, called in registration order."""

    def __init__(self, plugins: Iterable[object] = ()) -> None:
        self.connect: list[OnConnect] = []
        self.subscribe: list[OnSubscribe] = []
        self.publish: list[OnPublish] = []
        self.deliver: list[OnDeliver] = []
        self.lease: list[OnLease] = []
        self.release: list[OnRelease] = []
        for plugin in plugins:
            self.register(plugin)

    def register(self, plugin: object) -> None:
        if not any(callable(getattr(plugin, name, None)) for name in HOOK_NAMES):
            raise TypeError(f"{type(plugin).__name__} has none of the hooks {HOOK_NAMES}")
        if isinstance(plugin, OnConnect):
            self.connect.append(plugin)
        if isinstance(plugin, OnSubscribe):
            self.subscribe.append(plugin)
        if isinstance(plugin, OnPublish):
            self.publish.append(plugin)
        if isinstance(plugin, OnDeliver):
            self.deliver.append(plugin)
        if isinstance(plugin, OnLease):
            self.lease.append(plugin)
        if isinstance(plugin, OnRelease):
            self.release.append(plugin)

    def on_connect(self, request: ConnectRequest) -> Admitted | Refused | None:
        for plugin in self.connect:
            decision = plugin.on_connect(request)
            if decision is not None:
                return decision
        return None

    def on_subscribe(self, admitted: Principal, topic_filter: str, qos: int) -> int:
        granted = qos
        for plugin in self.subscribe:
            granted = plugin.on_subscribe(admitted, topic_filter, granted)
            if granted == 0x80:
                break
        return granted

    def on_publish(self, admitted: Principal, topic: str) -> bool:
        return all(plugin.on_publish(admitted, topic) for plugin in self.publish)

    def on_deliver(self, payload: bytes, zone: str | None, topic: str) -> bytes:
        for plugin in self.deliver:
            payload = plugin.on_deliver(payload, zone, topic)
        return payload

    def on_deliver_tick(self, parts: TickParts, zone: str | None, topic: str) -> bytes:
        """on_deliver for a sequenced tick: the first plugin may take its fast path from the
        tick's pre-split parts (``on_deliver_tick``); the rest see the bytes it made."""
        if not self.deliver:
            return parts.data
        first, *rest = self.deliver
        fast = getattr(first, "on_deliver_tick", None)
        payload: bytes = (
            fast(parts, zone, topic) if fast is not None else first.on_deliver(parts.data, zone, topic)
        )
        for plugin in rest:
            payload = plugin.on_deliver(payload, zone, topic)
        return payload

    def on_deliver_ticks(self, ticks: Sequence[tuple[str, TickParts]], zone: str) -> list[bytes]:
        """:meth:`on_deliver_tick` of many (topic, parts) in one zone (a retained snapshot):
        through the first plugin's ``on_deliver_ticks`` when it has one, in one call."""
        if not self.deliver:
            return [parts.data for _, parts in ticks]
        first, *rest = self.deliver
        batch = getattr(first, "on_deliver_ticks", None)
        if batch is None:
            return [self.on_deliver_tick(parts, zone, topic) for topic, parts in ticks]
        payloads: list[bytes] = batch(ticks, zone)
        for plugin in rest:
            payloads = [
                plugin.on_deliver(payload, zone, topic)
                for payload, (topic, _) in zip(payloads, ticks, strict=True)
            ]
        return payloads

    async def on_lease(self, user: str, replacing: object | None) -> object | Refused | None:
        """The first plugin that holds limits decides (one lease per connection)."""
        for plugin in self.lease:
            decision = await plugin.on_lease(user, replacing)
            if decision is not None:
                return decision
        return None

    async def on_release(self, lease: object | None) -> None:
        if lease is None:
            return
        for plugin in self.release:
            await plugin.on_release(lease)
