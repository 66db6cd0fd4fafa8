"""A real local Redis Cluster for tests and ``make cluster-demo``: 3 masters + 3 replicas of
``redis-server --cluster-enabled yes`` on free loopback ports, created with ``redis-cli
--cluster create``.

Never a fake: slot ownership, MOVED, sharded pub/sub and failover are what is under test.
``failover()`` promotes a replica the clean way (``CLUSTER FAILOVER``); ``kill_master()``
kills one the hard way. ``stop()`` stops every process it started, whatever state it is in.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import ClusterError

__all__ = ["ClusterNodeProcess", "RedisCluster"]

MASTERS = 3
REPLICAS_PER_MASTER = 1
# Small, so a killed master is replaced in a couple of seconds (the default is 15 s).
NODE_TIMEOUT_MS = 1000
START_DEADLINE_S = 20.0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too: both must be <= 65535, so the
    kernel's ephemeral range (up to 60999) cannot be used as is."""
    for _ in range(1000):
        port = random.randint(20000, 55000)
        if port not in taken and port + 10000 not in taken and _port_free(port) and _port_free(port + 10000):
            taken.update({port, port + 10000})
            return port
    raise AssertionError("no free port pair for a Redis Cluster node")


def _parse(data: bytes, pos: int = 0) -> tuple[object, int] | None:
    """One RESP2 value from ``data[pos:]`` and where it ends; None if incomplete."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, head = data[pos : pos + 1], data[pos + 1 : end]
    if kind in (b"+", b"-"):
        return head.decode(errors="replace") if kind == b"+" else RuntimeError(head.decode()), end + 2
    if kind == b":":
        return int(head), end + 2
    if kind == b"$":
        size = int(head)
        if size < 0:
            return None, end + 2
        if len(data) < end + 2 + size + 2:
            return None
        return data[end + 2 : end + 2 + size].decode(errors="replace"), end + 2 + size + 2
    if kind == b"*":
        items: list[object] = []
        at = end + 2
        for _ in range(max(int(head), 0)):
            parsed = _parse(data, at)
            if parsed is None:
                return None
            item, at = parsed
            items.append(item)
        return items, at
    raise AssertionError(f"unexpected RESP type {kind!r}")


def _call(port: int, *args: str, timeout: float = 2.0) -> object:
    """One command over a raw RESP socket; the parsed reply (an error reply as RuntimeError)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"port {port} closed the connection")
            data += chunk
            parsed = _parse(data)
            if parsed is not None:
                return parsed[0]


@dataclass
class ClusterNodeProcess:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, *args: str) -> object:
        return _call(self.port, *args)

    def text(self, *args: str) -> str:
        """A command whose reply is a status or a bulk string; an error reply raises."""
        reply = self.call(*args)
        if isinstance(reply, RuntimeError):
            raise reply
        assert isinstance(reply, str), reply
        return reply


