"""The broker's listeners: our own sockets, bound from the config, in amqtt's ``_servers`` table.

Each listener is built from :class:`~bridge.config.BridgeConfig` on its own (no field
inherited from a 'default' listener), WebSocket only on its configured path, with no
semaphore that leaves clients hanging; a taken port or an unusable TLS certificate fails
startup naming the listener. The protocols are ours (bridge/edge/streams.py,
ws_connection.py); each accepted connection goes to admission (bridge/edge/admission.py).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from contextlib import suppress
from functools import partial
from typing import Any

from amqtt.broker import Server

from bridge.config import ListenerConfig, TlsConfig, WsListenerConfig
from bridge.core.forwarded import TrustedProxies, parse_networks
from bridge.edge.state import BrokerState, log
from bridge.edge.streams import Listener, TcpConnection
from bridge.edge.ws_connection import WsListener
from bridge.errors import ListenerError

__all__ = ["ListenersMixin"]


class ListenersMixin(BrokerState):
    """Binding, closing and reporting the listeners (``_start_listeners`` in broker.py calls ``_bind``)."""

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

    def listener_connections(self) -> dict[str, int]:
        return {name: server.conn_count for name, server in self._servers.items()}

    async def _open_listeners(self) -> None:
        listeners = self.bridge_config.listeners
        for name, listener in (("ws", listeners.ws), ("tcp", listeners.tcp)):
            if not listener.enabled:
                continue
            instance = await self._bind(name, listener)
            # max_connections=0: no semaphore (amqtt's makes extra clients hang without CONNACK).
            self._servers[name] = Server(name, instance, 0)
            log.info("listener %s bound to %s:%s", name, listener.host, self.bound_port(name))

    async def _bind(self, name: str, listener: ListenerConfig) -> Any:
        try:
            ssl_context = _ssl_context(listener.tls) if listener.tls else None
        except (OSError, ValueError) as exc:
            raise ListenerError(name, listener.host, listener.port, f"TLS certificate or key: {exc}") from exc
        serve = partial(self._client_connected, name)
        # SO_REUSEPORT for --workers: each worker binds the same ports, the kernel spreads.
        reuse_port = self.bridge_config.listeners.reuse_port or None
        try:
            # Our own protocols, one object per socket (bridge/edge/streams.py, ws_connection.py).
            if isinstance(listener, WsListenerConfig):
                ws = WsListener(
                    name,
                    serve,
                    path=listener.path,
                    connect_budget=self._connect_budget,
                    max_size=listener.max_message_bytes,
                    compression=listener.compression,
                    ping_interval=listener.ping_interval_s,
                    origins=self.ws_origins,
                    trusted_proxies=TrustedProxies(parse_networks(listener.trusted_proxies)),
                    refusals=self.stats.refusals,
                    log=log,
                )
                ws.server = await asyncio.get_running_loop().create_server(
                    ws.connection,
                    listener.host,
                    listener.port,
                    ssl=ssl_context,
                    reuse_address=True,
                    reuse_port=reuse_port,
                )
                return ws
            tcp = Listener(name, serve)
            return await asyncio.get_running_loop().create_server(
                partial(TcpConnection, tcp),
                listener.host,
                listener.port,
                ssl=ssl_context,
                reuse_address=True,
                reuse_port=reuse_port,
            )
        except OSError as exc:
            # asyncio's strerror repeats the address: "error while attempting to bind on ...".
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenerError(name, listener.host, listener.port, reason) from exc


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tls.cafile) if tls.cafile else None
    )
    context.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    return context
