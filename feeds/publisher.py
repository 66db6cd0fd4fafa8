"""Publish ticks to a broker over MQTT (TCP or WebSocket) with paho-mqtt.

paho runs its network loop in its own thread and reconnects by itself with exponential
backoff (``reconnect_delay_set``); ``publish`` is thread-safe. While disconnected, ticks are
dropped and counted rather than queued: a stale tick is worth nothing, and the broker's
snapshot is refreshed by the next one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core.sequencer import Sequencer
from bridge.core.tick import Tick
from bridge.errors import ConfigError

__all__ = ["BrokerUrl", "MqttTickPublisher", "parse_broker_url"]

log = logging.getLogger(__name__)

_SCHEMES = {
    "mqtt": ("tcp", False, 1883),
    "mqtts": ("tcp", True, 8883),
    "ws": ("websockets", False, 80),
    "wss": ("websockets", True, 443),
}


@dataclass(frozen=True)
class BrokerUrl:
    transport: str  # "tcp" or "websockets" (paho's names)
    tls: bool
    host: str
    port: int
    path: str


def parse_broker_url(url: str) -> BrokerUrl:
    """``mqtt://host:1883``, ``mqtts://…``, ``ws://host:8083/mqtt`` or ``wss://…``."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ConfigError("broker", f"{url!r} is not mqtt://, mqtts://, ws:// or wss:// with a host")
    transport, tls, default_port = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError("broker", f"{url!r} has an invalid port") from None
    return BrokerUrl(transport, tls, parts.hostname, port, parts.path or "/mqtt")


class MqttTickPublisher:
    """A :class:`~feeds.base.TickSink` that publishes to ``market/<exchange>/<pair>``.

    Use as ``async with MqttTickPublisher(url) as sink: await sink.publish(tick)``.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        qos: int = 0,
        keepalive_s: int = 30,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
    ) -> None:
        self.url = parse_broker_url(url)
        self.qos = qos
        self.published = 0
        self.dropped_offline = 0
        self.connects = 0
        self._keepalive_s = keepalive_s
        # Set from paho's thread through the loop, so asyncio code can await them.
        self._online = asyncio.Event()
        self._offline = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sequencer = Sequencer()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or "",
            protocol=mqtt.MQTTv311,
            transport=self.url.transport,  # type: ignore[arg-type]
        )
        if self.url.transport == "websockets":
            self._client.ws_set_options(path=self.url.path)
        if self.url.tls:
            self._client.tls_set()
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    def _set_online(self, online: bool) -> None:
        (self._online if online else self._offline).set()
        (self._offline if online else self._online).clear()

    def _from_paho_thread(self, online: bool) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._set_online, online)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        if rc.is_failure:
            log.warning("broker %s:%s refused the feed: %s", self.url.host, self.url.port, rc)
            return
        self.connects += 1
        self._from_paho_thread(True)
        log.info("feed publisher connected to %s:%s", self.url.host, self.url.port)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        log.warning("feed publisher lost the broker (%s); reconnecting with backoff", rc)
        self._from_paho_thread(False)

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive_s)
        self._client.loop_start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    async def wait_connected(self) -> None:
        """Return once connected; bound it with ``asyncio.timeout``."""
        await self._online.wait()

    async def wait_disconnected(self) -> None:
        await self._offline.wait()

    async def publish(self, tick: Tick) -> None:
        if not self._online.is_set():
            self.dropped_offline += 1
            return
        stamped = tick.with_seq(self._sequencer.next(tick.topic))
        info = self._client.publish(tick.topic, stamped.encode(), qos=self.qos)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.published += 1
        else:
            self.dropped_offline += 1
