"""The one typed configuration, loaded from YAML with ``MARKET_BRIDGE_...`` overrides.

Precedence: environment > file > defaults. Nested fields use ``__`` in variable names,
e.g. ``MARKET_BRIDGE_LISTENERS__TCP__PORT=1884``; lists and objects take JSON values,
e.g. ``MARKET_BRIDGE_FEEDS='[{"kind": "simulator"}]'``. Unknown keys are errors. Every
error is a :class:`~bridge.errors.ConfigError` naming the field and where it came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from bridge.anonymous import sub_acl_problem
from bridge.core.forwarded import parse_networks
from bridge.core.origin import OriginPolicy
from bridge.core.ratelimit import MAX_RATE, MIN_RATE
from bridge.core.topics import is_valid_filter
from bridge.errors import ConfigError
from feeds.poller import FEED_KINDS

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEV_SECRET_PATH",
    "ENV_PREFIX",
    "HMAC_ALGORITHMS",
    "AnonymousConfig",
    "AuthConfig",
    "BridgeConfig",
    "BrokerSettings",
    "ClusterConfig",
    "HttpConfig",
    "KeyConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LoggingConfig",
    "PollerFeedConfig",
    "RateLimitConfig",
    "ReplayFeedConfig",
    "SimulatorFeedConfig",
    "StoreConfig",
    "TimezonesConfig",
    "TlsConfig",
    "TopicRatesConfig",
    "WsListenerConfig",
    "load_config",
    "redact_url",
    "redacted",
]

ENV_PREFIX = "MARKET_BRIDGE_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "bridge.yaml"
# The shipped config's development HMAC key; `market-bridge demo` creates it when missing.
DEV_SECRET_PATH = Path("var/dev-jwt.secret")

Port = Annotated[int, Field(ge=0, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    certfile: FilePath
    keyfile: FilePath
    cafile: FilePath | None = None


class ListenerConfig(_Strict):
    """A TCP listener (MQTT 3.1.1). ``port: 0`` takes a free ephemeral port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 1883
    tls: TlsConfig | None = None


