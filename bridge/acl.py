"""Topic access control as pure code: which filters a session may subscribe to, which topics
it may publish to, and which published topics it may receive.

``acl_for(claims)`` runs once per session; the checks then only compare strings, so they
are cheap enough for every SUBSCRIBE and every PUBLISH. Anything malformed is denied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bridge.auth import Claims, Role
from bridge.core.tick import Tick
from bridge.core.topics import (
    MARKET_PREFIX,
    SERVICE_PREFIX,
    USER_PREFIX,
    is_valid_filter,
    is_valid_topic,
    matches,
)
from bridge.errors import TickError

__all__ = ["ALLOW_ALL", "ROLE_DEFAULTS", "Acl", "acl_for", "filter_covers", "will_refusal"]

_SUB_PLACEHOLDER = "{sub}"


def filter_covers(allowed: str, requested: str) -> bool:
    """Is every topic that ``requested`` can match also matched by ``allowed``?

    MQTT 3.1.1 semantics: '+' is one level, '#' is any remaining levels including the parent
    ('a/#' matches 'a'), and wildcards at level 0 never match '$' topics. An invalid filter on
    either side covers / is covered by nothing, so bad input is denied rather than guessed at.
    """
    if not (is_valid_filter(allowed) and is_valid_filter(requested)):
        return False
    a_levels = allowed.split("/")
    r_levels = requested.split("/")
    # Only a literal first level can reach '$' topics, and a leading wildcard cannot match them.
    r_dollar = r_levels[0].startswith("$")
    for index, a_level in enumerate(a_levels):
        r_level = r_levels[index] if index < len(r_levels) else None
        if a_level == "#":
            # '#' swallows the rest, including "no more levels" (the parent).
            return not (index == 0 and r_dollar)
        if r_level is None:
            # ``requested`` matches topics shorter than anything ``allowed`` still needs.
            return False
        if r_level == "#":
            # Requested '#' also matches the parent, which a '+' in ``allowed`` would not,
            # unless that parent is the empty topic, which is invalid and never published
            # ('#', '/#'): then '#' means "one or more levels", exactly what '+/#' matches.
            parent_is_empty = not "/".join(r_levels[:index])
            return parent_is_empty and a_levels[index:] == ["+", "#"]
        if a_level == "+":
            if index == 0 and r_dollar:
                return False
            continue
        if r_level != a_level:
            # A literal covers only the identical literal; requested '+' is unbounded.
            return False
    return len(a_levels) == len(r_levels)


@dataclass(frozen=True, slots=True)
class Acl:
    """The filters one session may subscribe with and publish to."""

    subscribe: tuple[str, ...]
    publish: tuple[str, ...]

    def may_subscribe(self, topic_filter: str) -> bool:
        """Some allowed filter covers every topic ``topic_filter`` could ever deliver."""
        return any(filter_covers(allowed, topic_filter) for allowed in self.subscribe)

    def may_publish(self, topic: str) -> bool:
        return is_valid_topic(topic) and any(matches(topic, allowed) for allowed in self.publish)

    def may_receive(self, topic: str) -> bool:
        """Checked at delivery too, so a retained or overlapping message cannot leak past the ACL."""
        return is_valid_topic(topic) and any(matches(topic, allowed) for allowed in self.subscribe)


# '#' at level 0 does not match '$SYS/...': admins who need $SYS get it via an explicit sub_acl.
ALLOW_ALL = Acl(subscribe=("#",), publish=("#",))

# (subscribe, publish) per role; '{sub}' is replaced by the token's subject.
ROLE_DEFAULTS: Mapping[Role, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "subscriber": ((f"{MARKET_PREFIX}#", f"{USER_PREFIX}{{sub}}/#"), ()),
    "feed": ((f"{MARKET_PREFIX}#",), (f"{MARKET_PREFIX}#",)),
    # Services hear back on service/<sub>/... (e.g. evictions from a full user queue).
    "service": ((f"{SERVICE_PREFIX}{{sub}}/#",), (f"{USER_PREFIX}+/#",)),
    "admin": (("#",), ("#",)),
}


def _is_single_level(sub: str) -> bool:
    """Can ``sub`` stand in for exactly one literal, non-system topic level?"""
    # Claims already refuses such subjects; this repeats it because a widened grant is costly:
    # '+', 'bob/#' or 'a/b' would reach other users' topics, '' a shared 'user//' namespace,
    # and '$SYS' in a '{sub}/#' filter the system topics.
    return bool(sub) and not sub.startswith("$") and not any(char in sub for char in "/+#\x00")


def _expand(filters: Iterable[str], sub: str) -> tuple[str, ...]:
    sub_ok = _is_single_level(sub)
    expanded: dict[str, None] = {}  # a dict keeps first-seen order and drops duplicates
    for template in filters:
        if _SUB_PLACEHOLDER in template and not sub_ok:
            continue
        topic_filter = template.replace(_SUB_PLACEHOLDER, sub)
        if is_valid_filter(topic_filter):
            expanded[topic_filter] = None
    return tuple(expanded)


def acl_for(claims: Claims) -> Acl:
    """The session's ACL: role defaults, each side replaced by the token's explicit list.

    Total: invalid filters are dropped, and an unknown role (only possible by bypassing
    validation) gets nothing.
    """
    default_sub, default_pub = ROLE_DEFAULTS.get(claims.role, ((), ()))
    subscribe = claims.sub_acl if claims.sub_acl is not None else default_sub
    publish = claims.pub_acl if claims.pub_acl is not None else default_pub
    return Acl(subscribe=_expand(subscribe, claims.sub), publish=_expand(publish, claims.sub))


def will_refusal(acl: Acl, topic: str, payload: bytes, *, max_topic_bytes: int) -> str | None:
    """Why a CONNECT's will may not be published (None: it may). A will is a PUBLISH the
    client makes in advance, so it is held to every rule a PUBLISH is: a topic name (no
    wildcards, no ``$``), at most ``max_topic_bytes``, allowed by the ACL, and on
    ``market/...`` a valid tick. Never raises."""
    if not is_valid_topic(topic) or topic.startswith("$"):
        return f"will topic {topic[:64]!r} is not a topic name"
    if len(topic.encode("utf-8", "surrogatepass")) > max_topic_bytes:
        return "will topic too long"
    if not acl.may_publish(topic):
        return f"may not publish its will on {topic[:64]!r}"
    if topic.startswith(MARKET_PREFIX):
        try:
            Tick.decode(payload, topic=topic)
        except TickError as exc:
            return f"will on {topic[:64]!r} is not a valid tick ({exc.reason})"
    return None
