"""The market-bridge broker: amqtt 0.12.1's ``Broker`` with the paths it gets wrong owned here.

What this subclass changes (see ../shared/notes/amqtt-0.12.1.md for the defects):

- Listeners are built from :class:`~bridge.config.BridgeConfig`, each on its own (no field
  inherited from a 'default' listener), WebSocket only on its configured path, no semaphore
  that leaves clients hanging, and a taken port fails startup naming the listener.
- A connection is authenticated *before* any session is touched; a failed CONNECT wipes,
  takes over or leaves nothing. Takeover waits for the old connection to finish.
- Whatever way a connection ends, its session is left disconnected (clean ones deleted).
- Keep-alive is enforced (1.5 x keep-alive, then the will is published) and a socket that
  sends no CONNECT is closed after ``connect_timeout_s``.
- Retained messages go only to the subscriber's own new subscriptions, once per topic.
- Publishes to ``market/...`` are validated ticks; the broker stamps ``seq`` per topic and
  keeps the last valid tick per topic as the retained snapshot.
- Fan-out looks filters up in a :class:`~bridge.topics.TopicIndex`, delivers at
  min(publish QoS, subscription QoS), and bounds amqtt's in-memory offline queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Any

import websockets
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action
from amqtt.contexts import ListenerConfig as AmqttListenerConfig
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session
from amqtt.utils import gen_client_id
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from bridge.config import BridgeConfig, ListenerConfig, TlsConfig, WsListenerConfig
from bridge.errors import ListenerError, MarketBridgeError, TickError
from bridge.topics import TopicIndex, is_valid_topic, matches
from feeds.sequencer import Sequencer
from feeds.tick import MARKET_PREFIX, Tick

__all__ = ["BrokerStats", "MarketBroker"]

log = logging.getLogger(__name__)

_SUBACK_FAILURE = 0x80


@dataclass
class BrokerStats:
    """Counters the broker keeps; metrics and tests read them."""

    connections: int = 0
    connects: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    ticks_accepted: int = 0
    ticks_rejected: Counter[str] = field(default_factory=Counter)
    publishes_dropped: Counter[str] = field(default_factory=Counter)
    deliveries: int = 0
    offline_dropped: int = 0
    keepalive_timeouts: int = 0
    connect_timeouts: int = 0


class MarketProtocolHandler(BrokerProtocolHandler):
    """amqtt's handler with keep-alive enforced: a read timeout ends the connection."""

    keepalive_expired = False

    def handle_read_timeout(self) -> None:
        # amqtt ignores this; we treat it as a dead client (the will gets published).
        self.keepalive_expired = True
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(eq=False)
class _Connection:
    """One live network connection bound to a session."""

    client_id: str
    session: Session
    handler: MarketProtocolHandler
    done: asyncio.Event = field(default_factory=asyncio.Event)


