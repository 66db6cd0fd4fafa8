"""``market-bridge run --workers N``: the plan (pure, table-driven) and real processes — a real
``redis-server``, a supervisor with two workers sharing fixed loopback ports, paho clients."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bridge.workers import RESTART_MAX_S, parse_workers, plan_workers, restart_delay
from tests.conftest import (
    DEADLINE_S,
    TEST_SECRET,
    Client,
    Proc,
    Transport,
    bridge_config,
    make_tick,
    token_for,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ the plan (pure)


@pytest.mark.parametrize(
    ("text", "cores", "expected"),
    [("1", 4, 1), ("2", 4, 2), ("256", 4, 256), ("auto", 4, 4), (" AUTO ", 2, 2), ("auto", 999, 256)],
)
def test_parse_workers(text: str, cores: int, expected: int) -> None:
    assert parse_workers(text, cores) == expected


@pytest.mark.parametrize("text", ["0", "-1", "257", "1.5", "two", ""])
def test_parse_workers_refuses_what_is_not_a_count(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_workers(text, 4)
    assert caught.value.field == "--workers"


CLUSTER = {"enabled": True, "redis_url": "redis://127.0.0.1:6379/0"}
FIXED = {"ws": {"port": 18083}, "tcp": {"port": 18883}}


def _config(**overrides: Any) -> BridgeConfig:
    base: dict[str, Any] = {"listeners": FIXED, "http": {"port": 18090}, "cluster": CLUSTER}
    return bridge_config(**{**base, **overrides})


@pytest.mark.parametrize(
    ("overrides", "count", "field", "words"),
    [
        ({}, 1, "--workers", "2 or more"),
        ({"cluster": {"enabled": False}}, 2, "cluster.enabled", "needs the cluster on"),
        ({"listeners": {"ws": {"port": 0}, "tcp": {"port": 18883}}}, 2, "listeners.ws.port", "port 0"),
        ({"listeners": {"ws": {"port": 18083}, "tcp": {"port": 0}}}, 3, "listeners.tcp.port", "port 0"),
        ({"http": {"port": 0}}, 2, "http.port", "fixed port"),
        ({"http": {"port": 65535}}, 2, "http.port", "past port 65535"),
        ({"http": {"port": 18882}}, 4, "http.port", "listener port 18883"),
    ],
)
def test_plan_refuses_with_the_field_to_fix(
    overrides: dict[str, Any], count: int, field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_workers(_config(**overrides), count, host="box")
    assert caught.value.field == field
    assert words in caught.value.message


def test_plan_disabled_listener_with_port_0_is_fine() -> None:
    listeners = {"ws": {"enabled": False, "port": 0}, "tcp": {"port": 18883}}
    plans = plan_workers(_config(listeners=listeners, http={"enabled": False}), 2, host="box")
    assert [p.http_port for p in plans] == [None, None]
    assert all("MARKET_BRIDGE_HTTP__PORT" not in p.env for p in plans)


def test_plan_names_ports_feeds_and_stores_per_worker(tmp_path: Path) -> None:
    config = _config(
        feeds=[{"kind": "simulator"}],
        store={"path": str(tmp_path / "db.sqlite3")},
        cluster={**CLUSTER, "node_id": "web"},
    )
    plans = plan_workers(config, 3, host="ignored")
    assert [(p.name, p.node_id, p.http_port) for p in plans] == [
        ("w0", "web-w0", 18090),
        ("w1", "web-w1", 18091),
        ("w2", "web-w2", 18092),
    ]
    for plan in plans:
        assert plan.env["MARKET_BRIDGE_CLUSTER__NODE_ID"] == plan.node_id
        assert plan.env["MARKET_BRIDGE_LOGGING__TAG"] == plan.node_id  # one stream, N writers
        assert plan.env["MARKET_BRIDGE_LISTENERS__REUSE_PORT"] == "true"
        assert plan.env["MARKET_BRIDGE_HTTP__PORT"] == str(plan.http_port)
        assert plan.env["MARKET_BRIDGE_STORE__PATH"] == str(tmp_path / f"db-w{plan.index}.sqlite3")
    # Only worker 0 runs the feeds: N copies would feed every tick N times.
    assert ["MARKET_BRIDGE_FEEDS" in p.env for p in plans] == [False, True, True]
    assert plans[1].env["MARKET_BRIDGE_FEEDS"] == "[]"


def test_plan_shares_a_redis_store_and_names_workers_after_the_host() -> None:
    plans = plan_workers(_config(store={"redis_url": "redis://127.0.0.1:6379/1"}), 2, host="my host!")
    assert [p.node_id for p in plans] == ["my-host-w0", "my-host-w1"]
    assert all("MARKET_BRIDGE_STORE__PATH" not in p.env for p in plans)


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, RESTART_MAX_S), (50, 30.0)]
)
def test_restart_delay_backs_off_to_a_cap(failures: int, delay: float) -> None:
    assert restart_delay(failures) == delay


# ------------------------------------------------------------------ real processes


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports(count: int, *, consecutive: bool = False) -> list[int]:
    """Free fixed loopback ports (``consecutive``: a run of them, for worker i's HTTP on base + i).

    Below the ephemeral range: the kernel never hands these out to other processes' outgoing
    connections between our probe and the workers' bind (it did, on a busy machine).
    """
    rng = random.Random()
    top = _ephemeral_low() - count
    for _ in range(200):
        base = rng.randrange(20000, top)
        wanted = list(range(base, base + count)) if consecutive else rng.sample(range(20000, top), count)
        held: list[socket.socket] = []
        try:
            for port in wanted:
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return wanted
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free ports")


@dataclass
class Workers:
    proc: Proc
    ws: int
    tcp: int
    http: list[int]
    node_ids: list[str]

    def get(self, index: int, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token_for('ops', 'admin')}"}
        return httpx.get(f"http://127.0.0.1:{self.http[index]}{path}", headers=headers, timeout=DEADLINE_S)

    def admin(self, index: int) -> dict[str, Any]:
        body: dict[str, Any] = self.get(index, "/admin/connections").json()
        return body

    def node_of(self, clients: list[Client]) -> dict[str, str]:
        """Client id -> the node holding it, once every worker's cluster-wide list has them all
        and agrees (a node publishes its connections to the others through Redis)."""
        wanted = {c.client_id for c in clients}
        seen: list[dict[str, str]] = []

        def agreed() -> bool:
            seen[:] = [
                {c["client_id"]: c["node"] for c in self.admin(i)["connections"]}
                for i in range(len(self.http))
            ]
            return all(wanted <= view.keys() and view == seen[0] for view in seen)

        wait_until(agreed, what="every worker listing every connection alike")
        return seen[0]

    def pids(self) -> dict[str, int]:
        """The latest pid of each worker, from the supervisor's log."""
        found: dict[str, int] = {}
        for line in list(self.proc.lines):
            if match := re.search(r"worker (w\d+) started: pid (\d+)", line):
                found[match.group(1)] = int(match.group(2))
        return found


def _write_config(tmp_path: Path, redis_url: str, ws: int, tcp: int, http: int, **extra: Any) -> Path:
    config = {
        "listeners": {"ws": {"port": ws}, "tcp": {"port": tcp}},
        "http": {"port": http},
        "feeds": [],
        "store": {"redis_url": redis_url},
        "auth": {"keys": [{"kid": "test", "algorithms": ["HS256"], "secret": TEST_SECRET}]},
        "broker": {"drain_timeout_s": 2},
        "cluster": {"enabled": True, "node_id": "box", "redis_url": redis_url, "lease_ttl_s": 3},
        **extra,
    }
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by whoever inherited it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def workers(redis_url: str, procs: Callable[..., Proc], tmp_path: Path) -> Iterator[Workers]:
    ws, tcp = _free_ports(2)
    http = _free_ports(2, consecutive=True)
    path = _write_config(tmp_path, redis_url, ws, tcp, http[0], limits={"max_connections_per_user": 2})
    proc = procs("run", "--config", str(path), "--workers", "2")
    proc.wait_for_line(r"workers: 2 ready")
    running = Workers(proc, ws, tcp, http, ["box-w0", "box-w1"])
    yield running
    pids = list(running.pids().values())
    proc.stop()
    # Every worker stopped with the supervisor: none left behind.
    assert not [p for p in pids if not _gone(p)]


def _client(port: int, transport: Transport = "tcp", *, username: str | None = None) -> Client:
    user = username or unique("user")
    return Client(port, transport=transport, username=user, password=token_for(user, "subscriber"))


def test_both_workers_are_up_as_nodes_of_one_cluster(workers: Workers) -> None:
    for index, node_id in enumerate(workers.node_ids):
        assert workers.get(index, "/readyz").status_code == 200
        view = workers.admin(index)
        assert view["node"] == node_id
        assert set(workers.node_ids) <= set(view["cluster_nodes"])
        metrics = workers.get(index, "/metrics").text
        assert f'node="{node_id}"' in metrics  # /metrics per worker, labelled with its node
        assert any(
            f"[{node_id}] bridge.edge.broker: listener tcp bound" in line for line in workers.proc.lines
        )


def test_connections_spread_over_both_workers_and_ticks_cross_them(workers: Workers) -> None:
    topic = "market/luno/BTC-ZAR"
    subscribers = []
    try:
        for n in range(48):  # both transports, on the one shared port each
            sub = _client(workers.ws if n % 2 else workers.tcp, "websockets" if n % 2 else "tcp")
            subscribers.append(sub)
            sub.connect()
            assert sub.subscribe(topic) == [0]
        where = workers.node_of(subscribers)
        per_node = {
            node: sum(1 for s in subscribers if where.get(s.client_id) == node) for node in workers.node_ids
        }
        # The kernel spreads by a hash of the peer's port: 48 connections on one worker would be
        # a 2^-47 chance, i.e. no SO_REUSEPORT spreading.
        assert sum(per_node.values()) == len(subscribers), per_node
        assert all(count > 0 for count in per_node.values()), per_node
        feed = Client(workers.tcp, username="feed-1", password=token_for("feed-1", "feed"))
        subscribers.append(feed)
        feed.connect()
        feed_node = workers.node_of([feed])[feed.client_id]
        feed.publish(topic, make_tick(last="4242").encode())
        others = [s for s in subscribers[:-1] if where[s.client_id] != feed_node]
        assert others
        for sub in subscribers[:-1]:  # every subscriber, on both workers, gets it once
            (message,) = sub.expect(1)
            assert (message.topic, json.loads(message.payload)["last"]) == (topic, "4242")
    finally:
        for client in subscribers:
            client.close()


def test_the_per_user_limit_counts_both_workers(workers: Workers) -> None:
    """Limit 2 per user: one connection on each worker fills it, so a third is refused (3),
    though each worker holds only one of that user's connections."""
    made: list[Client] = []
    try:
        for _ in range(30):  # a fresh user until its two land on different workers (1/2 each)
            user = unique("limited")
            pair = [_client(workers.tcp, username=user), _client(workers.tcp, username=user)]
            made += pair
            for client in pair:
                client.connect()
            where = workers.node_of(pair)
            if where[pair[0].client_id] != where[pair[1].client_id]:
                break
        else:
            pytest.fail("30 pairs of connections all landed pairwise on one worker: no spreading")
        third = _client(workers.ws, "websockets", username=user)
        made.append(third)
        third.connect(expect=3)  # CONNACK 3: the user is at the limit, counted across workers
        for index in range(2):  # both see the user's two leases (their view is <= 1 s old)
            wait_until(
                lambda index=index: workers.admin(index)["per_user"].get(user) == 2,  # type: ignore[misc]
                what=f"worker {index} counting both",
            )
    finally:
        for client in made:
            client.close()


def test_a_dead_worker_is_restarted_and_sigterm_stops_every_process(workers: Workers) -> None:
    before = workers.pids()
    os.kill(before["w1"], signal.SIGKILL)
    workers.proc.wait_for_line(r"worker w1 \(pid \d+, node box-w1\) died: signal 9; restarting")
    new = int(workers.proc.wait_for_line(rf"worker w1 started: pid (?!{before['w1']}\b)(\d+)").group(1))
    workers.proc.wait_for_line(rf"worker w1 ready: pid {new}\b")
    after = workers.pids()
    assert after == {"w0": before["w0"], "w1": new}  # the other worker served on
    wait_until(lambda: workers.get(1, "/readyz").status_code == 200, what="the restarted worker ready")
    assert workers.proc.popen.poll() is None
    assert workers.proc.stop() == 0  # SIGTERM: every worker drains, the supervisor exits 0
    workers.proc.wait_for_line(r"workers: all 2 stopped")
    for pid in after.values():
        wait_until(lambda pid=pid: _gone(pid), what=f"worker {pid} gone")  # type: ignore[misc]


def test_a_worker_that_cannot_start_stops_the_group(
    redis_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    ws, tcp = _free_ports(2)
    http = _free_ports(2, consecutive=True)
    path = _write_config(tmp_path, redis_url, ws, tcp, http[0])
    with socket.socket() as squatter:  # holds the TCP port without SO_REUSEPORT: binds fail
        squatter.bind(("127.0.0.1", tcp))
        squatter.listen()
        proc = procs("run", "--config", str(path), "--workers", "2")
        assert proc.popen.wait(DEADLINE_S * 3) == 1
    proc.wait_for_line(r"exited with code 1 before it was ready; stopping the other workers")
    assert any(f"cannot bind 127.0.0.1:{tcp}" in line for line in proc.lines)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"cluster": {"enabled": False}}, "cluster.enabled"),
        ({"listeners": {"ws": {"port": 0}, "tcp": {"port": 1883}}}, "listeners.ws.port"),
    ],
)
def test_run_refuses_workers_it_cannot_share_in_one_line(
    redis_url: str, procs: Callable[..., Proc], tmp_path: Path, extra: dict[str, Any], field: str
) -> None:
    path = _write_config(tmp_path, redis_url, 18083, 18883, 18090, **extra)
    proc = procs("run", "--config", str(path), "--workers", "2")
    assert proc.popen.wait(DEADLINE_S * 2) == 2
    proc.wait_for_line(field)
    assert len([line for line in proc.lines if line.strip()]) == 1, proc.lines


def test_workers_drain_and_exit_when_the_supervisor_is_killed(workers: Workers) -> None:
    pids = workers.pids()
    workers.proc.popen.kill()  # SIGKILL: the supervisor forwards nothing, the kernel tells them
    workers.proc.popen.wait(DEADLINE_S)
    for pid in pids.values():
        wait_until(lambda pid=pid: _gone(pid), timeout=30, what=f"worker {pid} gone")  # type: ignore[misc]
