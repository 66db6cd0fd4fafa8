"""A node's control channel (``{mb:node:<id>}:control``, sharded pub/sub): what one node tells
another. Two commands, JSON, bounded:

- ``close`` (:class:`TakeoverNotice`): the client id connected on another node; close the
  connection holding ``lease`` here.
- ``mail`` (:class:`UserMail`): a message addressed to ``user`` was accepted on another node
  (``send_to_user``, a service's publish, the admin API); deliver it to the user's live
  connections here. ``stored`` says it is in the shared offline store already: persistent
  sessions take it from there (their replay reads it, and it leaves the store on their
  PUBACK), clean ones get ``payload`` directly.

Pub/sub is at-most-once: a ``mail`` lost on the way (Redis failover, a node restarting) costs a
clean session that message; a persistent session still gets it from the store at its next
replay (reconnect, or the next message that wakes it). Interface::

    listener = ControlListener(backbone, node_id=..., on_close=close_connection,
                               on_mail=deliver_here, max_payload=1 << 20)
    await listener.start(); listener.ready; await listener.stop()
    await send_control(backbone, node, encode_control(notice_or_mail))  # -> receivers
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone, unavailable_as
from bridge.cluster.bus import ShardedSubscriber
from bridge.errors import ClusterMessageError

__all__ = [
    "MAX_CLOSE_BYTES",
    "ControlError",
    "ControlListener",
    "TakeoverNotice",
    "UserMail",
    "decode_control",
    "encode_control",
    "send_control",
]

log = logging.getLogger(__name__)

# A close command is a few ids; a mail carries up to ``max_payload`` bytes in base64.
MAX_CLOSE_BYTES = 4096
_MAIL_OVERHEAD = 8192


@dataclass(frozen=True, slots=True)
class TakeoverNotice:
    """Sent to the old node: close ``client_id``'s connection holding ``lease``."""

    client_id: str
    lease: str
    by: str


@dataclass(frozen=True, slots=True)
class UserMail:
    """A user-addressed message accepted on node ``by``, for ``user``'s connections here."""

    user: str
    topic: str
    payload: bytes
    qos: int
    stored: bool
    by: str


Control = TakeoverNotice | UserMail


class ControlError(ClusterMessageError):
    """A control message that is neither a takeover notice nor a user message."""


def encode_control(command: Control) -> bytes:
    data: dict[str, Any]
    if isinstance(command, TakeoverNotice):
        data = {"op": "close", "client_id": command.client_id, "lease": command.lease, "by": command.by}
    else:
        data = {
            "op": "mail",
            "user": command.user,
            "topic": command.topic,
            "payload": base64.b64encode(command.payload).decode(),
            "qos": command.qos,
            "stored": command.stored,
            "by": command.by,
        }
    return json.dumps(data, separators=(",", ":")).encode()


def _bound(max_payload: int) -> int:
    return max(MAX_CLOSE_BYTES, max_payload * 4 // 3 + _MAIL_OVERHEAD)


def decode_control(raw: bytes, *, max_payload: int = 0) -> Control:
    """One command; :class:`ControlError` naming what is wrong otherwise. ``max_payload``
    bounds a mail's payload (0: no mail is accepted)."""
    if len(raw) > _bound(max_payload):
        raise ControlError(f"{len(raw)} bytes, above {_bound(max_payload)}")
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"not JSON: {exc}") from None
    op = data.get("op") if isinstance(data, dict) else None
    if op == "close":
        if len(raw) > MAX_CLOSE_BYTES:
            raise ControlError(f"close: {len(raw)} bytes, above {MAX_CLOSE_BYTES}")
        fields = [data.get(name) for name in ("client_id", "lease", "by")]
        if not all(isinstance(value, str) for value in fields):
            raise ControlError("close: client_id, lease and by must be strings")
        return TakeoverNotice(*cast("list[str]", fields))
    if op == "mail":
        return _mail(data, max_payload)
    raise ControlError("not a close or mail command")


def _mail(data: dict[str, Any], max_payload: int) -> UserMail:
    texts = [data.get(name) for name in ("user", "topic", "payload", "by")]
    if not all(isinstance(value, str) for value in texts):
        raise ControlError("mail: user, topic, payload and by must be strings")
    user, topic, encoded, by = cast("list[str]", texts)
    qos, stored = data.get("qos"), data.get("stored")
    if qos not in (0, 1, 2) or isinstance(qos, bool) or not isinstance(stored, bool):
        raise ControlError("mail: qos must be 0, 1 or 2 and stored a boolean")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("mail: payload is not base64") from None
    if len(payload) > max_payload:
        raise ControlError(f"mail: payload of {len(payload)} bytes, above {max_payload}")
    return UserMail(user, topic, payload, qos, stored, by)


async def send_control(backbone: Backbone, node: str, message: bytes) -> int:
    """Publish on ``node``'s control channel; how many subscribers got it (0: the node is
    gone). Raises :class:`~bridge.errors.ClusterUnavailable` when Redis cannot be reached."""
    with unavailable_as("send a control message"):
        return int(await backbone.redis.spublish(keys.node_control(node), message))


class ControlListener:
    """Receives this node's control channel: ``on_close`` for each takeover notice, ``on_mail``
    for each user message; resubscribes like the tick bus."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        node_id: str,
        on_close: Callable[[TakeoverNotice], None],
        on_mail: Callable[[UserMail], None] | None = None,
        max_payload: int = 0,
    ) -> None:
        self._on_close = on_close
        self._on_mail = on_mail
        self._max_payload = max_payload if on_mail is not None else 0
        self.bad_messages = 0
        self._subscriber = ShardedSubscriber(backbone, [keys.node_control(node_id)], self._received)

    @property
    def ready(self) -> bool:
        return self._subscriber.ready

    async def start(self) -> None:
        self._subscriber.start()
        await self._subscriber.wait_ready()

    async def stop(self) -> None:
        await self._subscriber.stop()

    def _received(self, channel: str, data: bytes) -> None:
        try:
            command = decode_control(data, max_payload=self._max_payload)
        except ControlError as exc:
            self.bad_messages += 1
            log.warning("cluster control: dropped a message on %s: %s", channel, exc)
            return
        try:
            if isinstance(command, TakeoverNotice):
                self._on_close(command)
            elif self._on_mail is not None:
                self._on_mail(command)
        except Exception:
            log.exception("cluster control: handling %s failed", type(command).__name__)