class WsListenerConfig(ListenerConfig):
    """A WebSocket listener: subprotocol ``mqtt``, only ``path`` is served."""

    port: Port = 8083
    path: str = "/mqtt"
    # permessage-deflate makes every connection's frames differ (one deflate context each):
    # market data is small and hot, so it stays off unless asked for.
    compression: bool = False
    max_message_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024
    # WebSocket-level pings are off: MQTT keep-alive (enforced by the broker) already finds
    # dead clients, and paho-mqtt 2.x answers a ping with an *unmasked* pong, which is a
    # protocol error that makes the server drop the client (websockets' default: every 20 s).
    ping_interval_s: PositiveSeconds | None = None
    # Pages (scheme://host[:port]) whose browsers may connect; None: any. Others get HTTP
    # 403; a handshake without Origin (not a browser) is allowed. bridge/core/origin.py.
    allowed_origins: Annotated[list[str], Field(max_length=1000)] | None = None
    # Proxies (CIDR) whose X-Forwarded-For names the client; bridge/core/forwarded.py.
    trusted_proxies: Annotated[list[str], Field(max_length=1000)] = []

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted(OriginPolicy(value).allowed)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(network) for network in parse_networks(value)]

    @field_validator("path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or " " in value:
            raise ValueError("must start with '/' and contain no query or spaces")
        return value


class ListenersConfig(_Strict):
    ws: WsListenerConfig = WsListenerConfig()
    tcp: ListenerConfig = ListenerConfig()
    # SO_REUSEPORT: several processes bind the same ports and the kernel spreads new
    # connections over them (`market-bridge run --workers N` sets it for its workers).
    reuse_port: bool = False

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        if not (self.ws.enabled or self.tcp.enabled):
            raise ValueError("at least one of ws and tcp must be enabled")
        if self.ws.enabled and self.tcp.enabled and self.ws.port == self.tcp.port != 0:
            raise ValueError(f"ws and tcp both use port {self.ws.port}")
        return self


class BrokerSettings(_Strict):
    # A socket that never sends CONNECT holds memory and a file descriptor: close it.
    connect_timeout_s: PositiveSeconds = 10.0
    # amqtt keeps a persistent session's offline QoS>0 messages in memory: cap them.
    max_offline_messages: Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    takeover_timeout_s: PositiveSeconds = 5.0
    # Per connection: above this many unsent bytes, QoS 0 messages are conflated (latest per
    # topic kept) instead of queued, so a stalled client costs bounded memory.
    max_outbound_bytes: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = 256 * 1024
    # Kernel send buffer per client socket (SO_SNDBUF); None keeps the OS default. Smaller
    # means less kernel memory per idle connection and earlier conflation for slow ones.
    socket_send_buffer_bytes: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] | None = None
    # Unacknowledged direct QoS 1 market deliveries per connection; beyond it they are
    # conflated like QoS 0 (latest per topic) until PUBACKs come back. 4096 ~250-byte ticks
    # is about what TCP buffers hold in flight, so a client reading and acking at full speed
    # never meets it (1000 did: 0.5% conflated in the QoS 1 bench); one that reads and never
    # acks costs at most ~4096 x 150 bytes of bookkeeping.
    max_inflight_messages: Annotated[int, Field(ge=1, le=65_000)] = 4096
    # Writes to each connection are coalesced for up to this long: a subscriber getting a
    # few ticks a second costs one send() per window instead of one per tick. 0 writes at
    # the end of every event-loop step. Bounded, as every millisecond is added latency.
    flush_interval_ms: Annotated[float, Field(ge=0, le=50)] = 2.0
    # Largest MQTT packet a client may send after CONNECT; bigger closes the connection
    # before its body is buffered.
    max_packet_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    # Graceful stop (SIGTERM): how long in-flight deliveries get before the broker closes.
    drain_timeout_s: PositiveSeconds = 10.0
    # The event loop `market-bridge run` uses: the standard library's, or uvloop (libuv).
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    # A persistent session (its subscriptions, and its user's queue once the user has no
    # other) is deleted after this long disconnected. A phone gone for a week starts afresh.
    session_expiry_s: Annotated[float, Field(gt=0, le=366 * 86400)] = 7 * 86400.0


class SimulatorFeedConfig(_Strict):
    kind: Literal["simulator"]
    interval_s: PositiveSeconds = 1.0
    seed: int | None = None
    # "exchange/PAIR" strings, e.g. "luno/BTC-ZAR"; empty means the simulator's default set.
    markets: list[str] = []

    @field_validator("markets")
    @classmethod
    def _market_form(cls, value: list[str]) -> list[str]:
        for market in value:
            exchange, _, pair = market.partition("/")
            if not exchange or not pair:
                raise ValueError(f"{market!r} is not 'exchange/PAIR'")
        return value


class ReplayFeedConfig(_Strict):
    kind: Literal["replay"]
    path: FilePath
    speed: Annotated[float, Field(ge=0)] = 1.0
    loop: bool = True


class PollerFeedConfig(_Strict):
    # Pydantic needs the names spelled out to tell feeds apart; a test holds them equal to
    # feeds.poller.POLLED_EXCHANGES, the list every other place reads.
    kind: Literal["luno", "valr", "quidax"]
    base_url: AnyHttpUrl
    # Exchange symbols as the exchange spells them; empty polls the all-tickers endpoint.
    pairs: list[str] = []
    interval_s: PositiveSeconds = 2.0


FeedConfig = Annotated[SimulatorFeedConfig | ReplayFeedConfig | PollerFeedConfig, Field(discriminator="kind")]


JwtAlgorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
HMAC_ALGORITHMS: frozenset[str] = frozenset({"HS256", "HS384", "HS512"})


