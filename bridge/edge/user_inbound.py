"""One connection's PUBLISHes to ``user/...``, taken without amqtt's per-message flow.

The handler's read path gives each one to :meth:`UserInbound.take`, synchronously: the topic
is checked (length, then the ACL) once per topic per connection, then the message goes to
the mailbox's group commit, and the handler writes its PUBACK once the commit returns. The
ACL is decided once per connection from the token's claims, so a topic's answer does not
change while the connection lives; the cache is bounded all the same. A refusal is counted
and logged every time, as on amqtt's path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from bridge.core.topics import is_valid_topic
from bridge.logs import CLIENT, clip

__all__ = ["UserInbound"]

log = logging.getLogger(__name__)

# Topics whose decision a connection remembers; past it the memory starts again.
MAX_TOPICS = 1024
_ALLOWED = ""


class UserInbound:
    """``take(topic, payload, qos, settle)`` for one publishing connection (see ``TakeUser``)."""

    __slots__ = ("_client_id", "_decisions", "_dropped", "_max_topic", "_may_publish", "_received", "_send")

    def __init__(
        self,
        client_id: str,
        *,
        max_topic: int,
        may_publish: Callable[[str], bool],
        send: Callable[[str, bytes, int, Callable[[bool], None]], bool],
        dropped: Counter[str],
        received: Counter[str],
    ) -> None:
        self._client_id = client_id
        self._max_topic = max_topic
        self._may_publish = may_publish
        self._send = send
        self._dropped = dropped
        self._received = received
        self._decisions: dict[str, str] = {}  # topic -> "" (allowed) or why it is dropped

    def take(self, topic: str, payload: bytes, qos: int, settle: Callable[[bool], None]) -> bool | None:
        """True: done (dropped and counted, or nothing to wait for); False: an invalid topic,
        the connection ends; None: ``settle`` says once the group commit holding the message
        returns whether it was stored."""
        self._received["user"] += 1
        decision = self._decisions.get(topic)
        if decision is None:
            if not is_valid_topic(topic):
                # [MQTT-3.3.2-2] / [MQTT-4.7.2-1]: a protocol violation ends the connection.
                log.info(
                    "client %s published to invalid topic %s: closing",
                    clip(self._client_id),
                    clip(topic),
                    extra=CLIENT,
                )
                self._dropped["invalid_topic"] += 1
                return False
            decision = self._decide(topic)
            if len(self._decisions) >= MAX_TOPICS:
                self._decisions.clear()
            self._decisions[topic] = decision
        if decision:
            self._refused(topic, decision)
            return True  # 3.1.1 has no way to say "refused": acknowledged, dropped
        return True if self._send(topic, payload, qos, settle) else None

    def _decide(self, topic: str) -> str:
        if len(topic) > self._max_topic and len(topic.encode()) > self._max_topic:
            return "topic_too_long"
        if not self._may_publish(topic):
            return "acl"
        return _ALLOWED

    def _refused(self, topic: str, reason: str) -> None:
        """Counted and logged every time (the log's rate limit keeps a flood to a few lines)."""
        self._dropped[reason] += 1
        if reason == "topic_too_long":
            log.info(
                "client %s published to a topic over %d bytes",
                clip(self._client_id),
                self._max_topic,
                extra=CLIENT,
            )
        else:
            log.info("client %s may not publish to %s", clip(self._client_id), clip(topic), extra=CLIENT)
