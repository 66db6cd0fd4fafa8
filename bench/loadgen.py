"""Multi-process load generator: raw asyncio MQTT clients (WebSocket or TCP) in worker processes.

paho spends tens of microseconds of Python per message and one thread per client; a broker
doing 500k+ deliveries/s needs a generator that costs about a microsecond per delivery. Here
each worker process runs one event loop with many :class:`Client` protocols that feed bytes
to a :class:`~bench.mqttws.Receiver` (see there for the hot path).

Processes and what connects them (:class:`Control`, made by :class:`Fleet`):

- ``go``: every worker connects once it is set; ``publish``: the publisher starts;
  ``stop``: workers report and disconnect.
- ``counts``: shared int64 slots, one per client worker, each holding the PUBLISH packets its
  clients received so far (written per read, no lock: one writer per slot). The publisher
  reads them for flow control, the parent for drain detection.
- ``results``: ``(worker, phase, payload)`` messages: ``ready`` once connected (and
  subscribed), ``done`` at the end, ``error`` with the reason if the worker failed.

Latency: the publisher writes its wall-clock send time (ns) into each tick's ``volume_24h``
(a valid decimal string, so the broker's tick validation passes it); receivers subtract it
from the wall-clock time of the read that carried every ``sample_every``-th message.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import resource
import selectors
import socket
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any, Literal, Self

from bench import mqttws

__all__ = [
    "ClientsSpec",
    "Credentials",
    "Endpoint",
    "Fleet",
    "PublisherSpec",
    "Refused",
    "TickMaker",
    "WorkerFailed",
    "cpu_seconds",
    "open_client",
    "raise_nofile_limit",
    "spread",
]

WS_PATH = "/mqtt"


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (10k sockets need it); returns the new (soft, hard)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard, hard


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    websocket: bool


@dataclass(frozen=True)
class Credentials:
    client_id: str
    username: str | None = None
    password: str | None = None


class Refused(Exception):
    """CONNACK with a non-zero return code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"CONNACK return code {code}")
        self.code = code


class WorkerFailed(Exception):
    """A generator process reported an error or died."""


class Tally:
    """PUBLISH packets received by one worker's clients, mirrored into its shared slot."""

    def __init__(self, counts: Any, slot: int) -> None:
        self.total = 0
        self.reads = 0
        self.first_mono = 0.0
        self.last_mono = 0.0
        self._counts = counts
        self._slot = slot

    def add(self, count: int) -> None:
        self.total += count
        self.last_mono = time.monotonic()
        if not self.first_mono:
            self.first_mono = self.last_mono
        if self._slot >= 0:
            self._counts[self._slot] = self.total


# One receive buffer per process, shared by every connection: reads are copied out at once,
# and asyncio's own recv() allocates a fresh 256 KiB buffer per read (an mmap each time).
_READ_BUFFER = bytearray(256 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)


