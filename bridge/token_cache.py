"""Verified tokens remembered: ``TokenCache(keys, policy, max_entries).decide(token, username, now)``.

Pure (no I/O, no clock: ``now`` is passed in) and decides exactly as
:func:`bridge.auth.decide_auth` does, without redoing the work that cannot change for the
same token: its header, key, signature, aud, iss and claims. A reconnect storm presents the
same tokens again; each is verified once.

- Key: the SHA-256 of the token's exact bytes, so an entry costs the same whatever the
  token's size, and a token that differs by one byte is another token.
- Value: :class:`~bridge.auth.Verified`, the claims and the time claims. A hit still decides
  time (``exp`` + leeway, ``nbf`` / ``iat`` - leeway) against ``now`` and the username ==
  ``sub`` check, so a token is never accepted from the cache past its ``exp`` + leeway
  (the entry is dropped then) or for another user.
- Only tokens accepted are remembered: a refusal is decided in full every time, so garbage
  cannot fill the cache, and a token refused for being early or for another username is
  not remembered until it is accepted.
- Bounded: at most ``max_entries``, the least recently used evicted first; 0 disables it.
- A cache belongs to one key ring and one policy (given at construction): new keys or a new
  policy mean a new cache, never a decision taken under the old ones.

Not thread-safe: one event loop uses it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from bridge.auth import Claims, KeyRing, TokenPolicy, Verified, decide_verified
from bridge.errors import AuthError

__all__ = ["TokenCache"]


class TokenCache:
    """:func:`~bridge.auth.decide_auth` for one key ring and policy, with a bounded LRU memory."""

    def __init__(self, keys: KeyRing, policy: TokenPolicy, *, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be 0 (no cache) or more, got {max_entries}")
        self.keys = keys
        self.policy = policy
        self.max_entries = max_entries
        self.hits = 0  # decided from the cache (accepted or not)
        self.misses = 0  # verified in full (every refusal of a token not remembered included)
        self._entries: OrderedDict[bytes, Verified] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def decide(self, token: str | bytes | None, username: str | None, now: float) -> Claims | AuthError:
        """What ``decide_auth(token, username, now, keys, policy)`` answers. Never raises."""
        key = self._key(token) if self.max_entries else None
        if key is not None and (entry := self._entries.get(key)) is not None:
            self.hits += 1
            decision = entry.admit(username, now, self.policy.leeway_s)
            if isinstance(decision, AuthError) and decision.reason == "expired":
                del self._entries[key]  # expired for good: exp does not move
            else:
                self._entries.move_to_end(key)
            return decision
        self.misses += 1
        verified = decide_verified(token, username, now, self.keys, self.policy)
        if isinstance(verified, AuthError):
            return verified
        if key is not None:
            self._entries[key] = verified
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return verified.claims

    def _key(self, token: str | bytes | None) -> bytes | None:
        """The token's digest; None for what no accepted token can be (decide_auth says why)."""
        if isinstance(token, str):
            if not token.isascii():
                return None
            data = token.encode("ascii")
        elif isinstance(token, bytes):
            data = token
        else:
            return None
        if not 0 < len(data) <= self.policy.max_token_bytes:
            return None
        return hashlib.sha256(data).digest()
