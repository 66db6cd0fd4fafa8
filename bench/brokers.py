"""Start and stop the brokers under test, each a subprocess on its own free loopback ports.

- ``market-bridge``: ``python -m bridge.cli run --config FILE``, the way users run it: JWT
  auth, ACL and time-zone rewriting on, a fresh embedded store per run, INFO logs to a file.
- ``amqtt``: vanilla amqtt 0.12.1 (``bench/vanilla_amqtt.py``), anonymous, default plugins.
- ``mosquitto``: when installed, TCP + WebSocket listeners, anonymous, otherwise defaults.
- ``reference``: ``bench/reference_broker.py``, the least a broker can do per delivery, for
  the generator's own ceiling.

Only the external interface is used (CLI, YAML config, JWTs, sockets), so the bench keeps
working while the engine behind it is rewritten.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
import psutil
import yaml

from bench.loadgen import Credentials, Endpoint

__all__ = [
    "ZONES",
    "Auth",
    "BrokerKind",
    "BrokerStartError",
    "RunningBroker",
    "mosquitto_available",
    "running",
]

ROOT = Path(__file__).resolve().parent.parent
BrokerKind = Literal["market-bridge", "amqtt", "mosquitto", "reference"]
ZONES = ("Africa/Lagos", "Africa/Nairobi", "Africa/Cairo", "Africa/Johannesburg", "Africa/Casablanca")


class BrokerStartError(Exception):
    def __init__(self, kind: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{kind} did not start: {reason}\n{log_tail}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Auth:
    """An HS256 key the broker trusts, and tokens minted from it (the claims bridge/auth.py reads)."""

    secret: str
    kid: str = "bench"

    @classmethod
    def new(cls) -> Auth:
        return cls(secrets.token_urlsafe(48))

    def token(self, sub: str, role: str, *, tz: str | None = None, ttl_s: int = 7200) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}
        if tz is not None:
            claims["tz"] = tz
        return jwt.encode(claims, self.secret, algorithm="HS256", headers={"kid": self.kid})

    def config(self) -> dict[str, Any]:
        return {"keys": [{"kid": self.kid, "algorithms": ["HS256"], "secret": self.secret}]}


@dataclass
class RunningBroker:
    kind: BrokerKind
    process: subprocess.Popen[bytes]
    tcp_port: int
    ws_port: int
    auth: Auth | None
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    @property
    def tcp(self) -> Endpoint:
        return Endpoint(self.host, self.tcp_port, websocket=False)

    @property
    def ws(self) -> Endpoint:
        return Endpoint(self.host, self.ws_port, websocket=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def _tree(self) -> list[psutil.Process]:
        """The broker and its child processes (``--workers``: the supervisor and the workers)."""
        main = self.ps
        try:
            return [main, *main.children(recursive=True)]
        except psutil.Error:
            return [main]

    def rss(self) -> int:
        total = 0
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                total += int(process.memory_info().rss)
        return total

    def cpu_s(self) -> float:
        """CPU seconds of the broker's live processes (a worker that died takes its share along)."""
        total = 0.0
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def pids(self) -> list[int]:
        return [process.pid for process in self._tree()]

    def nofile_limit(self) -> int | None:
        """The broker's soft RLIMIT_NOFILE (Mosquitto drops to its own user: prlimit is refused)."""
        try:
            return int(self.ps.rlimit(psutil.RLIMIT_NOFILE)[0])
        except psutil.Error:
            pass
        try:
            for line in Path(f"/proc/{self.process.pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def subscribers(self, prefix: str, count: int) -> list[Credentials]:
        """One user per connection (the per-user limit is 10), zones spread round-robin."""
        if self.auth is None:
            return [Credentials(f"{prefix}{i}") for i in range(count)]
        return [
            Credentials(
                f"{prefix}{i}",
                f"{prefix}{i}",
                self.auth.token(f"{prefix}{i}", "subscriber", tz=ZONES[i % len(ZONES)]),
            )
            for i in range(count)
        ]

    def feed(self, name: str = "bench-feed") -> Credentials:
        if self.auth is None:
            return Credentials(name)
        return Credentials(name, name, self.auth.token(name, "feed"))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines_with(self, needle: str) -> int:
        try:
            with self.log_path.open(errors="replace") as log:
                return sum(1 for line in log if needle in line)
        except OSError:
            return 0

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _launch(
    kind: BrokerKind, workdir: Path, tcp: int, ws: int, config: Mapping[str, Any], args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    log = open(workdir / "broker.log", "wb")  # noqa: SIM115 (the child owns it; closed below)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_BRIDGE_")}
    if kind == "market-bridge":
        path = workdir / "bridge.yaml"
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        argv = [sys.executable, "-m", "bridge.cli", "run", "--config", str(path), *args]
    elif kind in ("amqtt", "reference"):
        module = "bench.vanilla_amqtt" if kind == "amqtt" else "bench.reference_broker"
        argv = [sys.executable, "-m", module, "--tcp-port", str(tcp), "--ws-port", str(ws)]
    else:
        path = workdir / "mosquitto.conf"
        path.write_text(
            f"listener {tcp} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\n"
            "allow_anonymous true\n"
            + "".join(f"{key} {value}\n" for key, value in {"persistence": "false", **config}.items())
            + (f"persistence_location {workdir}/\n" if config.get("persistence") == "true" else "")
        )
        argv = [shutil.which("mosquitto") or "mosquitto", "-c", str(path)]
    try:
        return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def _wait_listening(broker: RunningBroker, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = {broker.tcp_port, broker.ws_port}
    while pending:
        if not broker.alive():
            raise BrokerStartError(
                broker.kind, f"exited with code {broker.process.returncode}", broker.log_tail()
            )
        if time.monotonic() > deadline:
            broker.stop()
            raise BrokerStartError(
                broker.kind, f"ports {sorted(pending)} not listening after {timeout:.0f}s", broker.log_tail()
            )
        for port in list(pending):
            try:
                socket.create_connection((broker.host, port), timeout=0.2).close()
                pending.discard(port)
            except OSError:
                pass
        if pending:
            time.sleep(0.05)


@contextmanager
def running(
    kind: BrokerKind,
    *,
    max_connections: int = 10_000,
    auth: Auth | None = None,
    extra: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
) -> Iterator[RunningBroker]:
    """A broker of ``kind`` for the duration of the block; always stopped on the way out.

    For ``market-bridge``: ``auth`` (a new key by default) and ``extra`` config merged over
    the bench defaults (e.g. ``{"auth": {...}}`` to trust other keys); ``args`` after
    ``run --config FILE`` (e.g. ``--workers 2``).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    tcp, ws = _free_port(), _free_port()
    config: dict[str, Any] = {}
    if kind == "market-bridge":
        auth = auth or Auth.new()
        config = {
            "listeners": {"ws": {"host": "127.0.0.1", "port": ws}, "tcp": {"host": "127.0.0.1", "port": tcp}},
            "feeds": [],
            "logging": {"level": "INFO"},
            "http": {"port": 0},
            "store": {"path": str(workdir / "store.sqlite3")},
            # The feed's inbound limit (1000 ticks/s by default) would cap the offered load;
            # the other brokers have none. Everything else is the default users run.
            "limits": {"max_connections": max_connections, "rate": {"publish_per_s": 0}},
            "timezones": {"enabled": True},
            # Shutdown only: the default 10 s drain would pad every scenario.
            "broker": {"drain_timeout_s": 2},
            "auth": auth.config(),
        }
        config = _merge(config, extra or {})
    else:
        auth = None
        config = dict(extra or {})  # mosquitto: extra "option value" lines for its config file
    broker = RunningBroker(
        kind, _launch(kind, workdir, tcp, ws, config, args), tcp, ws, auth, workdir / "broker.log"
    )
    try:
        _wait_listening(broker, 30)
        yield broker
    finally:
        broker.stop()
        if os.environ.get("BENCH_KEEP_LOGS") is None:
            shutil.rmtree(workdir, ignore_errors=True)