class RedisCluster:
    """``start()``/``stop()``; ``failover()`` and ``kill_master()`` for fault tests."""

    def __init__(self, workdir: Path) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise ClusterError("redis-server/redis-cli are not installed: apt-get install redis-server")
        self.server_binary, self.cli_binary = server, cli
        self.workdir = workdir
        taken: set[int] = set()
        self.nodes = [
            ClusterNodeProcess(_free_cluster_port(taken)) for _ in range(MASTERS * (1 + REPLICAS_PER_MASTER))
        ]

    @property
    def startup_nodes(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def _spawn(self, node: ClusterNodeProcess) -> None:
        nodedir = self.workdir / str(node.port)
        nodedir.mkdir(parents=True, exist_ok=True)
        node.proc = subprocess.Popen(
            [
                self.server_binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(node.port),
                "--dir",
                str(nodedir),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{node.port}.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the demo does not kill Redis under the nodes.
            start_new_session=True,
        )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait(lambda node=node: node.text("PING") == "PONG", f"node {node.port} up")
            subprocess.run(
                [
                    self.cli_binary,
                    "--cluster",
                    "create",
                    *self.startup_nodes,
                    "--cluster-replicas",
                    str(REPLICAS_PER_MASTER),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=START_DEADLINE_S,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _wait(self, condition: object, what: str, deadline_s: float = START_DEADLINE_S) -> None:
        assert callable(condition)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (OSError, RuntimeError):  # not up yet, or an error reply such as LOADING
                pass
            time.sleep(0.05)
        raise ClusterError(f"redis cluster: {what} not reached within {deadline_s:g} s")

    def _state_ok(self, node: ClusterNodeProcess) -> bool:
        return "cluster_state:ok" in node.text("CLUSTER", "INFO")

    def _masters_seen_by(self, node: ClusterNodeProcess) -> set[int]:
        """Ports of the masters owning slots, as ``node`` sees them."""
        ports = set()
        for line in node.text("CLUSTER", "NODES").splitlines():
            fields = line.split()
            # id addr flags master ping pong epoch link slot...
            if len(fields) >= 9 and "master" in fields[2] and "fail" not in fields[2]:
                ports.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return ports

    def wait_ok(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Every live node says ``cluster_state:ok``, they agree on the masters, and every
        live replica is in sync with its master."""

        def agreed() -> bool:
            live = [n for n in self.nodes if n.alive]
            if not all(self._state_ok(n) for n in live):
                return False
            views = {frozenset(self._masters_seen_by(n)) for n in live}
            if len(views) != 1 or len(next(iter(views))) != MASTERS:
                return False
            # A replica that has not synced yet cannot be elected if its master dies.
            masters = next(iter(views))
            return all(
                "master_link_status:up" in n.text("INFO", "replication")
                for n in live
                if n.port not in masters
            )

        self._wait(agreed, "cluster_state:ok on every node", deadline_s)

    def masters(self) -> list[ClusterNodeProcess]:
        live = next(n for n in self.nodes if n.alive)
        ports = self._masters_seen_by(live)
        return [n for n in self.nodes if n.port in ports and n.alive]

    def master_of(self, key: str) -> ClusterNodeProcess:
        live = next(n for n in self.nodes if n.alive)
        slot = int(str(live.call("CLUSTER", "KEYSLOT", key)))
        for line in live.text("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if span[0].isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no master owns slot {slot}")

    def node_id(self, node: ClusterNodeProcess) -> str:
        return node.text("CLUSTER", "MYID")

    def move_slot(self, key: str, target: ClusterNodeProcess) -> None:
        """Migrate the slot of ``key`` (and its keys) to master ``target``, the way
        ``redis-cli --cluster reshard`` does: IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE."""
        source = self.master_of(key)
        assert source is not target
        slot = str(source.call("CLUSTER", "KEYSLOT", key))
        source_id, target_id = self.node_id(source), self.node_id(target)
        assert target.text("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id) == "OK"
        assert source.text("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id) == "OK"
        while True:
            names = source.call("CLUSTER", "GETKEYSINSLOT", slot, "100")
            assert isinstance(names, list), names
            if not names:
                break
            reply = source.text(
                "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *map(str, names)
            )
            assert reply == "OK", reply
        for node in (target, source, *(n for n in self.masters() if n not in (source, target))):
            assert node.text("CLUSTER", "SETSLOT", slot, "NODE", target_id) == "OK"
        self.wait_ok()

    def replica_of(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        master_id = self.node_id(master)
        for node in self.nodes:
            if not node.alive or node is master:
                continue
            for line in node.text("CLUSTER", "NODES").splitlines():
                fields = line.split()
                if (
                    len(fields) >= 4
                    and "myself" in fields[2]
                    and "slave" in fields[2]
                    and fields[3] == master_id
                ):
                    return node
        raise AssertionError(f"no live replica of {master.port}")

    def failover(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        """``CLUSTER FAILOVER`` on ``master``'s replica (a clean, coordinated switch); returns
        the promoted node once the cluster agrees on it."""
        replica = self.replica_of(master)
        assert replica.text("CLUSTER", "FAILOVER") == "OK"
        self._wait(lambda: replica.port in self._masters_seen_by(master), "failover agreed")
        self.wait_ok()
        return replica

    def kill_master(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        """SIGKILL ``master``; returns its replica once the cluster has promoted it (after
        the node timeout). ``restart(master)`` brings the killed one back."""
        replica = self.replica_of(master)
        assert master.proc is not None
        master.proc.kill()
        master.proc.wait()
        self._wait(lambda: replica.port in self._masters_seen_by(replica), "replica promoted")
        self.wait_ok()
        return replica

    @contextmanager
    def paused(self, node: ClusterNodeProcess) -> Iterator[None]:
        """``node`` hung for the block (SIGSTOP: connections stay open, nothing answers);
        SIGCONT afterwards. Longer than the node timeout (1 s) and the cluster fails it over."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            node.proc.send_signal(signal.SIGCONT)

    def restart(self, node: ClusterNodeProcess) -> None:
        """Start a killed node again: it rejoins (as a replica of whoever took over)."""
        assert not node.alive
        self._spawn(node)
        self._wait(lambda: node.text("PING") == "PONG", f"node {node.port} up")
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
            node.proc = None
