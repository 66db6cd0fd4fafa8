"""``market-bridge run --workers N``: N nodes of one cluster on one host, sharing its ports.

A Python broker uses one core; a host has several. The supervisor (this process) starts N
``market-bridge run`` workers, each a full cluster node (``<node_id or host>-w<i>``) that
binds the same WebSocket and TCP ports with ``SO_REUSEPORT`` (``listeners.reuse_port``), so
the kernel spreads new connections over them. What makes N processes one broker is the
cluster behind them (ticks, seq, limits, client ids over Redis): N > 1 needs
``cluster.enabled``.

Per worker (environment overrides over the same config file):

- ``cluster.node_id`` and ``logging.tag`` (in every log line): ``<node_id or host>-w<i>``;
- ``http.port``: ``http.port + i``, so a scrape reaches the worker it names (a shared port
  would answer from a random worker); each serves its own ``/metrics`` with its ``node``
  label, ``/readyz`` and the admin API (cluster-wide answers on every worker);
- ``feeds``: only worker 0 runs the configured feeds (N copies would feed each tick N times);
- ``store.path`` (SQLite only): ``<stem>-w<i><suffix>``, one file per worker, as for any
  nodes; with ``store.redis_url`` they share the store and sessions move between them.

Lifetimes: SIGTERM or SIGINT to the supervisor is forwarded (SIGTERM) to every worker, which
drains as a single node does; the supervisor exits once all have stopped (0), killing one
that outlives ``broker.drain_timeout_s`` + :data:`STOP_MARGIN_S`. Workers run in their own
session (a terminal's Ctrl-C reaches only the supervisor) and get SIGTERM if the supervisor
dies. A worker that exits before it is ready on the first start stops the whole group
(exit 1: a port in use, Redis unreachable, nothing a retry fixes). A worker that dies later is
logged at ERROR and restarted after :func:`restart_delay` (the other workers keep serving);
its connections reconnect and land on any worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge.cluster.node import worker_node_id
from bridge.config import BridgeConfig
from bridge.errors import ConfigError

__all__ = [
    "MAX_WORKERS",
    "READY_FD_ENV",
    "STOP_MARGIN_S",
    "Supervisor",
    "WorkerPlan",
    "available_cores",
    "parse_workers",
    "plan_workers",
    "restart_delay",
    "signal_ready",
]

log = logging.getLogger(__name__)

MAX_WORKERS = 256
# The worker writes one byte to this inherited descriptor once its listeners and HTTP are up.
READY_FD_ENV = "BRIDGE_WORKER_READY_FD"
# A worker still running this long after its drain deadline is killed.
STOP_MARGIN_S = 10.0
# A worker that ran this long before dying starts a fresh backoff.
STABLE_S = 60.0
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
_ENV = "MARKET_BRIDGE_"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset), else
    ``os.cpu_count()``."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def parse_workers(text: str, cores: int | None = None) -> int:
    """``--workers``: a count from 1 to :data:`MAX_WORKERS`, or ``auto`` (the available cores)."""
    value = text.strip().lower()
    if value == "auto":
        return min(MAX_WORKERS, cores if cores is not None else available_cores())
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise ConfigError("--workers", f"{text!r} is not a count from 1 to {MAX_WORKERS} or 'auto'")
    return int(value)


@dataclass(frozen=True)
class WorkerPlan:
    """One worker: its index, cluster node id, HTTP port (None: off) and environment overrides."""

    index: int
    node_id: str
    http_port: int | None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"w{self.index}"


def plan_workers(config: BridgeConfig, count: int, *, host: str | None = None) -> list[WorkerPlan]:
    """The workers for ``count`` > 1, or a :class:`ConfigError` naming the field that forbids it.

    Pure: ``host`` (default: this machine's name) only names workers without ``cluster.node_id``.
    """
    if count < 2:
        raise ConfigError("--workers", "a supervisor needs 2 or more workers (1 runs the broker itself)")
    if not config.cluster.enabled:
        raise ConfigError(
            "cluster.enabled",
            f"--workers {count} needs the cluster on (and its Redis): each worker is a cluster node",
        )
    listeners = config.listeners
    ports = []
    for name, listener in (("ws", listeners.ws), ("tcp", listeners.tcp)):
        if not listener.enabled:
            continue
        if listener.port == 0:
            raise ConfigError(
                f"listeners.{name}.port", f"--workers {count} needs a fixed port (port 0 cannot be shared)"
            )
        ports.append(listener.port)
    http_ports: list[int | None] = [None] * count
    if config.http.enabled:
        base = config.http.port
        if base == 0:
            raise ConfigError(
                "http.port", f"--workers {count} needs a fixed port (worker i serves http.port + i)"
            )
        if base + count - 1 > 65535:
            raise ConfigError("http.port", f"{base} + {count - 1} workers runs past port 65535")
        clash = sorted(set(ports) & set(range(base, base + count)))
        if clash:
            raise ConfigError(
                "http.port",
                f"workers serve HTTP on {base}-{base + count - 1}, which includes listener port {clash[0]}",
            )
        http_ports = list(range(base, base + count))
    plans = []
    for index in range(count):
        node_id = worker_node_id(config.cluster.node_id, index, host=host)
        env = {
            f"{_ENV}CLUSTER__NODE_ID": node_id,
            f"{_ENV}LISTENERS__REUSE_PORT": "true",
            f"{_ENV}LOGGING__TAG": node_id,  # N workers share the supervisor's stderr
        }
        if http_ports[index] is not None:
            env[f"{_ENV}HTTP__PORT"] = str(http_ports[index])
        if index > 0 and config.feeds:
            env[f"{_ENV}FEEDS"] = "[]"
        if config.store.redis_url is None:
            path = config.store.path
            env[f"{_ENV}STORE__PATH"] = str(path.with_name(f"{path.stem}-w{index}{path.suffix}"))
        plans.append(WorkerPlan(index, node_id, http_ports[index], env))
    return plans


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after its ``failures``-th death in a row (1, 2, ...)."""
    return float(min(RESTART_MAX_S, RESTART_BASE_S * 2 ** max(0, failures - 1)))


def signal_ready() -> None:
    """In a worker: tell the supervisor that listeners and HTTP are up (no-op when not a worker)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), b"1")
        os.close(int(fd))


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """The worker gets SIGTERM (and drains) if the supervisor dies, even by SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerFailed(Exception):
    """A worker could not start: the group stops."""

    def __init__(self, plan: WorkerPlan, code: int | None) -> None:
        super().__init__(
            f"worker {plan.name} (node {plan.node_id}) exited with code {code} before it was ready"
        )
        self.code = code


class Supervisor:
    """Starts the workers, forwards stop signals, restarts the dead; ``run()`` returns the exit code."""

    def __init__(
        self,
        plans: Sequence[WorkerPlan],
        argv: Sequence[str],
        *,
        stop_timeout_s: float,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.plans = list(plans)
        self.argv = list(argv)
        self.stop_timeout_s = stop_timeout_s
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.stop = asyncio.Event()
        self.restarts = 0
        self._pids: dict[int, int] = {}

    def pids(self) -> dict[int, int]:
        """Worker index -> pid of the live process."""
        return dict(self._pids)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        ready = [asyncio.Event() for _ in self.plans]
        announce = asyncio.create_task(self._announce(ready))
        try:
            results = await asyncio.gather(
                *(self._guarded(plan, ready[plan.index]) for plan in self.plans), return_exceptions=True
            )
        finally:
            announce.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        codes = []
        for result in results:
            if isinstance(result, WorkerFailed):
                codes.append(result.code if result.code in (1, 2) else 1)
            elif isinstance(result, BaseException):
                raise result
        if codes:
            return codes[0]
        log.info("workers: all %d stopped", len(self.plans))
        return 0

    async def _announce(self, ready: list[asyncio.Event]) -> None:
        for event in ready:
            await event.wait()
        listed = ", ".join(f"{p.name} node {p.node_id} pid {self._pids.get(p.index)}" for p in self.plans)
        log.info("workers: %d ready (%s)", len(self.plans), listed)

    async def _start(self, plan: WorkerPlan) -> tuple[asyncio.subprocess.Process, asyncio.Task[bytes]]:
        read_fd, write_fd = os.pipe()
        env = {**self.base_env, **plan.env, READY_FD_ENV: str(write_fd)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(write_fd)
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )

        async def ready() -> bytes:
            try:
                return await reader.read(1)  # b"": the worker exited first
            finally:
                transport.close()

        self._pids[plan.index] = proc.pid
        log.info("worker %s started: pid %d, node %s", plan.name, proc.pid, plan.node_id)
        return proc, asyncio.create_task(ready())

    async def _guarded(self, plan: WorkerPlan, ready: asyncio.Event) -> None:
        try:
            await self._keep(plan, ready)
        except BaseException:
            self.stop.set()  # whatever went wrong, the other workers stop instead of running on
            raise

    async def _keep(self, plan: WorkerPlan, ready: asyncio.Event) -> None:
        failures, first = 0, True
        while not self.stop.is_set():
            started = time.monotonic()
            proc, ready_signal = await self._start(plan)
            exited = asyncio.create_task(proc.wait())
            stopping = asyncio.create_task(self.stop.wait())
            await asyncio.wait({ready_signal, exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if ready_signal.done() and ready_signal.result():
                ready.set()
                log.info("worker %s ready: pid %d, node %s", plan.name, proc.pid, plan.node_id)
            ready_signal.cancel()
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                await self._stop(plan, proc)
                return
            code = proc.returncode
            self._pids.pop(plan.index, None)
            if self.stop.is_set():
                return
            if first and not ready.is_set():
                self.stop.set()  # the others stop too
                failed = WorkerFailed(plan, code)
                log.error("%s; stopping the other workers", failed)
                raise failed
            first = False
            failures = 1 if time.monotonic() - started >= STABLE_S else failures + 1
            delay = restart_delay(failures)
            self.restarts += 1
            log.error(
                "worker %s (pid %d, node %s) died: %s; restarting in %.1f s",
                plan.name,
                proc.pid,
                plan.node_id,
                f"signal {-code}" if code is not None and code < 0 else f"exit code {code}",
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stop.wait()

    async def _stop(self, plan: WorkerPlan, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_timeout_s):
                await proc.wait()
        except TimeoutError:
            log.error(
                "worker %s (pid %d) still running %.0f s after SIGTERM: killed",
                plan.name,
                proc.pid,
                self.stop_timeout_s,
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self._pids.pop(plan.index, None)
        if proc.returncode != 0:
            log.warning("worker %s (pid %d) stopped with exit code %s", plan.name, proc.pid, proc.returncode)


def worker_argv(config_path: Path) -> list[str]:
    """The command each worker runs: this same CLI, one node, the same config file."""
    return [sys.executable, "-m", "bridge.cli", "run", "--config", str(config_path.resolve())]
