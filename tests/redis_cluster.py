"""A real local Redis Cluster for tests: 3 masters + 3 replicas of ``redis-server
--cluster-enabled yes`` on free loopback ports, created with ``redis-cli --cluster create``.

Never a fake: slot ownership, MOVED, sharded pub/sub and failover are what is under test.
``failover()`` promotes a replica the clean way (``CLUSTER FAILOVER``); ``kill_master()``
kills one the hard way. ``stop()`` stops every process it started, whatever state it is in.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def _command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command over a raw RESP socket: replies are read until the first complete one."""
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
                break
            data += chunk
            if _complete(data):
                break
    return data.decode(errors="replace")


def _complete(data: bytes) -> bool:
    if data[:1] in (b"+", b"-", b":"):
        return data.endswith(b"\r\n")
    if data[:1] == b"$":
        head, sep, rest = data.partition(b"\r\n")
        if not sep:
            return False
        size = int(head[1:])
        return size < 0 or len(rest) >= size + 2
    return False


@dataclass
class ClusterNodeProcess:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def info(self, *args: str) -> str:
        return _command(self.port, *args)


class RedisCluster:
    """``start()``/``stop()``; ``failover()`` and ``kill_master()`` for fault tests."""

    def __init__(self, workdir: Path) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.fail("redis-server/redis-cli are not installed: apt-get install redis-server")
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
        )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait(lambda node=node: node.info("PING").startswith("+PONG"), f"node {node.port} up")
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
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"redis cluster: {what} not reached within {deadline_s:g} s")

    def _state_ok(self, node: ClusterNodeProcess) -> bool:
        return "cluster_state:ok" in node.info("CLUSTER", "INFO")

    def _masters_seen_by(self, node: ClusterNodeProcess) -> set[int]:
        """Ports of the masters owning slots, as ``node`` sees them."""
        ports = set()
        for line in node.info("CLUSTER", "NODES").splitlines():
            fields = line.split()
            # id addr flags master ping pong epoch link slot...
            if len(fields) >= 9 and "master" in fields[2] and "fail" not in fields[2]:
                ports.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return ports

    def wait_ok(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Every live node says ``cluster_state:ok`` and they agree on the masters."""

        def agreed() -> bool:
            live = [n for n in self.nodes if n.alive]
            if not all(self._state_ok(n) for n in live):
                return False
            views = {frozenset(self._masters_seen_by(n)) for n in live}
            return len(views) == 1 and len(next(iter(views))) == MASTERS

        self._wait(agreed, "cluster_state:ok on every node", deadline_s)

    def masters(self) -> list[ClusterNodeProcess]:
        live = next(n for n in self.nodes if n.alive)
        ports = self._masters_seen_by(live)
        return [n for n in self.nodes if n.port in ports and n.alive]

    def master_of(self, key: str) -> ClusterNodeProcess:
        live = next(n for n in self.nodes if n.alive)
        slot = int(live.info("CLUSTER", "KEYSLOT", key).strip().lstrip(":"))
        for line in live.info("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if span[0].isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no master owns slot {slot}")

    def replica_of(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        master_id = master.info("CLUSTER", "MYID").strip().splitlines()[-1]
        for node in self.nodes:
            if not node.alive or node is master:
                continue
            for line in node.info("CLUSTER", "NODES").splitlines():
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
        assert replica.info("CLUSTER", "FAILOVER").startswith("+OK")
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

    def restart(self, node: ClusterNodeProcess) -> None:
        """Start a killed node again: it rejoins (as a replica of whoever took over)."""
        assert not node.alive
        self._spawn(node)
        self._wait(lambda: node.info("PING").startswith("+PONG"), f"node {node.port} up")
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
