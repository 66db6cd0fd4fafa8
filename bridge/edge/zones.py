"""Subscribers' time zones: decided once per connection, and the variants delivered in them.

A connection's zone is the store's override for its user (kept in memory for
``_ZONE_TTL_S``, bounded), else its token's ``tz`` claim, else ``auth.default_tz``; off
when ``timezones.enabled`` is false. A message is localised by the ``on_deliver`` hook (the
timezone plugin) once per zone, a tick from its parts without re-parsing JSON.
"""

from __future__ import annotations

import asyncio
import time

from bridge.auth import Claims
from bridge.config import BridgeConfig
from bridge.core.lookup_batch import BatchedLookup
from bridge.core.store import StoreError
from bridge.core.tick import TickParts
from bridge.core.timezones import is_valid_zone
from bridge.core.zone_memo import ZoneMemo
from bridge.edge.session import context_of
from bridge.edge.state import BrokerState, log
from bridge.errors import MessageError
from bridge.logs import STORE, clip
from broker_plugins.timezone import TimezonePlugin

__all__ = ["ZonesMixin"]

# How long a user's zone override is taken from memory before the store is asked again.
_ZONE_TTL_S = 600.0
# After a failed listing of every override, the next is tried no sooner than this.
_LISTING_RETRY_S = 30.0


class ZonesMixin(BrokerState):
    """Zone lookup per connection and localisation per zone."""

    def _init_zones(self, config: BridgeConfig) -> None:
        # The store's overrides, so a reconnect does not wait on the store; set_user_tz keeps
        # it right, and a change made elsewhere (the CLI) is seen within the TTL.
        self._zone_memo = ZoneMemo(max_entries=config.limits.max_connections, ttl_s=_ZONE_TTL_S)
        # The users asking in one loop step (a reconnect storm) cost one store call.
        self._zone_lookups = BatchedLookup(self._fetch_zones, name="zone-lookups")
        self._zone_listing: asyncio.Task[None] | None = None
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
        now = time.monotonic()
        cached = self._zone_memo.known(user, now)
        if cached is not None:
            return cached or None
        if self._zone_memo.listing_due(now) and self._zone_listing is None:
            # The listing expired: renewed in the background, this CONNECT asks for itself.
            self._zone_listing = asyncio.create_task(self._list_zones(), name="zone-listing")
        ticket = self._zone_memo.ticket()
        try:
            override = await self._zone_lookups.get(user)
        except StoreError as exc:
            log.warning(
                "time zone override for %s unavailable (%s): using the token's",
                clip(user),
                exc,
                extra=STORE,
            )
            return None  # not remembered: asked again at the next CONNECT
        # Not remembered if it overlapped a change (it may predate it): used this once.
        self._zone_memo.remember(user, override, now, ticket)
        return override

    async def _list_zones(self) -> None:
        """Take the store's whole listing of overrides (when it is at most the memo's
        ``max_listing``): until it expires, a first CONNECT does not ask the store."""
        assert self.store is not None
        try:
            now = time.monotonic()
            ticket = self._zone_memo.ticket()
            try:
                listing = await self.store.list_user_tzs(self._zone_memo.max_listing)
            except StoreError as exc:
                log.warning("time zone overrides not listed (%s): asked per user", exc, extra=STORE)
                self._zone_memo.listing_failed(now, _LISTING_RETRY_S)
                return
            if listing is None:
                self._zone_memo.drop_listing(now)  # too many to hold: asked per user
            else:
                self._zone_memo.load_all(listing, now, ticket)
        finally:
            self._zone_listing = None

    async def _fetch_zones(self, users: list[str]) -> dict[str, str]:
        assert self.store is not None
        return await self.store.get_user_tzs(users)

    async def set_user_tz(self, user: str, tz: str | None) -> None:
        """Override (None: clear) a user's zone in the store and for their live connections."""
        if tz is not None and not is_valid_zone(tz):
            raise MessageError("bad_tz", f"{tz!r} is not an IANA time zone")
        assert self.store is not None
        self._zone_memo.changed(user)
        try:
            await self.store.set_user_tz(user, tz)
        finally:
            # A lookup that overlapped the write is not remembered, nor one kept meanwhile.
            self._zone_memo.changed(user)
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
