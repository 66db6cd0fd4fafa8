"""The bench scenarios: each takes a running broker, drives it with the load generator, returns one JSON-able dict.

Every scenario ends with its generator processes stopped (``Fleet`` is a context manager)
and bounded by deadlines; the caller owns the broker. Counts:

- ``deliveries``: PUBLISH packets the subscribers received; ``expected``: published x
  subscribers (everyone subscribes ``market/#``); ``loss``: 1 - deliveries / expected after
  the drain (no progress for ``DRAIN_IDLE_S`` or ``drain_s`` in all).
- ``deliveries_per_s``: deliveries / (last delivery - first publish).
- CPU: ``broker_cpu_us_per_delivery`` and ``*_cores`` (CPU seconds / wall seconds) over the
  same window, for the broker and for the sum of the generator processes, so a reader can
  tell which side was the bottleneck (2 cores in all here).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psutil

from bench import mqttws
from bench.brokers import RunningBroker
from bench.loadgen import ClientsSpec, Fleet, PublisherSpec, TickMaker, cpu_seconds, open_client, spread

__all__ = ["FanoutOptions", "ScenarioError", "fanout", "idle", "publish_retained", "retained_snapshot"]

TOPICS = tuple(
    f"market/luno/{base}-ZAR" for base in ("BTC", "ETH", "SOL", "XRP", "USDT", "USDC", "ADA", "DOT")
)
DRAIN_IDLE_S = 2.0


class ScenarioError(Exception):
    """The scenario could not be measured (e.g. subscribers could not connect)."""


@dataclass(frozen=True)
class FanoutOptions:
    subscribers: int = 50
    workers: int = 2
    qos: int = 0
    duration_s: float | None = 8.0
    rate: float | None = None
    max_messages: int | None = None
    window: int = 500
    batch: int = 50
    drain_s: float = 30.0
    staller: bool = False
    stall_rcvbuf: int = 4096
    transport: Literal["ws", "tcp"] = "ws"
    sample_every: int = 16
    read_quantum_s: float = 0.001


class RssSampler(threading.Thread):
    """The broker's RSS every 100 ms, for the peak."""

    def __init__(self, broker: RunningBroker) -> None:
        super().__init__(daemon=True)
        self._broker = broker
        self._stop_flag = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self._stop_flag.wait(0.1):
            try:
                self.peak = max(self.peak, self._broker.rss())
            except Exception:  # the broker died: the scenario reports that
                return

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(2)


def _percentiles(samples: array[int]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "latency_samples": 0}
    ordered = sorted(samples)
    at = min(len(ordered) - 1, int(len(ordered) * 0.99))
    return {
        "p50_ms": round(statistics.median(ordered) / 1e6, 2),
        "p99_ms": round(ordered[at] / 1e6, 2),
        "max_ms": round(ordered[-1] / 1e6, 2),
        "latency_samples": len(ordered),
    }


def _check_ready(ready: dict[str, dict[str, Any]], wanted: int) -> None:
    connected = sum(r["connected"] for r in ready.values())
    not_granted = sum(r.get("not_granted", 0) for r in ready.values())
    if connected < wanted or not_granted:
        refused: Counter[Any] = Counter()
        errors: Counter[str] = Counter()
        for r in ready.values():
            refused.update(r["refused"])
            errors.update(r["errors"])
        raise ScenarioError(
            f"{connected}/{wanted} subscribers connected, {not_granted} subscriptions refused; "
            f"refused CONNACK codes {dict(refused)}, errors {dict(errors)}"
        )


