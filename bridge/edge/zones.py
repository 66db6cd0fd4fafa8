"""Subscribers' time zones: decided once per connection, and the variants delivered in them.

A connection's zone is the store's override for its user (kept in memory for
``_ZONE_TTL_S``, bounded), else its token's ``tz`` claim, else ``auth.default_tz``; off
when ``timezones.enabled`` is false. A message is localised by the ``on_deliver`` hook (the
timezone plugin) once per zone, a tick from its parts without re-parsing JSON.
"""

from __future__ import annotations

import time

from bridge.auth import Claims
from bridge.config import BridgeConfig
from bridge.core.store import StoreError
from bridge.core.tick import TickParts
from bridge.core.timezones import is_valid_zone
from bridge.edge.session import context_of
from bridge.edge.state import BrokerState, log
from bridge.errors import MessageError
from bridge.logs import STORE, clip
from broker_plugins.timezone import TimezonePlugin

__all__ = ["ZonesMixin"]

# How long a user's zone override is taken from memory before the store is asked again.
_ZONE_TTL_S = 600.0


class ZonesMixin(BrokerState):
    """Zone lookup per connection and localisation per zone."""

    def _init_zones(self, config: BridgeConfig) -> None:
        # user -> (their zone override from the store, "" for none; when to ask again), so a
        # reconnect does not wait on the store: bounded, oldest dropped first; set_user_tz
        # keeps it right, and a change made elsewhere (the CLI) is seen within the TTL.
        self._user_zones: dict[str, tuple[str, float]] = {}
        self._zone_writes = 0  # set_user_tz calls: a lookup that overlapped one is not kept
        tz = config.timezones
        self._tz_enabled = tz.enabled
        self._timezone = TimezonePlugin(
            fields=tz.fields, rules=[(rule.filter, rule.enabled) for rule in tz.rules], counted=self._count_tz
        )
        self.hooks.register(self._timezone)  # on_deliver: once per (message, zone)

    async def _zone_for(self, user: str, claims: Claims | None, claimed: str | None) -> str | None:
        """The user's zone, decided once per connection: store override, token claim, default."""
        if not self._tz_enabled:
            return None
        override = None
        if self.store is not None and claims is not None:
            override = await self._zone_override(user)
        return override or claimed or self.bridge_config.auth.default_tz

    async def _zone_override(self, user: str) -> str | None:
        """The store's zone for ``user``, from memory for ``_ZONE_TTL_S`` after a look (a storm
        of reconnects does not queue on the store); set_user_tz here is seen at once."""
        cached = self._user_zones.get(user)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0] or None
        assert self.store is not None
        writes = self._zone_writes
        try:
            override = await self.store.get_user_tz(user)
        except StoreError as exc:
            log.warning(
                "time zone override for %s unavailable (%s): using the token's",
                clip(user),
                exc,
                extra=STORE,
            )
            return None  # not remembered: asked again at the next CONNECT
        if writes != self._zone_writes:
            return override  # may predate the write: used once, not remembered
        self._user_zones.pop(user, None)  # re-inserted last: the dict's order is its age
        if len(self._user_zones) >= self.bridge_config.limits.max_connections:
            del self._user_zones[next(iter(self._user_zones))]  # bounded: the oldest goes
        self._user_zones[user] = (override or "", now + _ZONE_TTL_S)
        return override

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        """Override (None: clear) a user's zone in the store and for their live connections."""
        if tz is not None and not is_valid_zone(tz):
            raise MessageError("bad_tz", f"{tz!r} is not an IANA time zone")
        assert self.store is not None
        self._zone_writes += 1
        self._user_zones.pop(user, None)
        try:
            await self.store.set_user_tz(user, tz)
        finally:
            # A lookup that overlapped the write is not remembered, nor one kept meanwhile.
            self._zone_writes += 1
            self._user_zones.pop(user, None)
        for connection in self._connections.values():
            if connection.user == user:
                context = context_of(connection.session)
                claims = context.claims if isinstance(context.claims, Claims) else None
                context.zone = await self._zone_for(user, claims, claims.tz if claims is not None else None)
        self._fanout.invalidate()

    def _localized(self, topic: str, data: bytes, zone: str | None, memo: dict[str | None, bytes]) -> bytes:
        """``data`` as subscribers in ``zone`` get it: the on_deliver hook (the timezone
        plugin) called once per zone, its result shared via ``memo``."""
        if zone is None:
            return data
        variant = memo.get(zone)
        if variant is None:
            variant = memo[zone] = self.hooks.on_deliver(data, zone, topic)
        return variant

    def _count_tz(self, rewritten: bool) -> None:
        if rewritten:
            self.stats.tz_rewrites += 1
        else:
            self.stats.tz_passthrough += 1

    def _tick_variant(self, topic: str, parts: TickParts, zone: str | None) -> bytes:
        """A tick's wire form with ``ts`` in ``zone``: the timezone plugin's fast path, from
        its parts instead of re-parsing JSON (tests hold it byte-for-byte equal to rewrite())."""
        return self.hooks.on_deliver_tick(parts, zone, topic)