class KeyConfig(_Strict):
    """One verification key: an HMAC secret (inline or file) or a PEM public key file.

    ``algorithms`` is the explicit allowlist for this key; HMAC algorithms only with a
    secret and asymmetric ones only with a public key, so HMAC/RSA confusion cannot arise.
    ``private_key_file`` (PEM) is optional and only used by ``market-bridge token``.
    """

    kid: str | None = None
    algorithms: Annotated[list[JwtAlgorithm], Field(min_length=1)]
    secret: SecretStr | None = None
    secret_file: FilePath | None = None
    public_key_file: FilePath | None = None
    private_key_file: FilePath | None = None

    @model_validator(mode="after")
    def _one_source_matching_algorithms(self) -> Self:
        sources = [s for s in (self.secret, self.secret_file, self.public_key_file) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of secret, secret_file, public_key_file")
        hmac = {a in HMAC_ALGORITHMS for a in self.algorithms}
        if len(hmac) != 1:
            raise ValueError("do not mix HMAC (HS*) and asymmetric algorithms on one key")
        is_hmac = hmac.pop()
        if is_hmac and self.public_key_file is not None:
            raise ValueError("HS* algorithms need a secret, not a public key")
        if not is_hmac and self.public_key_file is None:
            raise ValueError(f"{self.algorithms[0]} needs public_key_file")
        if self.secret is not None and len(self.secret.get_secret_value()) < 32:
            raise ValueError("an HMAC secret must be at least 32 characters")
        return self


def _iana_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone") from None
    return value


class AnonymousConfig(_Strict):
    """Public read-only access for CONNECTs without a password (bridge/anonymous.py)."""

    enabled: bool = False
    # Never user/, service/ or $ topics, nor a leading wildcard that reaches them.
    sub_acl: Annotated[list[str], Field(min_length=1, max_length=100)] = ["market/#"]
    tz: Annotated[str, AfterValidator(_iana_zone)] = "UTC"
    # Anonymous connections in total (per node, or cluster-wide), apart from the JWT users'.
    max_connections: Annotated[int, Field(ge=0, le=10_000_000)] = 1000

    @field_validator("sub_acl")
    @classmethod
    def _public_filters(cls, value: list[str]) -> list[str]:
        for topic_filter in value:
            if (problem := sub_acl_problem(topic_filter)) is not None:
                raise ValueError(problem)
        return value


class AuthConfig(_Strict):
    enabled: bool = True
    keys: list[KeyConfig] = []
    jwks_file: FilePath | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_s: Annotated[float, Field(ge=0, le=300)] = 30.0
    require_iat: bool = False
    max_token_bytes: Annotated[int, Field(ge=256, le=65536)] = 8192
    # Verified tokens remembered (bridge/token_cache.py), least recently used evicted; 0: none.
    token_cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = 10_000
    # Zone for users whose token has no tz claim.
    default_tz: Annotated[str, AfterValidator(_iana_zone)] = "UTC"
    anonymous: AnonymousConfig = AnonymousConfig()

    @model_validator(mode="after")
    def _has_keys(self) -> Self:
        if self.enabled and not self.keys and self.jwks_file is None:
            raise ValueError("auth is enabled but no keys or jwks_file are configured")
        if self.anonymous.enabled and not self.enabled:
            raise ValueError("anonymous.enabled needs auth enabled (without auth every client is admitted)")
        kids = [k.kid for k in self.keys]
        if len(kids) != len(set(kids)):
            raise ValueError("key ids (kid) must be unique")
        return self


def _not_a_bool(value: object) -> object:
    # Lax float parsing (needed for environment strings) would read YAML `true` as 1/s.
    if isinstance(value, bool):
        raise ValueError("must be a number of messages per second, not a boolean")
    return value


def _zero_or_in_range(value: float) -> float:
    if 0 < value < MIN_RATE:
        raise ValueError(f"must be 0 (no limit) or at least {MIN_RATE:g}")
    return value


# Messages per second; 0 means no limit. NaN and infinities are refused (YAML .nan / .inf).
Rate = Annotated[
    float,
    # Constraints first: they stay in pydantic's float check, so NaN is reported as "not finite".
    Field(ge=0, le=MAX_RATE, allow_inf_nan=False),
    BeforeValidator(_not_a_bool),
    AfterValidator(_zero_or_in_range),
]


class TopicRatesConfig(_Strict):
    """Max updates per second per topic delivered to a connection, by its token's role."""

    # Market-data users expect every tick: no limit unless an operator sets one.
    subscriber: Rate = 0.0
    feed: Rate = 0.0
    service: Rate = 0.0
    admin: Rate = 0.0

    def for_role(self, role: str) -> float:
        """The role's value; an unknown role (claims built without validation) gets the
        subscriber's, the least privileged."""
        return float(getattr(self, role)) if role in type(self).model_fields else self.subscriber


class RateLimitConfig(_Strict):
    """See bridge/ratelimit.py. A token's ``rate`` claim overrides ``topic_updates_per_s``."""

    topic_updates_per_s: TopicRatesConfig = TopicRatesConfig()
    # Inbound PUBLISH packets per connection. Feeds send up to a few hundred ticks/s, and a
    # poller's all-tickers answer arrives as one burst of a tick per pair (hundreds): 1000/s
    # with a burst of 1000 never touches them, yet caps what a runaway or replaying client
    # can make the broker fan out (every PUBLISH is a write per subscriber). 0: no limit.
    publish_per_s: Rate = 1000.0
    publish_burst: Annotated[int, Field(ge=1, le=int(MAX_RATE))] = 1000


class LimitsConfig(_Strict):
    max_connections_per_user: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    max_connections: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    # Filters one connection may hold; a SUBSCRIBE beyond gets SUBACK 0x80 for the extra ones.
    # A dashboard follows a few dozen markets; 75,000 filters cost others 20% of their rate.
    max_subscriptions_per_connection: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    # Persistent sessions (clean_session=False client ids) per user. A new one past the cap
    # replaces the user's longest-disconnected one; if all are connected, CONNACK 3.
    max_sessions_per_user: Annotated[int, Field(ge=1, le=100_000)] = 10
    # Longest topic name or filter (UTF-8 bytes) in PUBLISH, SUBSCRIBE and wills.
    max_topic_bytes: Annotated[int, Field(ge=32, le=65535)] = 256
    rate: RateLimitConfig = RateLimitConfig()


class StoreConfig(_Strict):
    """Where offline messages, persistent sessions, snapshots and time zones live.

    With ``redis_url`` set, Redis (several nodes may share it); otherwise an embedded SQLite
    file at ``path`` (created with its directory).
    """

    redis_url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")] | None = None
    path: Path = Path("var/market-bridge.sqlite3")
    queue_max_messages: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    queue_max_bytes: Annotated[int, Field(ge=1024, le=1024**3)] = 1024 * 1024
    default_ttl_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0
    # Market snapshots are written behind, coalesced: at most one write per topic per interval.
    snapshot_flush_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    # Offline replay: messages in flight (awaiting PUBACK) per connection; the queue is read
    # in pages of up to this many (bridge/core/mailbox.py), so it also bounds replay memory.
    replay_window: Annotated[int, Field(ge=1, le=10000)] = 500
    # Deadline for every store call (bridge/store_guard.py): past it the caller gets
    # StoreUnavailable, whatever the store is doing. Also Redis's socket timeouts and
    # SQLite's busy timeout.
    call_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # The shorter deadline of calls on a hot path: the time zone lookup at CONNECT (past it
    # the token's zone applies) and the /readyz probe (past it: not ready).
    quick_timeout_s: Annotated[float, Field(gt=0, le=60)] = 0.5

    @model_validator(mode="after")
    def _quick_is_quicker(self) -> Self:
        if self.quick_timeout_s > self.call_timeout_s:
            raise ValueError(
                f"quick_timeout_s ({self.quick_timeout_s:g}) must not exceed call_timeout_s"
                f" ({self.call_timeout_s:g})"
            )
        return self


class TopicRewriteRule(_Strict):
    filter: str
    enabled: bool

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        if not is_valid_filter(value):
            raise ValueError(f"{value!r} is not a valid MQTT topic filter")
        return value


class TimezonesConfig(_Strict):
    """Outgoing timestamps in each subscriber's own zone (see bridge/timezones.py)."""

    enabled: bool = True
    # JSON fields holding timestamps, at any depth.
    fields: Annotated[list[str], Field(min_length=1)] = ["ts", "timestamp", "time", "created", "at"]
    # First matching filter wins; topics matching none are rewritten.
    rules: list[TopicRewriteRule] = []


class HttpConfig(_Strict):
    """Health, readiness, Prometheus metrics and the admin API, on their own port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8081


# A node id goes into Redis key and channel names (inside a hash tag): keep it plain.
NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# "host:port" of one Redis Cluster node to discover the cluster from.
ClusterNodeAddress = Annotated[str, Field(pattern=r"^[^\s:/]+:[0-9]{1,5}$")]


class ClusterConfig(_Strict):
    """Several broker nodes sharing one Redis (Cluster); see bridge/cluster/.

    ``enabled: false`` (the default) is the single-node broker, exactly as without this section.
    """

    enabled: bool = False
    # Unique per running node; None: derived from the host name and pid (bridge.cluster.node).
    node_id: NodeId | None = None
    # One Redis (sharded pub/sub works on a single server too) or a Redis Cluster's seeds.
    redis_url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")] | None = None
    redis_cluster_nodes: list[ClusterNodeAddress] = []
    # Topics hash into this many pub/sub channels (each on one shard); fixed for a cluster's life.
    partitions: Annotated[int, Field(ge=1, le=4096)] = 16
    # A dead node's connection leases and registry entry expire after this long.
    lease_ttl_s: Annotated[float, Field(ge=1, le=30)] = 15.0

    @field_validator("redis_cluster_nodes")
    @classmethod
    def _ports_in_range(cls, value: list[str]) -> list[str]:
        for address in value:
            if not 0 < int(address.rpartition(":")[2]) <= 65535:
                raise ValueError(f"{address!r}: port out of range")
        return value

    @model_validator(mode="after")
    def _one_redis(self) -> Self:
        if self.redis_url is not None and self.redis_cluster_nodes:
            raise ValueError("give redis_url or redis_cluster_nodes, not both")
        if self.enabled and self.redis_url is None and not self.redis_cluster_nodes:
            raise ValueError("enabled needs redis_url or redis_cluster_nodes")
        return self


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    # Names this process in every line (`--workers` sets each worker's node id): N workers
    # write to one stream.
    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None


class BridgeConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    listeners: ListenersConfig = ListenersConfig()
    broker: BrokerSettings = BrokerSettings()
    # Validated even when absent, so a config without keys fails closed instead of open.
    auth: Annotated[AuthConfig, Field(validate_default=True)] = {}  # type: ignore[assignment]
    limits: LimitsConfig = LimitsConfig()
    store: StoreConfig = StoreConfig()
    timezones: TimezonesConfig = TimezonesConfig()
    http: HttpConfig = HttpConfig()
    cluster: ClusterConfig = ClusterConfig()
    feeds: list[FeedConfig] = []
    logging: LoggingConfig = LoggingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read: {exc.strerror or exc}", str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"not UTF-8 text (byte {exc.start})", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("<yaml>", f"{where}{problem}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"must be a mapping, got {type(data).__name__}", str(path))
    return data


def _env_name(loc: tuple[str | int, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def _source_of(loc: tuple[str | int, ...], path: Path | None) -> str:
    """Name where a bad value came from: an environment variable beats the file.

    A variable at the field, above it (a JSON object) or below it (a model-level check such
    as "ws and tcp share a port" blames the section) counts.
    """
    names = {key.upper() for key in os.environ if key.upper().startswith(ENV_PREFIX)}
    for depth in range(len(loc), 0, -1):
        if (name := _env_name(loc[:depth])) in names:
            return f"environment variable {name}"
    below = sorted(name for name in names if name.startswith(_env_name(loc) + "__")) if loc else []
    if below:
        return f"environment variable {below[0]}"
    return str(path) if path else "defaults"


def _field_path(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the discriminator tag pydantic inserts after ``feeds.<n>`` (it is not a field)."""
    if len(loc) >= 3 and loc[0] == "feeds" and isinstance(loc[1], int) and loc[2] in _FEED_KINDS:
        return loc[:2] + loc[3:]
    return loc


_ENV_PARSE_ERROR = re.compile(r'error parsing value for field "([^"]+)"')


def load_config(path: Path | str | None = None) -> BridgeConfig:
    """Load and validate; raise :class:`ConfigError` naming the first bad field."""
    file_path = Path(path) if path is not None else None
    data = _read_yaml(file_path) if file_path is not None else {}
    try:
        return BridgeConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _field_path(tuple(first["loc"]))
        field = ".".join(str(part) for part in loc) or "<root>"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(field, message, _source_of(loc, file_path)) from None
    except SettingsError as exc:  # an environment value that is not valid JSON
        match = _ENV_PARSE_ERROR.search(str(exc))
        field = match.group(1) if match else "<environment>"
        source = f"environment variable {_env_name((field,))}" if match else "environment"
        raise ConfigError(field, "not valid JSON", source) from None


_FEED_KINDS = frozenset(FEED_KINDS)


# What a redacted secret reads as (SecretStr fields show pydantic's "**********").
REDACTED = "***"
# Query parameters whose value is a secret (matched as substrings of the lower-cased name),
# e.g. redis-py's `?password=...`; a path such as `ssl_keyfile` is hidden too, which is harmless.
_SECRET_PARAMS = ("pass", "secret", "token", "key", "auth", "cred")


def _redact_query(query: str) -> str:
    params = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        secret = eq and any(marker in unquote(name).lower() for marker in _SECRET_PARAMS)
        params.append(f"{name}={REDACTED}" if secret else param)
    return "&".join(params)


def redact_url(url: str) -> str:
    """``url`` with its password (and secret query values) replaced by ``***``.

    User, host, port, path and the other parameters stay, so an operator can still tell which
    server it is. Anything that does not parse cleanly (e.g. an unescaped ``/`` or ``#`` in a
    password moves it out of the authority) is hidden whole after the scheme: fail closed.
    """
    scheme, sep, _ = url.partition("://")
    if not sep:
        return url
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for an authority that is not host[:port]
    except ValueError:
        return f"{scheme}://{REDACTED}"
    prefix = f"{scheme}://"
    rest = url[len(prefix) + len(parts.netloc) :]
    # urlsplit drops tabs and newlines before parsing, so its authority may not be the text's;
    # an '@' after the authority means the text has userinfo urlsplit did not see.
    if not url.startswith(prefix + parts.netloc) or "@" in rest:
        return f"{scheme}://{REDACTED}"
    netloc = parts.netloc
    if parts.password:
        user = netloc.rpartition("@")[0].partition(":")[0]
        netloc = f"{user}:{REDACTED}@{netloc.rpartition('@')[2]}"
    head, hash_, fragment = rest.partition("#")
    path, question, query = head.partition("?")
    if question:
        query = _redact_query(query)
    return f"{prefix}{netloc}{path}{question}{query}{hash_}{fragment}"


def _redact_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _redact_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_urls(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def redacted(config: BridgeConfig) -> dict[str, Any]:
    """The effective config as JSON-ready data, safe to show: what ``/admin/config`` and
    ``market-bridge config`` print.

    HMAC secrets (``SecretStr``) read ``**********``; every URL value (``store.redis_url``,
    pollers' ``base_url``, any added later) loses its password and secret query values.
    Key, certificate and secret *file* paths are shown: they name files, not their content.
    """
    dumped: dict[str, Any] = _redact_urls(config.model_dump(mode="json"))
    return dumped
