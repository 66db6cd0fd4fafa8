"""bridge.config.load_config: YAML file + MARKET_BRIDGE_ environment overrides -> BridgeConfig."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import get_args
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bridge.auth import ROLES
from bridge.config import (
    DEFAULT_CONFIG_PATH,
    DEV_SECRET_PATH,
    ENV_PREFIX,
    BridgeConfig,
    PollerFeedConfig,
    RateLimitConfig,
    ReplayFeedConfig,
    SimulatorFeedConfig,
    TopicRatesConfig,
    load_config,
    redact_url,
    redacted,
)
from bridge.errors import ConfigError
from bridge.keys import generate_dev_secret
from feeds.poller import FEED_KINDS, POLLED_EXCHANGES, SPECS

AUTH_OFF = "MARKET_BRIDGE_AUTH__ENABLED"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MARKET_BRIDGE_ variable from the outer environment or another test leaks in.

    Auth fails closed without keys; these tests are about the rest, so it is switched off
    here, and the auth tests below switch it back on.
    """
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(AUTH_OFF, "false")


def write(tmp_path: Path, text: str, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_defaults(config: BridgeConfig) -> None:
    assert config.listeners.ws.enabled is True
    assert config.listeners.ws.host == "127.0.0.1"
    assert config.listeners.ws.port == 8083
    assert config.listeners.ws.path == "/mqtt"
    assert config.listeners.ws.compression is False
    assert config.listeners.ws.tls is None
    assert config.listeners.tcp.enabled is True
    assert config.listeners.tcp.port == 1883
    assert config.broker.connect_timeout_s == 10.0
    assert config.broker.max_offline_messages == 1000
    assert config.broker.event_loop == "asyncio"
    assert config.feeds == []
    assert config.logging.level == "INFO"
    assert config.logging.json_format is False
    assert config.auth.token_cache_size == 10_000


# --- good files -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "null\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert_defaults(load_config(write(tmp_path, text)))


def test_no_path_gives_defaults() -> None:
    assert_defaults(load_config())


def test_shipped_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_CONFIG_PATH.is_file()
    # The shipped config names the development key the demo creates (relative to the CWD).
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(AUTH_OFF)
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.auth.enabled
    assert config.auth.keys[0].kid == "dev"
    assert config.listeners.ws.port == 8083
    assert config.listeners.ws.path == "/mqtt"
    assert config.listeners.tcp.port == 1883
    assert len(config.feeds) == 1
    assert isinstance(config.feeds[0], SimulatorFeedConfig)
    assert config.feeds[0].interval_s == 1.0
    # The shipped file spells the rate limits out; its values are the defaults.
    assert config.limits.rate == RateLimitConfig()


def test_path_as_str(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  tcp:\n    port: 1999\n")
    assert load_config(str(path)).listeners.tcp.port == 1999


def test_full_file(tmp_path: Path) -> None:
    replay = write(tmp_path, '{"exchange": "luno"}\n', name="ticks.jsonl")
    path = write(
        tmp_path,
        f"""\
listeners:
  ws: {{host: 0.0.0.0, port: 9001, path: /ws/mqtt, compression: true, max_message_bytes: 2048}}
  tcp: {{enabled: false}}
broker:
  connect_timeout_s: 2.5
  max_offline_messages: 0
feeds:
  - kind: simulator
    seed: 42
    markets: [luno/BTC-ZAR, valr/ETH-ZAR]
  - kind: replay
    path: {replay}
    speed: 0
    loop: false
  - kind: valr
    base_url: https://api.valr.com
    pairs: [BTCZAR]
logging: {{level: DEBUG, json_format: true}}
""",
    )
    config = load_config(path)
    assert config.listeners.ws.host == "0.0.0.0"
    assert config.listeners.ws.port == 9001
    assert config.listeners.ws.path == "/ws/mqtt"
    assert config.listeners.ws.compression is True
    assert config.listeners.ws.max_message_bytes == 2048
    assert config.listeners.tcp.enabled is False
    assert config.broker.connect_timeout_s == 2.5
    assert config.broker.max_offline_messages == 0
    simulator, replay_feed, poller = config.feeds
    assert isinstance(simulator, SimulatorFeedConfig)
    assert simulator.seed == 42
    assert simulator.markets == ["luno/BTC-ZAR", "valr/ETH-ZAR"]
    assert isinstance(replay_feed, ReplayFeedConfig)
    assert replay_feed.path == replay
    assert replay_feed.loop is False
    assert isinstance(poller, PollerFeedConfig)
    assert poller.kind == "valr"
    assert str(poller.base_url).startswith("https://api.valr.com")
    assert poller.pairs == ["BTCZAR"]
    assert config.logging.level == "DEBUG"
    assert config.logging.json_format is True


@pytest.mark.parametrize(
    "text",
    [
        "listeners: {ws: {port: 0}, tcp: {port: 0}}",  # two ephemeral ports do not clash
        "listeners: {ws: {port: 1883, enabled: false}}",  # a disabled listener's port is free
        "listeners: {ws: {enabled: false}}",
        "listeners: {tcp: {enabled: false}}",
    ],
)
def test_listener_edge_cases_accepted(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert config.listeners.ws.enabled or config.listeners.tcp.enabled


# --- bad files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "mentions"),
    [
        ("bogus: 1", "bogus", "unknown key"),
        ("listeners: {bogus: 1}", "listeners.bogus", "unknown key"),
        ("listeners: {tcp: {bogus: 1}}", "listeners.tcp.bogus", "unknown key"),
        ("broker: {connect_timeout: 3}", "broker.connect_timeout", "unknown key"),
        ("feeds: [{kind: simulator, speed: 2}]", "feeds.0.speed", "unknown key"),
        ("listeners: {tcp: {port: abc}}", "listeners.tcp.port", "integer"),
        ("listeners: {ws: {compression: maybe}}", "listeners.ws.compression", "boolean"),
        ("listeners: []", "listeners", ""),
        ("broker: {connect_timeout_s: soon}", "broker.connect_timeout_s", "number"),
        ("feeds: {kind: simulator}", "feeds", "list"),
        ("logging: {level: TRACE}", "logging.level", ""),
        ("listeners: {tcp: {port: 70000}}", "listeners.tcp.port", "65535"),
        ("listeners: {ws: {port: 65536}}", "listeners.ws.port", "65535"),
        ("listeners: {tcp: {port: -1}}", "listeners.tcp.port", "0"),
        ("broker: {connect_timeout_s: 0}", "broker.connect_timeout_s", "greater than 0"),
        ("listeners: {ws: {max_message_bytes: 10}}", "listeners.ws.max_message_bytes", "1024"),
        ("listeners: {ws: {port: 9000}, tcp: {port: 9000}}", "listeners", "port 9000"),
        ("listeners: {ws: {port: 1883}}", "listeners", "port 1883"),  # default tcp port
        ("listeners: {ws: {enabled: false}, tcp: {enabled: false}}", "listeners", "at least one"),
        ("listeners: {ws: {path: mqtt}}", "listeners.ws.path", "'/'"),
        ("listeners: {ws: {path: ''}}", "listeners.ws.path", "'/'"),
        ("listeners: {ws: {path: '/mqtt?x=1'}}", "listeners.ws.path", "query"),
        ("feeds: [{kind: replay, path: /nonexistent/ticks.jsonl}]", "feeds.0.path", "file"),
        ("feeds: [{kind: replay}]", "feeds.0.path", "required"),
        ("feeds: [{kind: binance}]", "feeds.0", "binance"),
        ("feeds: [{interval_s: 1}]", "feeds.0", "kind"),
        ("feeds: [{kind: simulator}, {kind: nope}]", "feeds.1", "nope"),
        ("feeds: [{kind: simulator, markets: [BTCZAR]}]", "feeds.0.markets", "exchange/PAIR"),
        ("feeds: [{kind: simulator, markets: [luno/]}]", "feeds.0.markets", "exchange/PAIR"),
        ("feeds: [{kind: simulator, markets: [/BTC-ZAR]}]", "feeds.0.markets", "exchange/PAIR"),
        ("feeds: [{kind: luno, base_url: 'not a url'}]", "feeds.0.base_url", "URL"),
        ("feeds: [{kind: quidax}]", "feeds.0.base_url", "required"),
    ],
)
def test_bad_file(tmp_path: Path, text: str, field: str, mentions: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert mentions in caught.value.message
    assert str(path) in str(caught.value)
    assert field in str(caught.value)


def test_bad_replay_path_in_directory(tmp_path: Path) -> None:
    # A directory is not a file: FilePath rejects it even though it exists.
    path = write(tmp_path, f"feeds: [{{kind: replay, path: {tmp_path}}}]")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "feeds.0.path"
    assert caught.value.source == str(path)


def test_bad_tls_missing_certfile(tmp_path: Path) -> None:
    key = write(tmp_path, "key", name="key.pem")
    path = write(tmp_path, f"listeners: {{tcp: {{tls: {{certfile: {tmp_path}/nope.pem, keyfile: {key}}}}}}}")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "listeners.tcp.tls.certfile"
    assert caught.value.source == str(path)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("listeners: [1, 2\nbroker: 3\n", 2),
        ("listeners:\n  ws:\n    port: 1\n   tcp: 2\n", 4),
        ("a: b: c\n", 1),
        ("key: 'unterminated\n", 2),
    ],
)
def test_yaml_syntax_error(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<yaml>"
    assert caught.value.source == str(path)
    assert caught.value.message.startswith(f"line {line}, column ")


@pytest.mark.parametrize(
    ("text", "type_name"),
    [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("42\n", "int")],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, type_name: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<root>"
    assert caught.value.source == str(path)
    assert caught.value.message == f"must be a mapping, got {type_name}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<file>"
    assert caught.value.source == str(path)
    assert caught.value.message.startswith("cannot read")


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (unlike a chmod 000 file).
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.field == "<file>"
    assert caught.value.source == str(tmp_path)
    assert caught.value.message.startswith("cannot read")


# --- environment overrides --------------------------------------------------------------------


def test_env_overrides_file_and_keeps_other_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        "listeners:\n  ws: {port: 9001, path: /live}\n  tcp: {host: 0.0.0.0, port: 1883}\n"
        "logging: {level: WARNING}\n",
    )
    monkeypatch.setenv("MARKET_BRIDGE_LISTENERS__TCP__PORT", "1999")
    config = load_config(path)
    assert config.listeners.tcp.port == 1999
    assert config.listeners.tcp.host == "0.0.0.0"  # sibling field from the file stays
    assert config.listeners.ws.port == 9001
    assert config.listeners.ws.path == "/live"
    assert config.logging.level == "WARNING"


def test_env_override_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_BRIDGE_LISTENERS__WS__PORT", "9002")
    monkeypatch.setenv("MARKET_BRIDGE_LOGGING__LEVEL", "ERROR")
    config = load_config()
    assert config.listeners.ws.port == 9002
    assert config.listeners.tcp.port == 1883
    assert config.logging.level == "ERROR"


def test_env_name_is_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("market_bridge_listeners__tcp__port", "1234")
    assert load_config(write(tmp_path, "listeners: {tcp: {port: 1}}")).listeners.tcp.port == 1234


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("MARKET_BRIDGE_LISTENERS__TCP__PORT", "abc", "listeners.tcp.port"),
        ("MARKET_BRIDGE_LISTENERS__TCP__PORT", "70000", "listeners.tcp.port"),
        ("MARKET_BRIDGE_LISTENERS__WS__PATH", "mqtt", "listeners.ws.path"),
        ("MARKET_BRIDGE_BROKER__CONNECT_TIMEOUT_S", "-1", "broker.connect_timeout_s"),
        ("MARKET_BRIDGE_LOGGING__LEVEL", "LOUD", "logging.level"),
        ("MARKET_BRIDGE_LISTENERS__TCP__BOGUS", "1", "listeners.tcp.bogus"),
        ("MARKET_BRIDGE_FEEDS", '[{"kind": "nope"}]', "feeds.0"),
        ("MARKET_BRIDGE_FEEDS", '[{"kind": "simulator", "markets": ["BTCZAR"]}]', "feeds.0.markets"),
        ("MARKET_BRIDGE_STORE__CALL_TIMEOUT_S", "0", "store.call_timeout_s"),
        ("MARKET_BRIDGE_STORE__QUICK_TIMEOUT_S", "5", "store"),  # more than call_timeout_s
    ],
)
def test_bad_env_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    path = write(tmp_path, "listeners: {tcp: {port: 1883}}\n")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == f"environment variable {variable}"