class Client(asyncio.BufferedProtocol):
    """One MQTT connection: bytes in go through a Receiver, bytes out are framed if WebSocket."""

    def __init__(self, receiver: mqttws.Receiver, tally: Tally | None) -> None:
        self.rx = receiver
        self.lost = False
        self.error: Exception | None = None
        self._tally = tally
        self._transport: asyncio.Transport | None = None
        self._head: bytearray | None = None  # HTTP response head while the handshake runs
        self._accept = b""
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_VIEW[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                self._wake()
                return
            head, data = bytes(self._head[:end]), bytes(self._head[end + 4 :])
            self._head = None
            try:
                mqttws.check_handshake(head, self._accept)
            except mqttws.HandshakeError as exc:
                self._fail(exc)
                return
            if not data:
                self._wake()
                return
        rx = self.rx
        if self._tally is not None:
            self._tally.reads += 1
        before = rx.publishes
        try:
            rx.feed(data, time.time_ns())
        except mqttws.ProtocolError as exc:
            self._fail(exc)
            return
        if rx.acks:
            self.send(bytes(rx.acks))
            rx.acks.clear()
        if rx.control:
            assert self._transport is not None
            for frame in rx.control:
                self._transport.write(frame)
            rx.control.clear()
        if self._tally is not None and rx.publishes != before:
            self._tally.add(rx.publishes - before)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = exc or ConnectionResetError("connection closed by the server")
        for future in (self._waiter, self._drained):
            if future is not None and not future.done():
                future.set_exception(error)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- use

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    def send(self, packets: bytes) -> None:
        """Write MQTT bytes (one WebSocket frame for all of them on a WebSocket connection)."""
        if self.lost or self.transport.is_closing():
            return
        self.transport.write(mqttws.masked_frame(packets) if self.rx.websocket else packets)

    async def drained(self) -> None:
        if self._drained is not None:
            await self._drained

    async def until(self, ready: Callable[[], bool], limit_s: float) -> None:
        """Wait until ``ready()`` holds, checked after every read; TimeoutError after ``limit_s``."""
        async with asyncio.timeout(limit_s):
            while not ready():
                if self.lost:
                    raise ConnectionResetError("connection closed by the server")
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter

    async def handshake(self, endpoint: Endpoint, limit_s: float) -> None:
        request, self._accept = mqttws.handshake_request(endpoint.host, endpoint.port, WS_PATH)
        self._head = bytearray()
        self.transport.write(request)
        await self.until(lambda: self._head is None, limit_s)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.send(mqttws.DISCONNECT)
            self._transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.transport.abort()


async def open_client(
    endpoint: Endpoint,
    credentials: Credentials,
    *,
    tally: Tally | None = None,
    keepalive: int = 60,
    limit_s: float = 20.0,
    rcvbuf: int | None = None,
    sample_every: int = 16,
) -> Client:
    """Connect, (WebSocket handshake,) CONNECT and wait for CONNACK; raise Refused if refused."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client: Client | None = None
    try:
        if rcvbuf is not None:
            # Before connect(): the window scale is fixed by the SYN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        async with asyncio.timeout(limit_s):
            await loop.sock_connect(sock, (endpoint.host, endpoint.port))
        receiver = mqttws.Receiver(websocket=endpoint.websocket, sample_every=sample_every)
        _, client = await loop.create_connection(lambda: Client(receiver, tally), sock=sock)
        if endpoint.websocket:
            await client.handshake(endpoint, limit_s)
        client.send(
            mqttws.connect(
                credentials.client_id, credentials.username, credentials.password, keepalive=keepalive
            )
        )
        await client.until(lambda: receiver.connack is not None, limit_s)
        if receiver.connack:
            raise Refused(receiver.connack)
        return client
    except BaseException:
        if client is not None:
            client.transport.abort()
        else:
            sock.close()
        raise


# --- ticks ---------------------------------------------------------------------------------


class TickMaker:
    """Valid ~200-byte ticks (bridge/core/tick.py) as PUBLISH packets, the send time in ``volume_24h``."""

    _TEMPLATE = (
        b'{"exchange":"%s","pair":"%s","bid":"1712345.12","ask":"1712987.55","last":"%d",'
        b'"volume_24h":"%d","ts":"%s","seq":%d}'
    )

    def __init__(self, topics: Sequence[str]) -> None:
        self._topics: list[tuple[bytes, bytes, bytes]] = []
        for topic in topics:
            _, exchange, pair = topic.split("/")
            self._topics.append((topic.encode(), exchange.encode(), pair.encode()))
        self._seq = [0] * len(topics)
        self._next = 0

    def packets(self, count: int, *, qos: int, retain: bool, packet_id: int) -> tuple[bytes, int]:
        """``count`` PUBLISH packets round-robin over the topics; returns them and the next packet id.

        One timestamp per call: the packets leave in one write, so they share a send time.
        """
        now_ns = time.time_ns()
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()
        out: list[bytes] = []
        topics, seqs = self._topics, self._seq
        for _ in range(count):
            index = self._next
            self._next = (index + 1) % len(topics)
            topic, exchange, pair = topics[index]
            seqs[index] += 1
            seq = seqs[index]
            payload = self._TEMPLATE % (exchange, pair, 1712600 + seq % 100, now_ns, ts, seq)
            out.append(mqttws.publish(topic, payload, qos=qos, packet_id=packet_id, retain=retain))
            if qos:
                packet_id = packet_id % 65535 + 1
        return b"".join(out), packet_id


# --- worker processes ----------------------------------------------------------------------


@dataclass
class Control:
    """What the parent and its workers share; made by :class:`Fleet`."""

    go: Event
    publish: Event
    stop: Event
    results: Queue[tuple[str, str, dict[str, Any]]]
    counts: Any  # multiprocessing RawArray("q", slots)


@dataclass(frozen=True)
class ClientsSpec:
    """A worker process holding many client connections.

    ``subscribe``: (filter, QoS) to subscribe each client to, or None for idle connections.
    ``stall``: stop reading once subscribed (a frozen phone). ``slot``: shared count slot,
    -1 for clients whose deliveries must not count (the staller). ``connect_timeout``: per
    connection; ``connect_phase_s``: for all of them (a broker out of file descriptors
    leaves handshakes unanswered: the rest are given up and counted, not waited for).
    """

    name: str
    endpoint: Endpoint
    credentials: tuple[Credentials, ...]
    slot: int
    subscribe: tuple[str, int] | None = None
    stall: bool = False
    rcvbuf: int | None = None
    concurrency: int = 50
    keepalive: int = 60
    sample_every: int = 16
    connect_timeout: float = 30.0
    connect_phase_s: float = 120.0
    read_quantum_s: float = 0.001


@dataclass(frozen=True)
class PublisherSpec:
    """The publisher process.

    Paced when ``rate`` (messages/s) is set; otherwise saturated with flow control: at most
    ``window`` messages per counted subscriber published but not yet received (the counts of
    ``slots``, ``subscribers`` clients in all), so the run measures the rate a broker sustains
    instead of filling its queues. If the counts stop moving for ``stall_s`` while the
    window is full (a QoS 0 broker dropped messages), the missing deliveries are written off
    and publishing goes on. Stops at ``duration_s`` or ``max_messages``, whichever first.
    """

    name: str
    endpoint: Endpoint
    credentials: Credentials
    topics: tuple[str, ...]
    qos: int = 0
    retain: bool = False
    rate: float | None = None
    duration_s: float | None = None
    max_messages: int | None = None
    window: int = 500
    batch: int = 50
    slots: tuple[int, ...] = ()
    subscribers: int = 0
    stall_s: float = 1.0
    keepalive: int = 60
    ack_timeout_s: float = 15.0


def _clients_main(spec: ClientsSpec, control: Control) -> None:
    _worker_main(spec.name, control, _run_clients(spec, control), spec.read_quantum_s)


def _publisher_main(spec: PublisherSpec, control: Control) -> None:
    _worker_main(spec.name, control, _run_publisher(spec, control))


class BatchingSelector(selectors.EpollSelector):
    """Waits up to ``quantum`` before each blocking poll so reads find many messages each.

    Woken per message, a worker spends more on epoll, recv and context switches than on
    the messages, and its wake-ups steal the broker's CPU on a small machine. Pausing a
    millisecond between polls makes each read carry what arrived meanwhile; latency
    samples gain at most ``quantum`` (the first message after a quiet spell none).
    """

    def __init__(self, quantum: float) -> None:
        super().__init__()
        self._quantum = quantum

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout > 0:
            pause = self._quantum if timeout is None else min(self._quantum, timeout)
            time.sleep(pause)
            if timeout is not None:
                timeout -= pause
        return super().select(timeout)


def _worker_main(name: str, control: Control, work: Any, quantum: float = 0.0) -> None:
    raise_nofile_limit()
    try:
        factory = (lambda: asyncio.SelectorEventLoop(BatchingSelector(quantum))) if quantum > 0 else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(work)
    except BaseException as exc:
        control.results.put(
            (name, "error", {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        )
        raise


async def _wait_event(event: Event, control: Control, limit_s: float) -> bool:
    """Poll a process-shared event from the loop (it has no awaitable form); False if stopped first."""
    deadline = time.monotonic() + limit_s
    while not event.is_set():
        if control.stop.is_set() or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _run_clients(spec: ClientsSpec, control: Control) -> None:
    if not await _wait_event(control.go, control, 120):
        return
    tally = Tally(control.counts, spec.slot)
    gate = asyncio.Semaphore(spec.concurrency)
    clients: list[Client] = []
    refused: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    not_granted = 0
    started = time.monotonic()

    async def one(credentials: Credentials) -> None:
        nonlocal not_granted
        async with gate:
            try:
                client = await open_client(
                    spec.endpoint,
                    credentials,
                    tally=tally,
                    keepalive=spec.keepalive,
                    limit_s=spec.connect_timeout,
                    rcvbuf=spec.rcvbuf,
                    sample_every=spec.sample_every,
                )
            except Refused as exc:
                refused[exc.code] += 1
                return
            except (OSError, TimeoutError, mqttws.ProtocolError) as exc:
                errors[type(exc).__name__] += 1
                return
            clients.append(client)
            if spec.subscribe is None:
                return
            topic_filter, qos = spec.subscribe
            client.send(mqttws.subscribe(1, topic_filter, qos))
            try:
                await client.until(lambda: bool(client.rx.subacks), spec.connect_timeout)
            except (OSError, TimeoutError) as exc:
                errors[f"suback: {type(exc).__name__}"] += 1
                return
            if client.rx.subacks[0][:1] == b"\x80":
                not_granted += 1
            if spec.stall:
                client.transport.pause_reading()

    # Pings from the start: a slow connect phase must not let the first clients' keep-alive lapse.
    pinger = asyncio.create_task(_ping(clients, spec.keepalive))
    attempts = [asyncio.create_task(one(c)) for c in spec.credentials]
    _done, unfinished = await asyncio.wait(attempts, timeout=spec.connect_phase_s)
    for attempt in unfinished:
        attempt.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    if unfinished:
        errors["given up at the connect phase deadline"] += len(unfinished)
    connected_s = time.monotonic() - started
    control.results.put(
        (
            spec.name,
            "ready",
            {
                "connected": len(clients),
                "refused": dict(refused),
                "errors": dict(errors),
                "not_granted": not_granted,
                "connect_s": connected_s,
            },
        )
    )
    while not control.stop.is_set():  # noqa: ASYNC110 (a process-shared Event cannot be awaited)
        await asyncio.sleep(0.02)
    pinger.cancel()
    samples = array("q")
    for client in clients:
        samples.extend(client.rx.samples)
    per_client = [c.rx.publishes for c in clients]
    control.results.put(
        (
            spec.name,
            "done",
            {
                "received": tally.total,
                "reads": tally.reads,
                "per_client_min": min(per_client, default=0),
                "per_client_max": max(per_client, default=0),
                "open": sum(1 for c in clients if not c.lost),
                "client_errors": sorted({f"{type(c.error).__name__}: {c.error}" for c in clients if c.error}),
                "first_mono": tally.first_mono,
                "last_mono": tally.last_mono,
                "samples": samples.tobytes(),
            },
        )
    )
    for client in clients:
        client.close()
    await asyncio.sleep(0.1)  # let the DISCONNECTs leave before the loop closes the sockets


async def _ping(clients: list[Client], keepalive: int) -> None:
    while True:
        await asyncio.sleep(keepalive / 2)
        for client in clients:
            client.send(mqttws.PINGREQ)


async def _run_publisher(spec: PublisherSpec, control: Control) -> None:
    if not await _wait_event(control.go, control, 120):
        return
    client = await open_client(spec.endpoint, spec.credentials, keepalive=spec.keepalive)
    control.results.put((spec.name, "ready", {}))
    if not await _wait_event(control.publish, control, 300):
        client.close()
        return
    maker = TickMaker(spec.topics)
    counts = control.counts
    slots = spec.slots
    limit = spec.max_messages if spec.max_messages is not None else 2**62
    published = 0
    packet_id = 1
    written_off = 0
    stalls = 0
    last_seen = -1
    last_progress = time.monotonic()
    start = time.monotonic()
    deadline = start + spec.duration_s if spec.duration_s is not None else float("inf")
    pinged = start
    while published < limit and not control.stop.is_set():
        now = time.monotonic()
        if now >= deadline:
            break
        if now - pinged > spec.keepalive / 2:
            client.send(mqttws.PINGREQ)
            pinged = now
        if spec.rate is not None:
            due = min(int((now - start) * spec.rate) + 1, limit) - published
            if due <= 0:
                await asyncio.sleep(max(0.0, start + published / spec.rate - now))
                continue
            count = due
        else:
            received = sum(counts[s] for s in slots)
            outstanding = published * spec.subscribers - received - written_off
            if outstanding > spec.window * spec.subscribers:
                if received != last_seen:
                    last_seen, last_progress = received, now
                elif now - last_progress > spec.stall_s:
                    written_off += outstanding
                    stalls += 1
                    last_progress = now
                await asyncio.sleep(0.0005)
                continue
            if spec.qos and published - client.rx.pubacks > 30000:
                await asyncio.sleep(0.001)  # packet ids must not wrap onto unacknowledged ones
                continue
            count = min(spec.batch, limit - published)
        data, packet_id = maker.packets(count, qos=spec.qos, retain=spec.retain, packet_id=packet_id)
        client.send(data)
        published += count
        try:
            # A broker that stops reading must not hold the publisher past its deadline.
            async with asyncio.timeout(
                None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
            ):
                await client.drained()
        except TimeoutError:
            break
        if spec.rate is None:
            await asyncio.sleep(0)  # let PUBACKs in
    publish_end = time.monotonic()
    if spec.qos:
        with contextlib.suppress(TimeoutError):
            await client.until(lambda: client.rx.pubacks >= published, spec.ack_timeout_s)
    control.results.put(
        (
            spec.name,
            "done",
            {
                "published": published,
                "pubacks": client.rx.pubacks,
                "start_mono": start,
                "end_mono": publish_end,
                "written_off": written_off,
                "stalls": stalls,
            },
        )
    )
    client.close()
    await asyncio.sleep(0.1)


# --- the parent's side ---------------------------------------------------------------------


@dataclass
class Fleet:
    """Starts, watches and always stops a set of generator processes (use as a context manager)."""

    slots: int
    _ctx: Any = field(default_factory=lambda: mp.get_context("spawn"))
    control: Control = field(init=False)
    processes: dict[str, SpawnProcess] = field(init=False, default_factory=dict)
    # Results that arrived while waiting for other workers: kept for their own collect().
    _inbox: dict[tuple[str, str], dict[str, Any]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        ctx = self._ctx
        self.control = Control(
            go=ctx.Event(),
            publish=ctx.Event(),
            stop=ctx.Event(),
            results=ctx.Queue(),
            counts=ctx.RawArray("q", max(self.slots, 1)),
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def add(self, spec: ClientsSpec | PublisherSpec) -> None:
        target = _clients_main if isinstance(spec, ClientsSpec) else _publisher_main
        process = self._ctx.Process(target=target, args=(spec, self.control), name=spec.name, daemon=True)
        process.start()
        self.processes[spec.name] = process

    def pids(self, names: Sequence[str] | None = None) -> list[int]:
        chosen = names if names is not None else list(self.processes)
        return [p.pid for name, p in self.processes.items() if name in chosen and p.pid is not None]

    def received(self, slots: Sequence[int]) -> int:
        return sum(int(self.control.counts[s]) for s in slots)

    def collect(
        self, phase: Literal["ready", "done"], names: Sequence[str], timeout: float
    ) -> dict[str, dict[str, Any]]:
        """Wait for ``phase`` from each named worker; raise WorkerFailed on an error, a death or the deadline."""
        got = {name: self._inbox.pop((name, phase)) for name in names if (name, phase) in self._inbox}
        deadline = time.monotonic() + timeout
        while len(got) < len(names):
            try:
                name, kind, payload = self.control.results.get(timeout=0.2)
            except queue.Empty:
                for name in names:
                    process = self.processes[name]
                    if name not in got and process.exitcode is not None:
                        raise WorkerFailed(
                            f"{name} exited with code {process.exitcode} before {phase!r}"
                        ) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(names) - set(got))
                    raise WorkerFailed(
                        f"no {phase!r} from {', '.join(missing)} within {timeout:.0f}s"
                    ) from None
                continue
            if kind == "error":
                raise WorkerFailed(f"{name}: {payload['error']}\n{payload.get('trace', '')}")
            if kind == phase and name in names:
                got[name] = payload
            else:
                self._inbox[(name, kind)] = payload
        return got

    def close(self) -> None:
        self.control.stop.set()
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        # Drop undelivered results so the queue's feeder thread never blocks our exit.
        self.control.results.cancel_join_thread()
        with contextlib.suppress(Exception):
            while True:
                self.control.results.get_nowait()
        self.control.results.close()


def spread(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Deal ``items`` into ``parts`` lists as evenly as possible (round-robin keeps zones mixed)."""
    return [list(items[index::parts]) for index in range(parts)]


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds per pid, from /proc (a gone process counts 0)."""
    import psutil  # noqa: PLC0415 (workers never need psutil; keep their import light)

    out: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            out[pid] = 0.0
        else:
            out[pid] = times.user + times.system
    return out