def fanout(broker: RunningBroker, options: FanoutOptions) -> dict[str, Any]:
    """1 TCP publisher, N WebSocket subscribers on ``market/#`` (saturated, paced or with a staller)."""
    opts = options
    slots = tuple(range(opts.workers))
    credentials = broker.subscribers("sub", opts.subscribers)
    with Fleet(slots=opts.workers + 1) as fleet:
        names = []
        for slot, group in zip(slots, spread(credentials, opts.workers), strict=True):
            name = f"subscribers-{slot}"
            fleet.add(
                ClientsSpec(
                    name=name,
                    endpoint=broker.ws if opts.transport == "ws" else broker.tcp,
                    credentials=tuple(group),
                    slot=slot,
                    subscribe=("market/#", opts.qos),
                    sample_every=opts.sample_every,
                    read_quantum_s=opts.read_quantum_s,
                )
            )
            names.append(name)
        if opts.staller:
            fleet.add(
                ClientsSpec(
                    name="staller",
                    endpoint=broker.ws,
                    credentials=tuple(broker.subscribers("staller", 1)),
                    slot=-1,
                    subscribe=("market/#", opts.qos),
                    stall=True,
                    rcvbuf=opts.stall_rcvbuf,
                )
            )
        fleet.add(
            PublisherSpec(
                name="publisher",
                endpoint=broker.tcp,
                credentials=broker.feed(),
                topics=TOPICS,
                qos=opts.qos,
                rate=opts.rate,
                duration_s=opts.duration_s,
                max_messages=opts.max_messages,
                window=opts.window,
                batch=opts.batch,
                slots=slots,
                subscribers=opts.subscribers,
            )
        )
        fleet.control.go.set()
        everyone = [*names, "publisher"] + (["staller"] if opts.staller else [])
        ready = fleet.collect("ready", everyone, timeout=60 + opts.subscribers / 10)
        _check_ready({n: ready[n] for n in names}, opts.subscribers)
        if opts.staller:
            _check_ready({"staller": ready["staller"]}, 1)

        pids = fleet.pids()
        gen_cpu0, broker_cpu0, rss0 = cpu_seconds(pids), broker.cpu_s(), broker.rss()
        machine0 = _machine_busy_s()
        sampler = RssSampler(broker)
        sampler.start()
        wall0 = time.monotonic()
        fleet.control.publish.set()
        publish_timeout = (opts.duration_s or 600) + 60
        published = fleet.collect("done", ["publisher"], timeout=publish_timeout)["publisher"]
        rss_published = broker.rss()
        expected = published["published"] * opts.subscribers
        _drain(fleet, slots, expected, opts.drain_s)
        gen_cpu1, broker_cpu1 = cpu_seconds(pids), broker.cpu_s()
        machine = _machine_busy_s() - machine0
        wall = time.monotonic() - wall0
        sampler.stop()
        fleet.control.stop.set()
        done = fleet.collect("done", names, timeout=60)
        staller = fleet.collect("done", ["staller"], timeout=30)["staller"] if opts.staller else None

    received = sum(d["received"] for d in done.values())
    last = max(d["last_mono"] for d in done.values())
    span = last - published["start_mono"] if received else 0.0
    samples: array[int] = array("q")
    for d in done.values():
        samples.frombytes(d["samples"])
    gen_cpu = sum(gen_cpu1[p] - gen_cpu0.get(p, 0.0) for p in gen_cpu1)
    publisher_pid = fleet.pids(["publisher"])[0]
    broker_cpu = broker_cpu1 - broker_cpu0
    result: dict[str, Any] = {
        "broker": broker.kind,
        "auth": broker.auth is not None,
        "transport": opts.transport,
        "qos": opts.qos,
        "subscribers": opts.subscribers,
        "subscriber_processes": opts.workers,
        "published": published["published"],
        "publish_s": round(published["end_mono"] - published["start_mono"], 2),
        "expected": expected,
        "deliveries": received,
        "loss": round(1 - received / expected, 5) if expected else None,
        "deliveries_per_s": round(received / span) if span > 0 else None,
        **_percentiles(samples),
        "deliveries_per_read": round(received / max(1, sum(d["reads"] for d in done.values())), 1),
        "per_subscriber_min": min(d["per_client_min"] for d in done.values()),
        "per_subscriber_max": max(d["per_client_max"] for d in done.values()),
        "broker_cpu_us_per_delivery": round(broker_cpu / received * 1e6, 2) if received else None,
        "broker_cpu_cores": round(broker_cpu / wall, 2),
        "generator_cpu_s": round(gen_cpu, 2),
        "generator_cpu_cores": round(gen_cpu / wall, 2),
        "publisher_cpu_s": round(gen_cpu1[publisher_pid] - gen_cpu0.get(publisher_pid, 0.0), 2),
        # Everything else on the machine (this process, other users' jobs): high means noisy numbers.
        "other_cpu_cores": round(max(0.0, machine - broker_cpu - gen_cpu) / wall, 2),
        "wall_s": round(wall, 2),
        "broker_rss_mb_start": round(rss0 / 2**20, 1),
        "broker_rss_growth_mb": round((rss_published - rss0) / 2**20, 1),
        "broker_rss_peak_growth_mb": round((max(sampler.peak, rss_published) - rss0) / 2**20, 1),
    }
    if lost := opts.subscribers - sum(d["open"] for d in done.values()):
        result["subscribers_disconnected"] = lost
    if errors := sorted({e for d in done.values() for e in d["client_errors"]}):
        result["client_errors"] = errors[:5]
    if opts.qos:
        result["publisher_pubacks"] = published["pubacks"]
    if opts.rate is not None:
        result["rate_target_per_s"] = opts.rate
    else:
        result |= {
            "window_per_subscriber": opts.window,
            "batch": opts.batch,
            "window_stalls": published["stalls"],
        }
    if staller is not None:
        result["staller_received"] = staller["received"]
        result["staller_connected"] = bool(staller["open"])
    return result