def test_bad_file_value_not_blamed_on_unrelated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "listeners: {tcp: {port: abc}}\n")
    monkeypatch.setenv("MARKET_BRIDGE_LISTENERS__WS__PORT", "9001")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "listeners.tcp.port"
    assert caught.value.source == str(path)


def test_feeds_env_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "feeds:\n  - kind: simulator\n    seed: 1\n")
    monkeypatch.setenv(
        "MARKET_BRIDGE_FEEDS",
        '[{"kind": "simulator", "seed": 7, "markets": ["luno/BTC-ZAR"]},'
        ' {"kind": "luno", "base_url": "https://api.luno.com", "interval_s": 5}]',
    )
    config = load_config(path)
    assert len(config.feeds) == 2  # the environment's list replaces the file's
    simulator, poller = config.feeds
    assert isinstance(simulator, SimulatorFeedConfig)
    assert simulator.seed == 7
    assert simulator.markets == ["luno/BTC-ZAR"]
    assert isinstance(poller, PollerFeedConfig)
    assert poller.kind == "luno"
    assert poller.interval_s == 5.0


def test_feeds_env_empty_list_clears_file_feeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "feeds: [{kind: simulator}]\n")
    monkeypatch.setenv("MARKET_BRIDGE_FEEDS", "[]")
    assert load_config(path).feeds == []