class MarketBroker(Broker):
    """Embedded amqtt broker serving ``market/<exchange>/<pair>`` (see module docstring)."""

    def __init__(self, config: BridgeConfig, *, plugins: dict[str, Any] | None = None) -> None:
        self.bridge_config = config
        amqtt_config: dict[str, Any] = {
            # amqtt insists on a 'default' listener; ours are started by _start_listeners.
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
            # Always explicit: an absent 'plugins' gives amqtt's anonymous-allowed defaults.
            "plugins": plugins
            if plugins is not None
            else {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        super().__init__(amqtt_config)
        self.stats = BrokerStats()
        self._index = TopicIndex()
        self._session_filters: dict[str, set[str]] = {}
        self._connections: dict[str, _Connection] = {}
        self._client_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._sequencer = Sequencer()

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MarketBroker]:
        """``async with broker.running():`` start, and always shut down."""
        await self.start()
        try:
            yield self
        finally:
            await self.shutdown()

    async def start(self) -> None:
        try:
            await super().start()
        except BrokerError as exc:
            await self._close_servers()
            cause = exc.__cause__
            if isinstance(cause, MarketBridgeError):
                raise cause from None
            raise

    async def shutdown(self) -> None:
        for connection in list(self._connections.values()):
            # Clean close: no will for clients we are closing ourselves.
            connection.session.will_flag = False
        await super().shutdown()
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def _close_servers(self) -> None:
        for server in self._servers.values():
            with suppress(Exception):
                await server.close_instance()
        self._servers.clear()

    def bound_port(self, listener: str) -> int:
        """The port a listener actually bound (useful with ``port: 0``)."""
        instance = self._servers[listener].instance
        sock = next(iter(instance.sockets), None) if instance is not None else None
        if sock is None:
            raise KeyError(listener)
        return int(sock.getsockname()[1])

    def listener_names(self) -> list[str]:
        return list(self._servers)

    async def _start_listeners(self) -> None:
        listeners = self.bridge_config.listeners
        for name, listener in (("ws", listeners.ws), ("tcp", listeners.tcp)):
            if not listener.enabled:
                continue
            instance = await self._bind(name, listener)
            # max_connections=0: no semaphore (amqtt's makes extra clients hang without CONNACK).
            self._servers[name] = Server(name, instance, 0)
            log.info("listener %s bound to %s:%s", name, listener.host, self.bound_port(name))

    async def _bind(self, name: str, listener: ListenerConfig) -> Any:
        ssl_context = _ssl_context(listener.tls) if listener.tls else None
        try:
            if isinstance(listener, WsListenerConfig):
                return await websockets.serve(
                    partial(self.ws_connected, listener_name=name),
                    listener.host,
                    listener.port,
                    ssl=ssl_context,
                    subprotocols=[websockets.Subprotocol("mqtt")],
                    compression="deflate" if listener.compression else None,
                    max_size=listener.max_message_bytes,
                    ping_interval=listener.ping_interval_s,
                    process_request=_only_path(listener.path),
                )
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=name),
                listener.host,
                listener.port,
                ssl=ssl_context,
                reuse_address=True,
            )
        except OSError as exc:
            raise ListenerError(name, listener.host, listener.port, exc.strerror or str(exc)) from exc

    # ------------------------------------------------------------------ connections

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            await _close_quietly(writer)
            return
        server.conn_count += 1
        try:
            await self._serve(listener_name, reader, writer)
        except Exception:
            # Client input must never take the broker down; log with the stack and move on.
            log.exception("connection on %s failed", listener_name)
        finally:
            server.conn_count -= 1
            await _close_quietly(writer)

    async def _serve(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        peer = writer.get_peer_info()
        timeout = self.bridge_config.broker.connect_timeout_s
        try:
            handler, incoming = await asyncio.wait_for(
                MarketProtocolHandler.init_from_connect(reader, writer, self.plugins_manager), timeout
            )
        except TimeoutError:
            self.stats.connect_timeouts += 1
            log.info("no CONNECT from %s within %.1fs: closing", peer, timeout)
            return
        except Exception as exc:
            log.info("bad CONNECT from %s on %s: %s", peer, listener_name, exc or type(exc).__name__)
            return
        assert isinstance(handler, MarketProtocolHandler)
        if not incoming.client_id:
            incoming.client_id = gen_client_id()
        # [MQTT-3.1.2-24]: no packet within 1.5 x keep-alive means the client is gone.
        incoming.keep_alive = math.ceil(incoming.keep_alive * 1.5)
        client_id = incoming.client_id

        # Authenticate first: a refused CONNECT must not touch any session.
        if not await self._authenticate(incoming, AmqttListenerConfig()):
            self.stats.refusals["not_authorized"] += 1
            log.info("refused %s from %s: not authorized", client_id, peer)
            await _refuse(writer, NOT_AUTHORIZED)
            return

        lock = self._client_locks.setdefault(client_id, asyncio.Lock())
        async with lock:
            session = await self._adopt_session(incoming)
            handler.attach(session, reader, writer)
            session.transitions.connect()
            self._sessions[client_id] = (session, handler)
            connection = _Connection(client_id, session, handler)
            self._connections[client_id] = connection
        self.stats.connections += 1
        self.stats.connects += 1
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
            )
            await handler.start()
            await self._publish_session_retained_messages(session)
            await self._client_message_loop(session, handler)
        finally:
            self.stats.connections -= 1
            if handler.keepalive_expired:
                self.stats.keepalive_timeouts += 1
            await self._release(connection)

    async def _adopt_session(self, incoming: Session) -> Session:
        """Take over a live connection, then reuse or replace the stored session."""
        client_id = incoming.client_id
        assert client_id is not None
        live = self._connections.get(client_id)
        if live is not None:
            log.info("client %s connected again: taking over its connection", client_id)
            await live.handler.handle_connection_closed()
            try:
                await asyncio.wait_for(live.done.wait(), self.bridge_config.broker.takeover_timeout_s)
            except TimeoutError:
                log.warning("old connection of %s did not finish in time", client_id)
                await self._release(live)
        if incoming.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            return incoming
        stored = self._sessions.get(client_id)
        if stored is None:
            incoming.parent = 0
            return incoming
        session = stored[0]
        # The new CONNECT brings fresh will, keep-alive and credentials.
        session.will_flag = incoming.will_flag
        session.will_message = incoming.will_message
        session.will_topic = incoming.will_topic
        session.will_qos = incoming.will_qos
        session.will_retain = incoming.will_retain
        session.keep_alive = incoming.keep_alive
        session.username = incoming.username
        session.password = incoming.password
        session.remote_address = incoming.remote_address
        session.remote_port = incoming.remote_port
        session.clean_session = False
        session.parent = 1
        return session

    async def _release(self, connection: _Connection) -> None:
        """Leave the session disconnected, whatever ended the connection (idempotent)."""
        client_id = connection.client_id
        if self._connections.get(client_id) is connection:
            del self._connections[client_id]
        session = connection.session
        if (
            session.transitions.is_connected()
            and self._sessions.get(client_id, (None, None))[1] is connection.handler
        ):
            session.transitions.disconnect()
        with suppress(Exception):
            await connection.handler.stop()
        stored = self._sessions.get(client_id)
        if session.clean_session and stored is not None and stored[1] is connection.handler:
            await self._delete_session(client_id)
        connection.done.set()

    async def _topic_allowed(self, session: Session, topic: str, action: Action) -> bool:
        if not self.plugins_manager.is_topic_filtering_enabled():
            return True
        results = await self.plugins_manager.map_plugin_topic(session=session, topic=topic, action=action)
        return all(result for result in results.values())

    # ------------------------------------------------------------------ inbound publishes

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message: ApplicationMessage | None = wait_deliver.result()
        if message is None:
            return True
        topic = message.topic
        if not topic or not is_valid_topic(topic) or topic.startswith("$"):
            # [MQTT-3.3.2-2] / [MQTT-4.7.2-1]: a protocol violation ends the connection.
            log.info("client %s published to invalid topic %r: closing", client_session.client_id, topic)
            self.stats.publishes_dropped["invalid_topic"] += 1
            return False
        if not await self._topic_allowed(client_session, topic, Action.PUBLISH):
            self.stats.publishes_dropped["acl"] += 1
            log.info("client %s may not publish to %s", client_session.client_id, topic)
            return True
        data = bytes(message.data or b"")
        if topic.startswith(MARKET_PREFIX):
            try:
                tick = Tick.decode(data, topic=topic)
            except TickError as exc:
                self.stats.ticks_rejected[exc.reason] += 1
                log.warning("dropped tick from %s on %s: %s", client_session.client_id, topic, exc)
                return True
            await self.publish_tick(tick, qos=message.qos or QOS_0)
            return True
        await self._broadcast_message(client_session, topic, data, message.qos or QOS_0)
        if message.publish_packet is not None and message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, data, message.qos)
        return True

    async def publish(self, tick: Tick) -> None:
        """TickSink: in-process feeds publish straight into the broker, skipping the network."""
        await self.publish_tick(tick)

    async def publish_tick(self, tick: Tick, *, qos: int = QOS_0) -> Tick:
        """Sequence, snapshot and fan out a validated tick; returns it as sent."""
        topic = tick.topic
        stamped = tick.with_seq(self._sequencer.next(topic))
        data = stamped.encode()
        self.stats.ticks_accepted += 1
        # The snapshot is kept whatever the publisher's retain flag: a new subscriber
        # always gets the last valid tick per topic.
        self._retained_messages[topic] = RetainedApplicationMessage(None, topic, data, QOS_0)
        await self._broadcast_message(None, topic, data, qos)
        return stamped

    # ------------------------------------------------------------------ subscriptions

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = await super().add_subscription(subscription, session)
        if granted != _SUBACK_FAILURE and session.client_id is not None:
            topic_filter = subscription[0]
            self._index.add(topic_filter)
            self._session_filters.setdefault(session.client_id, set()).add(topic_filter)
        return granted

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        subscriptions = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        granted = [
            (sub[0], code)
            for sub, code in zip(subscriptions.topics, codes, strict=True)
            if code != _SUBACK_FAILURE
        ]
        for topic_filter, qos in granted:
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=qos,
            )
        await self._send_retained(client_session, handler, granted)

    async def _send_retained(
        self, session: Session, handler: BrokerProtocolHandler, granted: list[tuple[str, int]]
    ) -> None:
        """Each retained topic matching this SUBSCRIBE's granted filters, once, at the best QoS."""
        if not granted:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            qos = max((q for f, q in granted if matches(topic, f)), default=None)
            if qos is None:
                continue
            if not await self._topic_allowed(session, topic, Action.RECEIVE):
                continue
            sends.append(
                handler.mqtt_publish(topic, retained.data, min(qos, retained.qos or QOS_0), retain=True)
            )
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.info("retained delivery to %s failed: %s", session.client_id, result)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        if deleted and session.client_id is not None:
            filters = self._session_filters.get(session.client_id)
            if filters is not None:
                filters.discard(a_filter)
                if not filters:
                    del self._session_filters[session.client_id]
        if not self._subscriptions.get(a_filter, True):
            del self._subscriptions[a_filter]
            self._index.remove(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # Only this session's filters, not a scan of every filter on the broker.
        for topic_filter in list(self._session_filters.get(session.client_id or "", ())):
            self._del_subscription(topic_filter, session)

    # ------------------------------------------------------------------ fan-out

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data = broadcast["data"]
        if topic is None or data is None:
            return
        publish_qos: int | None = broadcast.get("qos")
        for topic_filter in self._index.match(topic):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                qos = sub_qos if publish_qos is None else min(publish_qos, sub_qos)
                if not await self._topic_allowed(target, topic, Action.RECEIVE):
                    continue
                if not target.transitions.is_connected():
                    if qos in (QOS_1, QOS_2) and not target.clean_session:
                        self._queue_offline(target, topic, data, qos)
                    continue
                handler = self._get_handler(target)
                if handler is None:
                    continue
                task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
                self._deliveries.add(task)
                task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task[Any]) -> None:
        self._deliveries.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.stats.deliveries += 1
        else:
            log.debug("delivery failed: %s", exc)

    def _queue_offline(self, session: Session, topic: str, data: bytes | bytearray, qos: int) -> None:
        queue = session.retained_messages
        limit = self.bridge_config.broker.max_offline_messages
        while queue.qsize() >= limit and not queue.empty():
            queue.get_nowait()
            self.stats.offline_dropped += 1
            log.warning("offline queue of %s full (%d): dropped its oldest message", session.client_id, limit)
        if limit > 0:
            queue.put_nowait(RetainedApplicationMessage(None, topic, data, qos))


async def _refuse(writer: WriterAdapter, code: int) -> None:
    with suppress(Exception):
        await ConnackPacket.build(0, code).to_stream(writer)


async def _close_quietly(writer: WriterAdapter) -> None:
    with suppress(Exception):
        await writer.close()


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tls.cafile) if tls.cafile else None
    )
    context.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    return context


def _only_path(path: str) -> Callable[[ServerConnection, Request], Response | None]:
    def check(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != path:
            return connection.respond(HTTPStatus.NOT_FOUND, f"MQTT is served on {path}\n")
        return None

    return check
