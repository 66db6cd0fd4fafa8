"""The ``market-bridge`` command as users run it: a real subprocess, real sockets."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bridge.auth import Claims, KeyRing, SigningKey, TokenPolicy, VerificationKey, decide_auth, mint_token
from bridge.config import DEV_SECRET_PATH
from bridge.keys import generate_dev_secret
from tests.conftest import DEADLINE_S, BrokerThread, Client, Proc, bridge_config, token_for

ClientFactory = Callable[..., Client]


EPHEMERAL = {
    "MARKET_BRIDGE_LISTENERS__TCP__PORT": "0",
    "MARKET_BRIDGE_LISTENERS__WS__PORT": "0",
    "MARKET_BRIDGE_HTTP__PORT": "0",
}


def test_demo_serves_simulated_ticks_over_tcp_and_websocket(
    procs: Callable[..., Proc], clients: ClientFactory, tmp_path: Path
) -> None:
    demo = procs("demo", env=EPHEMERAL)
    ws_port = int(demo.wait_for_line(r"WebSocket\s+ws://127\.0\.0\.1:(\d+)/mqtt").group(1))
    tcp_port = int(demo.wait_for_line(r"TCP\s+mqtt://127\.0\.0\.1:(\d+)").group(1))
    token = demo.wait_for_line(r"TOKEN=(\S+)").group(1)
    demo.wait_for_line(
        rf"mosquitto_sub -h 127\.0\.0\.1 -p \d+ -t 'market/#' -v -u demo -P {re.escape(token)}"
    )
    # The dashboard's URL carries the same token, in the fragment (never sent to the server).
    http_port, fragment = demo.wait_for_line(r"Dashboard\s+http://127\.0\.0\.1:(\d+)/#token=(\S+)").groups()
    assert fragment == token
    page = httpx.get(f"http://127.0.0.1:{http_port}/")
    assert page.status_code == 200
    assert "<title>market-bridge" in page.text

    for port, transport in ((ws_port, "websockets"), (tcp_port, "tcp")):
        sub = clients(port, transport=transport, username="demo", password=token)
        sub.connect()
        sub.subscribe("market/#")
        first = sub.expect(1)[0]
        tick = json.loads(first.payload)
        assert first.topic == f"market/{tick['exchange']}/{tick['pair']}"
        assert tick["pair"].split("-")[1] in {"ZAR", "NGN", "KES"}
    assert demo.stop() == 0
    assert (tmp_path / DEV_SECRET_PATH).stat().st_mode & 0o777 == 0o600


INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ")


def _failed_to_start(proc: Proc) -> str:
    """Exit code 1, and one line saying why: no traceback, nothing else but INFO logs."""
    assert proc.popen.wait(DEADLINE_S) == 1
    assert proc.stop() == 1  # collects the rest of the output
    output = "\n".join(proc.lines)
    assert "Traceback" not in output, output
    said = [line for line in proc.lines if not INFO_LINE.match(line)]
    assert len(said) == 1, output
    assert said[0].startswith("market-bridge: "), output
    return said[0]


@pytest.mark.parametrize(
    ("listener", "variable"),
    [
        ("tcp", "MARKET_BRIDGE_LISTENERS__TCP__PORT"),
        ("ws", "MARKET_BRIDGE_LISTENERS__WS__PORT"),
        ("http", "MARKET_BRIDGE_HTTP__PORT"),
    ],
)
def test_run_fails_fast_naming_a_port_in_use(
    procs: Callable[..., Proc], tmp_path: Path, listener: str, variable: str
) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        proc = procs("run", env={**EPHEMERAL, variable: str(taken)})
        line = _failed_to_start(proc)
    assert (
        line == f"market-bridge: listener '{listener}' cannot bind 127.0.0.1:{taken}: Address already in use"
    )


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed on return: nothing listens there


@pytest.mark.parametrize("problem", ["redis_unreachable", "path_under_a_file", "corrupt_file"])
def test_run_names_a_store_it_cannot_open_in_one_line(
    procs: Callable[..., Proc], tmp_path: Path, problem: str
) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    if problem == "redis_unreachable":
        port = _closed_port()
        setting = ("MARKET_BRIDGE_STORE__REDIS_URL", f"redis://:s3cret-pw@127.0.0.1:{port}/0")
        expected = rf"redis store redis://:\*\*\*@127\.0\.0\.1:{port}/0 is unreachable \(ping\): .*(refused|Connect call failed)"
    elif problem == "path_under_a_file":
        (tmp_path / "not-a-dir").write_text("a regular file\n")  # chmod cannot stop root; this does
        path = tmp_path / "not-a-dir" / "bridge.sqlite3"
        setting = ("MARKET_BRIDGE_STORE__PATH", str(path))
        expected = rf"sqlite store {re.escape(str(path))}: cannot create its directory: .*File exists"
    else:
        path = tmp_path / "corrupt.sqlite3"
        path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 32)
        setting = ("MARKET_BRIDGE_STORE__PATH", str(path))
        expected = rf"sqlite store {re.escape(str(path))}: cannot open: file is not a database"
    proc = procs("run", env={**EPHEMERAL, setting[0]: setting[1]})
    line = _failed_to_start(proc)
    print(line)
    assert re.search(expected, line), line
    assert "s3cret" not in "\n".join(proc.lines)


def test_bad_config_fails_naming_the_field_and_file(tmp_path: Path, procs: Callable[..., Proc]) -> None:
    bad = tmp_path / "bridge.yaml"
    bad.write_text("listeners:\n  tcp:\n    port: not-a-port\n")
    proc = procs("run", "--config", str(bad))
    assert proc.popen.wait(DEADLINE_S) == 2
    proc.wait_for_line(rf"config error in {re.escape(str(bad))}: listeners\.tcp\.port")


def test_config_command_prints_effective_values(procs: Callable[..., Proc], tmp_path: Path) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    proc = procs("config", env={"MARKET_BRIDGE_LISTENERS__TCP__PORT": "1999"})
    assert proc.popen.wait(DEADLINE_S) == 0
    proc._reader.join(DEADLINE_S)
    effective = json.loads("\n".join(proc.lines))
    assert effective["listeners"]["tcp"]["port"] == 1999
    assert effective["listeners"]["ws"]["path"] == "/mqtt"


@pytest.mark.parametrize(
    ("redis_url", "shown"),
    [
        ("redis://:s3cret-Pa55@cache.internal:6379/0", "redis://:***@cache.internal:6379/0"),
        ("redis://bridge:s3cret-Pa55@cache.internal:6379/2", "redis://bridge:***@cache.internal:6379/2"),
        ("rediss://bridge:s3cret-Pa55@cache.internal:6380/0", "rediss://bridge:***@cache.internal:6380/0"),
    ],
)
def test_config_command_hides_passwords(
    procs: Callable[..., Proc], tmp_path: Path, redis_url: str, shown: str
) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    feeds = json.dumps([{"kind": "valr", "base_url": "https://ops:s3cret-Pa55@api.valr.example/"}])
    proc = procs("config", env={"MARKET_BRIDGE_STORE__REDIS_URL": redis_url, "MARKET_BRIDGE_FEEDS": feeds})
    assert proc.popen.wait(DEADLINE_S) == 0
    proc._reader.join(DEADLINE_S)
    output = "\n".join(proc.lines)
    assert "s3cret-Pa55" not in output
    effective = json.loads(output)
    assert effective["store"]["redis_url"] == shown
    assert effective["feeds"][0]["base_url"] == "https://ops:***@api.valr.example/"


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_feed_command_publishes_over_mqtt(
    procs: Callable[..., Proc], clients: ClientFactory, transport: str
) -> None:
    with BrokerThread(bridge_config()) as broker:
        sub = clients(broker.tcp_port)
        sub.connect()
        sub.subscribe("market/#")
        url = (
            f"mqtt://127.0.0.1:{broker.tcp_port}"
            if transport == "tcp"
            else f"ws://127.0.0.1:{broker.ws_port}/mqtt"
        )
        password = token_for("feeder", "feed")
        feed = procs(
            "feed",
            "simulator",
            "--broker",
            url,
            "--interval",
            "0.05",
            "--seed",
            "7",
            "--username",
            "feeder",
            "--password",
            password,
        )
        got = sub.expect(20)
        seqs: dict[str, list[int]] = {}
        for message in got:
            seqs.setdefault(message.topic, []).append(json.loads(message.payload)["seq"])
        assert all(values == sorted(values) and len(set(values)) == len(values) for values in seqs.values())
        assert feed.stop() == 0


def test_feed_command_needs_a_replay_path(procs: Callable[..., Proc]) -> None:
    proc = procs("feed", "replay")
    assert proc.popen.wait(DEADLINE_S) == 2
    proc.wait_for_line(r"--path: replay needs an NDJSON file")


def test_token_command_mints_a_token_the_broker_accepts(procs: Callable[..., Proc], tmp_path: Path) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    proc = procs("token", "--sub", "alice", "--role", "subscriber", "--tz", "Africa/Lagos", "--ttl", "1h")
    assert proc.popen.wait(DEADLINE_S) == 0
    proc._reader.join(DEADLINE_S)
    (token,) = proc.lines
    secret = (tmp_path / DEV_SECRET_PATH).read_text().strip().encode()
    keys = KeyRing((VerificationKey("dev", secret, frozenset({"HS256"})),))
    claims = decide_auth(token, "alice", time.time(), keys, TokenPolicy())
    assert isinstance(claims, Claims)
    assert (claims.sub, claims.role, claims.tz) == ("alice", "subscriber", "Africa/Lagos")
    assert 3500 < claims.exp - time.time() <= 3600


@pytest.mark.parametrize(("args", "message"), [(["--ttl", "soon"], "--ttl"), (["--tz", "Mars/Base"], "tz")])
def test_token_command_rejects_bad_arguments(
    procs: Callable[..., Proc], tmp_path: Path, args: list[str], message: str
) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    proc = procs("token", "--sub", "alice", *args)
    assert proc.popen.wait(DEADLINE_S) == 2
    proc.wait_for_line(re.escape(message))


def test_limits_command_prints_the_effective_limits(procs: Callable[..., Proc], tmp_path: Path) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    proc = procs("limits", env={"MARKET_BRIDGE_LIMITS__MAX_CONNECTIONS_PER_USER": "3"})
    assert proc.popen.wait(DEADLINE_S) == 0
    proc._reader.join(DEADLINE_S)
    assert json.loads("\n".join(proc.lines)) == {
        "max_connections_per_user": 3,
        "max_connections": 10000,
        "max_subscriptions_per_connection": 100,
        "max_sessions_per_user": 10,
        "max_topic_bytes": 256,
        "rate": {
            "topic_updates_per_s": {"subscriber": 0.0, "feed": 0.0, "service": 0.0, "admin": 0.0},
            "publish_per_s": 1000.0,
            "publish_burst": 1000,
        },
    }


def test_subscriptions_command_lists_a_users_persistent_sessions(
    procs: Callable[..., Proc], clients: ClientFactory, tmp_path: Path
) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)
    secret = (tmp_path / DEV_SECRET_PATH).read_text().strip().encode()
    token = mint_token(
        SigningKey("dev", secret, "HS256"), sub="alice", role="subscriber", now=time.time(), ttl_s=600
    )
    broker = procs("run", env=EPHEMERAL)
    port = int(broker.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1))
    phone = clients(port, client_id="alice-phone", clean_session=False, username="alice", password=token)
    phone.connect()
    phone.subscribe([("user/alice/#", 1), ("market/luno/+", 0)])
    listing = procs("subscriptions", "--user", "alice")
    assert listing.popen.wait(DEADLINE_S) == 0
    listing._reader.join(DEADLINE_S)
    assert json.loads("\n".join(listing.lines)) == {"alice-phone": {"market/luno/+": 0, "user/alice/#": 1}}


def test_tz_command_sets_shows_and_clears_an_override(procs: Callable[..., Proc], tmp_path: Path) -> None:
    generate_dev_secret(tmp_path / DEV_SECRET_PATH)

    def tz(*args: str) -> list[str]:
        proc = procs("tz", "--user", "alice", *args)
        assert proc.popen.wait(DEADLINE_S) == (2 if "Mars/Base" in args else 0)
        proc._reader.join(DEADLINE_S)
        return proc.lines

    assert tz("--set", "Africa/Nairobi") == ["Africa/Nairobi"]
    assert tz() == ["Africa/Nairobi"]
    assert tz("--set", "Mars/Base")[-1].endswith("'Mars/Base' is not an IANA time zone")
    assert tz("--clear") == ["(none: the token's tz claim applies)"]
