"""Every error market-bridge raises on purpose derives from :class:`MarketBridgeError`.

Tree::

    MarketBridgeError
    ├── ConfigError          bad configuration: names the field and the file (operator's fault)
    ├── ListenerError        a listener cannot start, e.g. its port is taken (environment)
    ├── TickError            a tick payload is invalid (the publisher's fault)
    ├── AuthError            a client's credentials are refused (the client's fault)
    ├── MessageError         a message cannot be accepted: bad address or envelope (sender)
    ├── ProtocolError        a client broke MQTT framing: its connection is closed
    ├── StoreError           the offline store failed (bridge.core.store)
    │   └── StoreUnavailable the store cannot be reached right now (retry later)
    ├── ClusterError         the cluster's shared Redis (bridge.cluster)
    │   ├── ClusterUnavailable   it cannot be reached or is overloaded right now (retry later)
    │   └── ClusterMessageError  a message on a cluster channel is malformed (another writer
    │                            or a version skew: dropped and counted)
    ├── FeedError            a feed cannot produce ticks
    │   ├── ExchangeError    the exchange answered with an error body or status (remote)
    │   └── AdapterError     the exchange's body is not in the documented shape (remote)
    └── VendorError          the dashboard's MQTT.js bundle cannot be fetched or verified

Errors carry structured fields so callers (logs, metrics, tests) need not parse messages.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AuthError",
    "ClusterError",
    "ClusterMessageError",
    "ClusterUnavailable",
    "ConfigError",
    "ExchangeError",
    "FeedError",
    "ListenerError",
    "MarketBridgeError",
    "MessageError",
    "ProtocolError",
    "TickError",
    "VendorError",
]


class MarketBridgeError(Exception):
    """Root of all market-bridge errors."""


class ConfigError(MarketBridgeError):
    """The configuration is invalid; ``field`` is a dotted path, ``source`` the file or 'env'."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"config error{where}: {field}: {message}")


class ListenerError(MarketBridgeError):
    """A listener could not be started."""

    def __init__(self, listener: str, host: str, port: int, reason: str) -> None:
        self.listener = listener
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"listener '{listener}' cannot bind {host}:{port}: {reason}")


class TickError(MarketBridgeError):
    """A published tick was rejected; ``reason`` is a short stable code used in metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"invalid tick ({reason}): {detail}")


class AuthError(MarketBridgeError):
    """Credentials refused; ``reason`` is a short stable code (logs, metrics), ``detail`` says why.

    ``detail`` never contains the token itself.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"auth refused ({reason}): {detail}")


class MessageError(MarketBridgeError):
    """A message cannot be accepted; ``reason`` is a stable code for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"message refused ({reason}): {detail}")


class ProtocolError(MarketBridgeError):
    """A client broke MQTT framing; the connection is closed ([MQTT-4.8.0-1])."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"protocol violation ({reason}): {detail}")


class FeedError(MarketBridgeError):
    """A feed could not produce ticks."""

    def __init__(self, exchange: str, message: str) -> None:
        self.exchange = exchange
        self.message = message
        super().__init__(f"{exchange}: {message}")


class ExchangeError(FeedError):
    """The exchange answered with an error (HTTP status or a documented error body)."""

    def __init__(
        self, exchange: str, message: str, *, status: int | None = None, code: str | None = None
    ) -> None:
        self.status = status
        self.code = code
        super().__init__(exchange, message)


class AdapterError(FeedError):
    """The exchange's answer is not in the shape its documentation gives."""


class ClusterError(MarketBridgeError):
    """The cluster's shared Redis could not do what was asked."""


class ClusterUnavailable(ClusterError):
    """Redis cannot be reached (or the node is too far behind it) right now; ``operation``
    names what failed. The cause is chained (``raise ... from``)."""

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"cluster unavailable ({operation}): {detail}")


class ClusterMessageError(ClusterError):
    """A message on a cluster channel (tick batch, control command) is not well formed."""


class VendorError(MarketBridgeError):
    """A vendored browser bundle (the dashboard's MQTT.js) cannot be fetched or fails its
    integrity check; ``what`` names the bundle."""

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(f"{what}: {detail}")
