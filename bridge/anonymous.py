"""Public read-only access (``auth.anonymous``) as pure code: who counts as anonymous, what
such a connection may do, and which ``sub_acl`` an operator may grant it.

A CONNECT without a password (absent or empty, whatever its username) is anonymous when
``auth.anonymous.enabled``; any password is a token and goes to the JWT plugin. Decisions
(:func:`decide_anonymous`), all without I/O or a clock:

- the user is :data:`ANONYMOUS_USER`, a name no token can carry (a ``sub`` may not contain
  ``#``), so no real user's limits, sessions, zone override or client ids are shared with it;
- the session is kept under :data:`ANONYMOUS_CLIENT_PREFIX` + the client id it asked for: an
  anonymous client can never take over, squat or wipe a real user's client id (nor, in a
  cluster, own one for the week ids are remembered), only another anonymous client's;
- subscribe within ``sub_acl`` only, publish nothing (the ACL has no publish filter: a PUBLISH
  is dropped and counted like any forbidden one), no will (CONNACK 5 ``will_refused``, as for
  any will the ACL forbids), no persistent session (CONNACK 5 ``anonymous_persistent``: a
  public client must not make the broker keep state for it for a week);
- ticks localised to ``tz``.

``sub_acl`` may never reach ``user/...``, ``service/...`` or ``$`` topics: each filter must
start with a literal first level other than those (:func:`sub_acl_problem`), checked at startup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bridge.acl import Acl
from bridge.core.connect import CONNACK_NOT_AUTHORIZED
from bridge.core.hooks import Admitted, ConnectRequest, Refused
from bridge.core.topics import SERVICE_PREFIX, USER_PREFIX, is_valid_filter

__all__ = [
    "ANONYMOUS_CLIENT_PREFIX",
    "ANONYMOUS_USER",
    "AnonymousPolicy",
    "decide_anonymous",
    "is_anonymous",
    "sub_acl_problem",
]

# '#' is forbidden in a token's sub (bridge.auth), so no JWT user can ever be this user.
ANONYMOUS_USER = "#anonymous"
# Client ids of anonymous sessions live in their own namespace (see the module docstring).
ANONYMOUS_CLIENT_PREFIX = "#anonymous/"

# First topic levels anonymous filters may never start with: other users' and services'
# mailboxes, and system topics.
_PRIVATE_ROOTS = (USER_PREFIX.rstrip("/"), SERVICE_PREFIX.rstrip("/"))


def sub_acl_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` may not be granted to anonymous clients (None: it may). A filter
    whose first level is a wildcard could match ``user/...``, so the first level must be a
    literal, and not ``user``, ``service`` or a ``$`` topic. Never raises."""
    if not is_valid_filter(topic_filter):
        return f"{topic_filter[:64]!r} is not a valid MQTT topic filter"
    first = topic_filter.split("/", 1)[0]
    if first in ("+", "#"):
        return f"{topic_filter[:64]!r} starts with a wildcard, which reaches user/ and service/ topics"
    if first in _PRIVATE_ROOTS or first.startswith("$"):
        return f"{topic_filter[:64]!r} reaches private topics ({first}/...)"
    return None


def is_anonymous(request: ConnectRequest) -> bool:
    """No password: the client has no token, whatever username it sent."""
    return not request.password


@dataclass(frozen=True, slots=True)
class AnonymousPolicy:
    """What an anonymous connection gets; build it from config (already validated)."""

    sub_acl: tuple[str, ...]
    tz: str

    @classmethod
    def of(cls, sub_acl: Iterable[str], tz: str) -> AnonymousPolicy:
        filters = tuple(dict.fromkeys(sub_acl))
        for topic_filter in filters:
            problem = sub_acl_problem(topic_filter)
            if problem is not None:  # config validation already refused it: fail closed anyway
                raise ValueError(problem)
        return cls(filters, tz)

    @property
    def acl(self) -> Acl:
        return Acl(subscribe=self.sub_acl, publish=())


def decide_anonymous(request: ConnectRequest, policy: AnonymousPolicy) -> Admitted | Refused | None:
    """An anonymous CONNECT's answer; None when it is not anonymous (it has a password). The
    will is judged by the caller against :attr:`AnonymousPolicy.acl` (it allows none)."""
    if not is_anonymous(request):
        return None
    if not request.clean_session:
        return Refused(
            CONNACK_NOT_AUTHORIZED,
            "anonymous_persistent",
            f"client {request.client_id[:64]!r}: anonymous sessions must be clean (clean_session=1)",
        )
    return Admitted(
        ANONYMOUS_USER,
        claims=None,
        policy=policy.acl,
        zone=policy.tz,
        client_id=ANONYMOUS_CLIENT_PREFIX + request.client_id,
    )