def test_feeds_env_bad_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_BRIDGE_FEEDS", '[{"kind": "simulator"')
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert caught.value.field == "feeds"
    assert caught.value.source == "environment variable MARKET_BRIDGE_FEEDS"
    assert "JSON" in caught.value.message


def test_env_is_clean_at_start() -> None:
    assert [key for key in os.environ if key.upper().startswith(ENV_PREFIX)] == [AUTH_OFF]


# --- auth ---------------------------------------------------------------------------------------


def test_auth_without_keys_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTH_OFF)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "logging: {level: INFO}\n"))
    assert caught.value.field == "auth"
    assert "no keys" in caught.value.message


SECRET = "s" * 40


@pytest.mark.parametrize(
    ("auth_yaml", "field", "fragment"),
    [
        ("{keys: [{algorithms: [HS256]}]}", "auth.keys.0", "exactly one"),
        (f"{{keys: [{{algorithms: [HS256, RS256], secret: {SECRET}}}]}}", "auth.keys.0", "do not mix"),
        ("{keys: [{algorithms: [HS256], secret: short}]}", "auth.keys.0", "at least 32"),
        (f"{{keys: [{{algorithms: [RS256], secret: {SECRET}}}]}}", "auth.keys.0", "public_key_file"),
        (f"{{keys: [{{algorithms: [none], secret: {SECRET}}}]}}", "auth.keys.0.algorithms.0", "HS256"),
        (f"{{keys: [{{algorithms: [], secret: {SECRET}}}]}}", "auth.keys.0.algorithms", "at least 1"),
        (
            f"{{keys: [{{kid: a, algorithms: [HS256], secret: {SECRET}}}, {{kid: a, algorithms: [HS256], secret: {SECRET}}}]}}",
            "auth",
            "unique",
        ),
        (
            f"{{keys: [{{algorithms: [HS256], secret: {SECRET}}}], default_tz: Mars/Base}}",
            "auth.default_tz",
            "IANA",
        ),
        (f"{{keys: [{{algorithms: [HS256], secret: {SECRET}}}], leeway_s: 3600}}", "auth.leeway_s", "300"),
        (
            f"{{keys: [{{algorithms: [HS256], secret: {SECRET}}}], token_cache_size: -1}}",
            "auth.token_cache_size",
            "0",
        ),
        (
            f"{{keys: [{{algorithms: [HS256], secret: {SECRET}}}], token_cache_size: 1000001}}",
            "auth.token_cache_size",
            "1000000",
        ),
    ],
)
def test_bad_auth_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_yaml: str, field: str, fragment: str
) -> None:
    monkeypatch.delenv(AUTH_OFF)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"auth: {auth_yaml}\n"))
    assert caught.value.field == field
    assert fragment in caught.value.message
    assert caught.value.source == str(tmp_path / "bridge.yaml")