def _machine_busy_s() -> float:
    """CPU seconds spent by the whole machine (all cores) outside idle and I/O wait."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _drain(fleet: Fleet, slots: Sequence[int], expected: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        received = fleet.received(slots)
        if received >= expected:
            return
        if received != last:
            last, last_change = received, time.monotonic()
        elif time.monotonic() - last_change > DRAIN_IDLE_S:
            return
        time.sleep(0.02)


def idle(
    broker: RunningBroker, connections: int, *, workers: int, settle_s: float = 2.0, hold_s: float = 3.0
) -> dict[str, Any]:
    """Hold ``connections`` idle WebSocket MQTT connections; broker RSS delta per connection."""
    credentials = broker.subscribers("idle", connections)
    time.sleep(1.0)  # let the fresh broker finish its start-up allocations
    rss0 = broker.rss()
    result: dict[str, Any] = {
        "broker": broker.kind,
        "auth": broker.auth is not None,
        "connections": connections,
        "generator_processes": workers,
        "broker_nofile_limit": broker.nofile_limit(),
    }
    phase_s = 60 + connections / 100
    with Fleet(slots=0) as fleet:
        names = []
        for index, group in enumerate(spread(credentials, workers)):
            name = f"idle-{index}"
            fleet.add(
                ClientsSpec(
                    name=name,
                    endpoint=broker.ws,
                    credentials=tuple(group),
                    slot=-1,
                    concurrency=50,
                    connect_timeout=10.0,
                    connect_phase_s=phase_s,
                )
            )
            names.append(name)
        fleet.control.go.set()
        ready = fleet.collect("ready", names, timeout=phase_s + 60)
        connected = sum(r["connected"] for r in ready.values())
        connect_s = max(r["connect_s"] for r in ready.values())
        refused: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for r in ready.values():
            refused.update({str(code): n for code, n in r["refused"].items()})
            errors.update(r["errors"])
        time.sleep(settle_s)
        alive = broker.alive()
        rss1 = broker.rss() if alive else 0
        time.sleep(hold_s)
        fleet.control.stop.set()
        done = fleet.collect("done", names, timeout=60)
    held = sum(d["open"] for d in done.values())
    result |= {
        "connected": connected,
        "held": held,
        "all_held": held == connections,
        "closed_after_connack": connected - held,
        "connect_s": round(connect_s, 2),
        "connects_per_s": round(connected / connect_s) if connect_s > 0 else None,
        "refused_connack_codes": dict(refused),
        "errors": dict(errors),
        "broker_alive": broker.alive(),
        "broker_rss_mb_before": round(rss0 / 2**20, 1),
        "broker_rss_mb_after": round(rss1 / 2**20, 1) if alive else None,
        "bytes_per_connection": round((rss1 - rss0) / connected) if alive and connected else None,
    }
    if held < connections:
        # The usual cause: the broker ran out of file descriptors (see broker_nofile_limit).
        result["broker_log_emfile_lines"] = broker.log_lines_with("Too many open files")
    if not alive:
        result["broker_exit_code"] = broker.process.returncode
        result["broker_log_tail"] = broker.log_tail(5)
    return result


def retained_snapshot(broker: RunningBroker, topics: int = 500) -> dict[str, Any]:
    """Time from SUBSCRIBE ``market/#`` to the last of ``topics`` retained snapshots."""
    return asyncio.run(_retained(broker, topics))


async def publish_retained(broker: RunningBroker, count: int) -> None:
    """``count`` retained snapshots on ``market/luno/T<i>-ZAR``, acknowledged, then a settle."""
    # Pair names must pass feeds/pairs.py: BASE and QUOTE are 2-10 of [A-Z0-9].
    names = [f"market/luno/T{i}-ZAR" for i in range(count)]
    publisher = await open_client(broker.tcp, broker.feed())
    try:
        data, _ = TickMaker(names).packets(count, qos=1, retain=True, packet_id=1)
        publisher.send(data)
        await publisher.until(lambda: publisher.rx.pubacks >= count, 60)
    finally:
        publisher.close()
    await asyncio.sleep(1.0)  # acknowledged is not necessarily retained yet: let the broker settle


async def _retained(broker: RunningBroker, count: int) -> dict[str, Any]:
    await publish_retained(broker, count)
    # Cold: the first subscriber in its zone (every snapshot localised and encoded for it);
    # warm: a second one in the same zone, as most of a busy broker's subscribers are.
    suback_ms, all_ms, received = await _snapshot_once(broker, "snapshot", count)
    _, warm_ms, warm_received = await _snapshot_once(broker, "snapshot-warm", count)
    return {
        "broker": broker.kind,
        "auth": broker.auth is not None,
        "topics": count,
        "received": received,
        "suback_ms": suback_ms,
        "subscribe_to_last_snapshot_ms": all_ms,
        "warm_received": warm_received,
        "warm_subscribe_to_last_snapshot_ms": warm_ms,
    }


async def _snapshot_once(broker: RunningBroker, name: str, count: int) -> tuple[float, float | None, int]:
    credentials = broker.subscribers(name, 1)[0]
    subscriber = await open_client(broker.ws, credentials, sample_every=1)
    try:
        start = time.perf_counter()
        subscriber.send(mqttws.subscribe(1, "market/#", 0))
        await subscriber.until(lambda: bool(subscriber.rx.subacks), 30)
        suback_ms = (time.perf_counter() - start) * 1000
        timed_out = False
        try:
            await subscriber.until(lambda: subscriber.rx.publishes >= count, 60)
        except TimeoutError:
            timed_out = True
        all_ms = (time.perf_counter() - start) * 1000
        await asyncio.sleep(0.5)  # anything beyond ``count`` would be a duplicate
        received = subscriber.rx.publishes
    finally:
        subscriber.close()
    return round(suback_ms, 2), None if timed_out else round(all_ms, 2), received