def test_limits_defaults_and_bounds(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert (config.limits.max_connections_per_user, config.limits.max_connections) == (10, 10_000)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "limits: {max_connections_per_user: 0}\n"))
    assert caught.value.field == "limits.max_connections_per_user"


@pytest.mark.parametrize(
    ("value", "accepted"), [("0", False), ("1", True), ("10000", True), ("10001", False)]
)
def test_replay_window_default_and_bounds(tmp_path: Path, value: str, accepted: bool) -> None:
    assert load_config(write(tmp_path, "")).store.replay_window == 500
    path = write(tmp_path, f"store: {{replay_window: {value}}}\n")
    if accepted:
        assert load_config(path).store.replay_window == int(value)
        return
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "store.replay_window"


def test_rate_limit_defaults(tmp_path: Path) -> None:
    rate = load_config(write(tmp_path, "")).limits.rate
    assert rate == RateLimitConfig()
    assert rate.topic_updates_per_s.model_dump() == dict.fromkeys(ROLES, 0.0)  # full rate for everyone
    assert (rate.publish_per_s, rate.publish_burst) == (1000.0, 1000)


def test_rate_limits_from_file(tmp_path: Path) -> None:
    rate = load_config(
        write(
            tmp_path,
            "limits:\n  rate:\n    topic_updates_per_s: {subscriber: 2, admin: 0.5}\n"
            "    publish_per_s: 0\n    publish_burst: 10\n",
        )
    ).limits.rate
    assert rate.topic_updates_per_s == TopicRatesConfig(subscriber=2.0, admin=0.5)
    assert (rate.publish_per_s, rate.publish_burst) == (0.0, 10)


def test_topic_rates_have_one_field_per_role() -> None:
    assert tuple(TopicRatesConfig.model_fields) == ROLES


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("subscriber", 1.0),
        ("feed", 2.0),
        ("service", 3.0),
        ("admin", 4.0),
        ("root", 1.0),
        ("model_config", 1.0),
    ],
)
def test_topic_rate_for_role(role: str, expected: float) -> None:
    rates = TopicRatesConfig(subscriber=1, feed=2, service=3, admin=4)
    assert rates.for_role(role) == expected


@pytest.mark.parametrize(
    ("rate_yaml", "field", "mentions"),
    [
        ("{publish_per_s: -1}", "limits.rate.publish_per_s", "greater than or equal to 0"),
        ("{publish_per_s: .nan}", "limits.rate.publish_per_s", "finite"),
        ("{publish_per_s: .inf}", "limits.rate.publish_per_s", "finite"),
        ("{publish_per_s: -.inf}", "limits.rate.publish_per_s", "finite"),
        ("{publish_per_s: 1e7}", "limits.rate.publish_per_s", "1000000"),
        ("{publish_per_s: 0.0001}", "limits.rate.publish_per_s", "0 (no limit) or at least 0.001"),
        ("{publish_per_s: fast}", "limits.rate.publish_per_s", "number"),
        ("{publish_per_s: true}", "limits.rate.publish_per_s", "not a boolean"),
        ("{publish_per_s: null}", "limits.rate.publish_per_s", "number"),
        ("{publish_burst: 0}", "limits.rate.publish_burst", "greater than or equal to 1"),
        ("{publish_burst: 2.5}", "limits.rate.publish_burst", "integer"),
        ("{publish_burst: 2000000}", "limits.rate.publish_burst", "1000000"),
        ("{topic_updates_per_s: {subscriber: -0.5}}", "limits.rate.topic_updates_per_s.subscriber", "0"),
        ("{topic_updates_per_s: {feed: .nan}}", "limits.rate.topic_updates_per_s.feed", "finite"),
        ("{topic_updates_per_s: {service: .inf}}", "limits.rate.topic_updates_per_s.service", "finite"),
        ("{topic_updates_per_s: {admin: false}}", "limits.rate.topic_updates_per_s.admin", "not a boolean"),
        ("{topic_updates_per_s: {root: 1}}", "limits.rate.topic_updates_per_s.root", "unknown key"),
        ("{topic_updates_per_s: 5}", "limits.rate.topic_updates_per_s", ""),
        ("{publish_rate: 5}", "limits.rate.publish_rate", "unknown key"),
    ],
)
def test_bad_rate_limits(tmp_path: Path, rate_yaml: str, field: str, mentions: str) -> None:
    path = write(tmp_path, f"limits: {{rate: {rate_yaml}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert mentions in caught.value.message


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MARKET_BRIDGE_LIMITS__RATE__PUBLISH_PER_S", "0", {"publish_per_s": 0.0}),
        ("MARKET_BRIDGE_LIMITS__RATE__PUBLISH_BURST", "50", {"publish_burst": 50}),
        (
            "MARKET_BRIDGE_LIMITS__RATE__TOPIC_UPDATES_PER_S__SUBSCRIBER",
            "2.5",
            {"topic_updates_per_s": {"subscriber": 2.5, "feed": 0.0, "service": 0.0, "admin": 7.0}},
        ),
        (
            "MARKET_BRIDGE_LIMITS__RATE__TOPIC_UPDATES_PER_S",
            '{"feed": 3}',
            {"topic_updates_per_s": {"subscriber": 0.0, "feed": 3.0, "service": 0.0, "admin": 7.0}},
        ),
    ],
)
def test_rate_limits_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: dict[str, object]
) -> None:
    path = write(tmp_path, "limits: {max_connections: 5, rate: {topic_updates_per_s: {admin: 7}}}\n")
    monkeypatch.setenv(variable, value)
    config = load_config(path)
    assert config.limits.max_connections == 5  # the file's sibling stays
    rate = config.limits.rate.model_dump()
    assert {key: rate[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("MARKET_BRIDGE_LIMITS__RATE__PUBLISH_PER_S", "nan", "limits.rate.publish_per_s"),
        ("MARKET_BRIDGE_LIMITS__RATE__PUBLISH_PER_S", "-5", "limits.rate.publish_per_s"),
        ("MARKET_BRIDGE_LIMITS__RATE__PUBLISH_BURST", "0", "limits.rate.publish_burst"),
        (
            "MARKET_BRIDGE_LIMITS__RATE__TOPIC_UPDATES_PER_S__SUBSCRIBER",
            "inf",
            "limits.rate.topic_updates_per_s.subscriber",
        ),
        (
            "MARKET_BRIDGE_LIMITS__RATE__TOPIC_UPDATES_PER_S__ROOT",
            "1",
            "limits.rate.topic_updates_per_s.root",
        ),
    ],
)
def test_bad_rate_limit_env_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert caught.value.field == field
    assert caught.value.source == f"environment variable {variable}"


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bridge.yaml"
    bad.write_bytes(b"logging: {level: \xe9}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert (caught.value.field, caught.value.source) == ("<file>", str(bad))


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [("simulator: 1\n", "simulator"), ("listeners:\n  tcp:\n    replay: 1\n", "listeners.tcp.replay")],
)
def test_unknown_keys_named_like_feed_kinds_keep_their_name(
    tmp_path: Path, yaml_text: str, field: str
) -> None:
    bad = tmp_path / "bridge.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert caught.value.field == field


def test_section_check_caused_by_env_blames_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKET_BRIDGE_LISTENERS__WS__PORT", "1883")
    good = tmp_path / "bridge.yaml"
    good.write_text("logging: {level: INFO}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(good)
    assert caught.value.field == "listeners"
    assert caught.value.source == "environment variable MARKET_BRIDGE_LISTENERS__WS__PORT"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_event_loop_choice(tmp_path: Path, loop: str) -> None:
    assert load_config(write(tmp_path, f"broker: {{event_loop: {loop}}}\n")).broker.event_loop == loop


def test_unknown_event_loop_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.event_loop"):
        load_config(write(tmp_path, "broker: {event_loop: trio}\n"))


@pytest.mark.parametrize(("text", "expected"), [("", 2.0), ("0", 0.0), ("0.5", 0.5), ("50", 50.0)])
def test_flush_interval(tmp_path: Path, text: str, expected: float) -> None:
    body = f"broker: {{flush_interval_ms: {text}}}\n" if text else ""
    assert load_config(write(tmp_path, body)).broker.flush_interval_ms == expected


@pytest.mark.parametrize("value", ["-1", "51", "soon"])
def test_bad_flush_interval_names_the_field(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"broker\.flush_interval_ms"):
        load_config(write(tmp_path, f"broker: {{flush_interval_ms: {value}}}\n"))


# --- redaction ----------------------------------------------------------------------------------

PASSWORD = "s3cret-Pa55"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Passwords go; user, host, port, db and other parameters stay.
        (f"redis://:{PASSWORD}@cache:6379/0", "redis://:***@cache:6379/0"),
        (f"redis://bridge:{PASSWORD}@cache:6379/2", "redis://bridge:***@cache:6379/2"),
        (
            f"rediss://bridge:{PASSWORD}@cache:6380/0?ssl_cert_reqs=none",
            "rediss://bridge:***@cache:6380/0?ssl_cert_reqs=none",
        ),
        (f"redis://bridge:{PASSWORD}@[::1]:6379/0", "redis://bridge:***@[::1]:6379/0"),
        (f"unix://:{PASSWORD}@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        (f"https://key-id:{PASSWORD}@api.luno.com/", "https://key-id:***@api.luno.com/"),
        # Percent-encoded, or with separators redis-py reads as part of the password.
        ("redis://:s3cret%40Pa55@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://u:s3cret@Pa55@cache:6379/0", "redis://u:***@cache:6379/0"),
        ("redis://u:s3cret:Pa55@cache:6379/0", "redis://u:***@cache:6379/0"),
        # Secrets as query parameters (redis-py reads ?password=).
        (f"unix:///run/redis.sock?db=0&password={PASSWORD}", "unix:///run/redis.sock?db=0&password=***"),
        (f"https://api.example/?token={PASSWORD}&pair=XBTZAR", "https://api.example/?token=***&pair=XBTZAR"),
        (f"https://api.example/?API_KEY={PASSWORD}", "https://api.example/?API_KEY=***"),
        # A password that breaks the authority's shape: everything after the scheme goes.
        ("redis://:s3cret/Pa55@cache:6379/0", "redis://***"),
        ("redis://:s3cret#Pa55@cache:6379/0", "redis://***"),
        ("redis://:1234#Pa55@cache:6379/0", "redis://***"),
        ("redis://:1234?Pa55@cache:6379/0", "redis://***"),
        ("redis://:s3cret\tPa55@cache:6379/0", "redis://***"),
        # Nothing secret: unchanged, character for character.
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://bridge@cache:6379/0", "redis://bridge@cache:6379/0"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
        ("https://api.valr.com/v1/public/marketsummary", "https://api.valr.com/v1/public/marketsummary"),
        ("market/luno/BTC-ZAR", "market/luno/BTC-ZAR"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "Pa55" not in redact_url(url)


@given(password=st.text(min_size=1, max_size=24))
def test_redact_url_never_shows_a_password(password: str) -> None:
    visible = "redis://bridge:***@cache:6379/0"
    assume(password not in visible)
    for form in (password, quote(password, safe="")):
        assert password not in redact_url(f"redis://bridge:{form}@cache:6379/0")


def test_redacted_config_hides_every_secret_and_keeps_the_rest() -> None:
    hmac_secret = "h" * 24 + PASSWORD
    config = BridgeConfig(
        auth={"keys": [{"kid": "k", "algorithms": ["HS256"], "secret": hmac_secret}]},
        store={"redis_url": f"redis://bridge:{PASSWORD}@cache:6379/0"},
        feeds=[
            {"kind": "luno", "base_url": f"https://key-id:{PASSWORD}@api.luno.com/"},
            {"kind": "simulator", "markets": ["luno/BTC-ZAR"]},
        ],
    )
    shown = redacted(config)
    text = json.dumps(shown)
    assert PASSWORD not in text
    assert hmac_secret not in text
    assert shown["auth"]["keys"][0]["secret"] == "**********"
    assert shown["store"]["redis_url"] == "redis://bridge:***@cache:6379/0"
    assert shown["feeds"][0]["base_url"] == "https://key-id:***@api.luno.com/"
    # Only the secrets differ from the plain dump.
    plain = config.model_dump(mode="json")
    plain["store"]["redis_url"] = shown["store"]["redis_url"]
    plain["feeds"][0]["base_url"] = shown["feeds"][0]["base_url"]
    assert shown == plain


def test_the_polled_exchanges_have_one_list() -> None:
    """The config's feed kinds are spelled out for pydantic; they must be the registry's."""
    assert get_args(PollerFeedConfig.model_fields["kind"].annotation) == POLLED_EXCHANGES == tuple(SPECS)
    assert set(FEED_KINDS) == {"simulator", "replay", *POLLED_EXCHANGES}


# --- cluster ------------------------------------------------------------------------------------


def test_cluster_defaults_off() -> None:
    config = load_config()
    assert config.cluster.enabled is False
    assert (config.cluster.partitions, config.cluster.lease_ttl_s) == (16, 15.0)


@pytest.mark.parametrize(
    "text",
    [
        "cluster: {enabled: true, node_id: n1, redis_url: 'redis://127.0.0.1:6379/0'}",
        "cluster: {enabled: true, redis_cluster_nodes: ['127.0.0.1:7000', 'redis-a:7001'], partitions: 64}",
        "cluster: {enabled: true, node_id: a.b_c-1, redis_url: 'unix:///tmp/r.sock', lease_ttl_s: 30}",
        "cluster: {enabled: false, redis_url: 'redis://x:1/0'}",
    ],
)
def test_cluster_accepted(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert config.cluster.redis_url is not None or config.cluster.redis_cluster_nodes


@pytest.mark.parametrize(
    ("text", "field", "mentions"),
    [
        ("cluster: {enabled: true}", "cluster", "redis_url or redis_cluster_nodes"),
        (
            "cluster: {redis_url: 'redis://a:1/0', redis_cluster_nodes: ['a:1']}",
            "cluster",
            "not both",
        ),
        ("cluster: {redis_url: 'http://a:1/'}", "cluster.redis_url", "pattern"),
        ("cluster: {redis_cluster_nodes: ['a']}", "cluster.redis_cluster_nodes.0", "pattern"),
        ("cluster: {redis_cluster_nodes: ['a:70000']}", "cluster.redis_cluster_nodes", "port out of range"),
        ("cluster: {node_id: 'has space'}", "cluster.node_id", "pattern"),
        ("cluster: {node_id: 'a{b}'}", "cluster.node_id", "pattern"),
        ("cluster: {partitions: 0}", "cluster.partitions", "greater than or equal to 1"),
        ("cluster: {lease_ttl_s: 31}", "cluster.lease_ttl_s", "30"),
        ("cluster: {lease_ttl_s: 0.5}", "cluster.lease_ttl_s", "1"),
        ("cluster: {nodes: []}", "cluster.nodes", "unknown key"),
    ],
)
def test_cluster_bad(tmp_path: Path, text: str, field: str, mentions: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.field == field
    assert mentions in info.value.message
    assert "\n" not in str(info.value)
