"""``make bench``: the whole scenario matrix, one JSON line per scenario on stdout.

    python -m bench.run                      # everything (7-8 min on 2 cores)
    python -m bench.run --quick              # short runs, 1,000 idle connections only
    python -m bench.run --scenarios qos0,paced --brokers market-bridge

Scenarios (``--scenarios``; brokers in brackets run them when selected and available):

- ``ceiling`` [reference]: ``qos0`` against bench/reference_broker.py, which costs next to
  nothing per delivery: the most the load generator itself takes in on this machine.
- ``qos0`` / ``qos1`` [market-bridge, amqtt, mosquitto]: saturated fan-out, 1 TCP publisher,
  ``--subscribers`` WebSocket subscribers on ``market/#`` (QoS 1: publish and subscribe).
- ``paced`` [market-bridge, reference, mosquitto]: latency at a fixed 50 deliveries/s per
  subscriber (the reference server shows the generator's own latency floor).
- ``phone`` [market-bridge, mosquitto]: phone-like fan-out, many subscribers each getting few
  ticks: 2,000 WebSocket subscribers on ``market/#``, 150 ticks/s spread over the topics
  (300k deliveries/s); broker CPU per delivery, loss, p50/p99. market-bridge runs twice, with
  its default ``broker.flush_interval_ms`` and with 0 (a write every loop step), so the line
  shows the latency coalescing costs against the CPU it saves.
- ``idle`` [all; 10,000 on amqtt is skipped, it takes minutes]: idle WebSocket connections, bytes each.
- ``retained`` [market-bridge]: SUBSCRIBE to the last of 500 retained snapshots.
- ``stalled`` [market-bridge]: one subscriber stops reading; healthy ones vs a run without it.
- ``connect`` [market-bridge]: connect rate with HS256 and RS256 tokens (bench/connect.py).
- ``storm`` [market-bridge]: WebSocket connect storm, each client with its own token
  subscribing ``market/#`` with 100 retained snapshots, then the same clients reconnecting
  (bench/connect.py ``storm``; 10,000 clients, quick 1,000).
- ``offline`` [market-bridge, mosquitto]: a 10,000-message backlog stored and replayed
  (bench/offline.py) on SQLite, on Redis with AOF ``everysec`` and ``always``, and on
  Mosquitto with persistence on when installed.
- ``drain`` [market-bridge]: 1,000 users x 100 queued messages reconnecting together while
  ticks fan out live (bench/mailbox_drain.py; quick: 200 x 50).
- ``workers`` [market-bridge]: ``run --workers 1`` vs ``--workers 2`` (cluster on, one Redis):
  WebSocket admission with HS256 tokens (3,000 connections x 2 rounds; quick 1,000 x 1) and
  fan-out, then ``workers_summary`` with the ratios (bench/workers.py).
- ``cluster`` [market-bridge, when redis-server is installed]: a local Redis Cluster and
  broker processes with ``cluster.enabled`` (bench/cluster_nodes.py): ``cluster_fanout`` (feed
  on node 1, 50 WebSocket subscribers over nodes 1 and 2: per-node latency and CPU per
  delivery, Redis operations per tick) and ``node_death`` (kill -9 of a node holding 1,000
  clients, quick 200: time to all reconnected to the others, leases freed).

Then one ``ratio`` line per other broker (ours / theirs; > 1 means more of it for us) and a
``summary`` line (wall time, failed scenarios). A scenario that fails prints its error as
its line and the run goes on; the exit code is 1 if any failed. Every broker and generator
process a scenario starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from bench import cluster_nodes, connect, mailbox_drain, offline
from bench import workers as workers_bench
from bench.brokers import BrokerKind, RunningBroker, mosquitto_available, running
from bench.loadgen import raise_nofile_limit
from bench.scenarios import FanoutOptions, fanout, idle, retained_snapshot

SCENARIOS = (
    "ceiling",
    "qos0",
    "qos1",
    "paced",
    "phone",
    "idle",
    "retained",
    "stalled",
    "connect",
    "storm",
    "offline",
    "drain",
    "workers",
    "cluster",
)
BROKERS: tuple[BrokerKind, ...] = ("market-bridge", "amqtt", "mosquitto")


class Report:
    """Prints each result as one JSON line as soon as it is known; remembers them for the ratios."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.failed: list[str] = []

    def emit(self, scenario: str, result: dict[str, Any]) -> None:
        line = {"scenario": scenario, **result}
        if "error" in result:
            self.failed.append(f"{scenario}/{result.get('broker', '')}")
        else:
            self.results[(scenario, str(result.get("broker", "")))] = line
        print(json.dumps(line), flush=True)

    def run(
        self,
        scenario: str,
        kind: BrokerKind,
        measure: Callable[[RunningBroker], dict[str, Any]],
        **broker: Any,
    ) -> None:
        """Start a fresh broker, measure, always stop it; an exception becomes the scenario's line."""
        started = time.monotonic()
        try:
            with running(kind, **broker) as target:
                result = measure(target)
        except Exception as exc:
            result = {"broker": kind, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        result["scenario_wall_s"] = round(time.monotonic() - started, 1)
        self.emit(scenario, result)


def _ratio(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, key: str) -> float | None:
    if not ours or not theirs or not ours.get(key) or not theirs.get(key):
        return None
    return round(float(ours[key]) / float(theirs[key]), 3)


def ratios(report: Report, other: BrokerKind) -> dict[str, Any] | None:
    get = report.results.get
    line: dict[str, Any] = {"ours": "market-bridge", "vs": other, "auth_ours": True, "auth_theirs": False}
    for scenario in ("qos0", "qos1"):
        ours, theirs = get((scenario, "market-bridge")), get((scenario, other))
        line[f"{scenario}_deliveries_per_s"] = _ratio(ours, theirs, "deliveries_per_s")
        line[f"{scenario}_broker_cpu_per_delivery"] = _ratio(ours, theirs, "broker_cpu_us_per_delivery")
    for count in (1000, 10_000):
        ours, theirs = get((f"idle_{count}", "market-bridge")), get((f"idle_{count}", other))
        line[f"idle_{count}_bytes_per_connection"] = _ratio(ours, theirs, "bytes_per_connection")
    if all(
        value is None for key, value in line.items() if key not in ("ours", "vs", "auth_ours", "auth_theirs")
    ):
        return None
    return line


def _fanout(broker: RunningBroker, options: FanoutOptions) -> dict[str, Any]:
    return fanout(broker, options)


def _stalled(report: Report, options: FanoutOptions) -> None:
    baseline: dict[str, Any] = {}
    report_line: dict[str, Any] = {"broker": "market-bridge"}
    for staller in (False, True):
        try:
            with running("market-bridge") as broker:
                result = fanout(broker, replace(options, staller=staller))
        except Exception as exc:
            report.emit(
                "stalled_subscriber",
                {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"[:4000]},
            )
            return
        if not staller:
            baseline = result
            continue
        report_line |= {
            "auth": True,
            "ticks": result["published"],
            "healthy_subscribers": options.subscribers,
            "staller_rcvbuf": options.stall_rcvbuf,
            "healthy_deliveries_per_s": result["deliveries_per_s"],
            "baseline_deliveries_per_s": baseline["deliveries_per_s"],
            "rate_ratio": _ratio(result, baseline, "deliveries_per_s"),
            "healthy_loss": result["loss"],
            "broker_rss_growth_mb": result["broker_rss_growth_mb"],
            "broker_rss_peak_growth_mb": result["broker_rss_peak_growth_mb"],
            "baseline_rss_growth_mb": baseline["broker_rss_growth_mb"],
            "baseline_rss_peak_growth_mb": baseline["broker_rss_peak_growth_mb"],
            "staller_received": result["staller_received"],
            "staller_still_connected": result["staller_connected"],
            "p99_ms": result["p99_ms"],
            "baseline_p99_ms": baseline["p99_ms"],
            "broker_cpu_cores": result["broker_cpu_cores"],
            "generator_cpu_cores": result["generator_cpu_cores"],
            "wall_s": round(result["wall_s"] + baseline["wall_s"], 1),
        }
    report.emit("stalled_subscriber", report_line)


def _labelled(broker: RunningBroker, options: FanoutOptions, label: str) -> dict[str, Any]:
    return fanout(broker, options) | {"flush_interval_ms": label}


def _phone(
    report: Report, brokers: list[BrokerKind], base: FanoutOptions, quick: bool, subscribers: int, rate: float
) -> None:
    """Phone-like fan-out: each subscriber gets ``rate`` ticks/s, far below saturation."""
    phone = replace(
        base,
        subscribers=subscribers,
        rate=rate,
        duration_s=4.0 if quick else 10.0,
        sample_every=8,
        read_quantum_s=0.005,  # phones read when the radio wakes, not in a busy loop
    )
    if "market-bridge" in brokers:
        for flush_ms in (None, 0.0):  # the default, then a write every loop step
            extra = None if flush_ms is None else {"broker": {"flush_interval_ms": flush_ms}}
            label = "default" if flush_ms is None else "0"
            measure = partial(_labelled, options=phone, label=label)
            report.run("phone", "market-bridge", measure, max_connections=subscribers + 100, extra=extra)
    if "mosquitto" in brokers:
        report.run("phone", "mosquitto", lambda b: fanout(b, phone))


def _cluster(report: Report, quick: bool) -> None:
    if not cluster_nodes.available():
        print(json.dumps({"scenario": "note", "cluster": "redis-server not on PATH: skipped"}), flush=True)
        return
    try:
        for result in cluster_nodes.run_all(quick=quick):
            report.emit(result.pop("scenario"), result)
    except Exception as exc:
        report.emit(
            "cluster_fanout", {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"[:4000]}
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs for development")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated from {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--brokers", default=",".join(BROKERS), help=f"comma-separated from {', '.join(BROKERS)}"
    )
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes")
    parser.add_argument("--duration", type=float, help="seconds of publishing per saturated run (8; quick 3)")
    parser.add_argument(
        "--window",
        type=int,
        default=500,
        help="messages per subscriber published, not yet received (saturated)",
    )
    parser.add_argument(
        "--subscriber-transport",
        choices=["ws", "tcp"],
        default="ws",
        help="tcp tells a broker's WebSocket cost from the rest (e.g. Mosquitto's)",
    )
    parser.add_argument("--read-quantum-ms", type=float, default=1.0, help="subscriber pause between polls")
    parser.add_argument(
        "--flush-interval-ms",
        type=float,
        help="broker.flush_interval_ms for our qos0/qos1 runs (default: the config's)",
    )
    parser.add_argument("--phone-subscribers", type=int, default=2000)
    parser.add_argument("--phone-rate", type=float, default=150.0, help="ticks/s in the phone scenario")
    parser.add_argument("--idle", help="idle connection counts, e.g. 1000,10000 (quick: 1000)")
    parser.add_argument("--idle-workers", type=int, default=4)
    parser.add_argument(
        "--stall-ticks", type=int, help="ticks in the stalled-subscriber runs (100000; quick 10000)"
    )
    parser.add_argument("--stall-healthy", type=int, default=4, help="healthy subscribers beside the staller")
    args = parser.parse_args()
    chosen = set(args.scenarios.split(","))
    if unknown := chosen - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    brokers = [b for b in BROKERS if b in args.brokers.split(",")]
    if "mosquitto" in brokers and not mosquitto_available():
        brokers.remove("mosquitto")
        print(json.dumps({"scenario": "note", "mosquitto": "not on PATH: skipped"}), flush=True)
    quick = args.quick
    duration = args.duration or (3.0 if quick else 8.0)
    idle_counts = [int(n) for n in (args.idle or ("1000" if quick else "1000,10000")).split(",")]
    stall_ticks = args.stall_ticks or (10_000 if quick else 100_000)

    started = time.monotonic()
    soft, _hard = raise_nofile_limit()  # brokers inherit it: 10k connections need 10k descriptors
    report = Report()
    base = FanoutOptions(
        subscribers=args.subscribers,
        workers=args.workers,
        duration_s=duration,
        window=args.window,
        read_quantum_s=args.read_quantum_ms / 1000,
        transport=args.subscriber_transport,
    )
    # The machine's load: other jobs on a small machine move every number, so say how busy it was.
    setup = {
        "brokers": brokers,
        "nofile_limit": soft,
        "quick": quick,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    print(json.dumps({"scenario": "setup", **setup}), flush=True)

    if "ceiling" in chosen:
        report.run("generator_ceiling", "reference", partial(_fanout, options=replace(base, qos=0)))
    ours: dict[str, Any] = {}
    if args.flush_interval_ms is not None:
        ours = {"extra": {"broker": {"flush_interval_ms": args.flush_interval_ms}}}
    for kind in brokers:
        for qos in (0, 1):
            if f"qos{qos}" in chosen:
                extra = ours if kind == "market-bridge" else {}
                report.run(f"qos{qos}", kind, partial(_fanout, options=replace(base, qos=qos)), **extra)
    if "paced" in chosen:
        # 50 ticks/s to every subscriber: 2,500 deliveries/s with 50 subscribers. Also on the
        # reference server (the generator's own latency floor) and Mosquitto, for scale.
        paced = replace(base, rate=50.0, duration_s=4.0 if quick else 10.0, sample_every=1)
        for kind in ("market-bridge", "reference", "mosquitto"):
            if kind in brokers or kind == "reference":
                report.run("paced", kind, lambda b: fanout(b, paced))
    if "phone" in chosen:
        _phone(report, brokers, base, quick, args.phone_subscribers, args.phone_rate)
    if "market-bridge" in brokers:
        if "retained" in chosen:
            report.run("retained_snapshot", "market-bridge", lambda b: retained_snapshot(b, 500))
        if "stalled" in chosen:
            stall = replace(
                base,
                subscribers=args.stall_healthy,
                workers=1,
                duration_s=120.0 if quick else 300.0,  # a cap: stops early if the broker is that slow
                max_messages=stall_ticks,
                drain_s=60.0,
            )
            _stalled(report, stall)
    if "idle" in chosen:
        for kind in brokers:
            for count in idle_counts:
                if kind == "amqtt" and count > 1000:
                    continue
                workers = min(args.idle_workers, max(1, count // 500))
                report.run(
                    f"idle_{count}",
                    kind,
                    partial(idle, connections=count, workers=workers),
                    max_connections=count + 100,
                )
    if "market-bridge" in brokers:
        if "connect" in chosen:
            try:
                for result in connect.run(connections=500 if quick else 2000, concurrency=50):
                    report.emit(result.pop("scenario"), result)
            except Exception as exc:
                report.emit(
                    "connect_rate", {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"}
                )
        if "storm" in chosen:
            try:
                for result in connect.storm(connections=1000 if quick else 10_000):
                    report.emit(result.pop("scenario"), result)
            except Exception as exc:
                report.emit(
                    "connect_storm", {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"}
                )
        if "offline" in chosen:
            try:
                for result in offline.run_all(messages=2000 if quick else 10_000):
                    report.emit(result.pop("scenario"), result)
            except Exception as exc:
                report.emit(
                    "offline_backlog", {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"}
                )
        if "drain" in chosen:
            try:
                users, per_user = (200, 50) if quick else (1000, 100)
                result = mailbox_drain.run(users=users, per_user=per_user)
                report.emit(result.pop("scenario"), result)
                with offline.redis_server("everysec") as url:
                    result = mailbox_drain.run(users=users, per_user=per_user, redis_url=url)
                report.emit(result.pop("scenario"), result)
            except Exception as exc:
                report.emit(
                    "mailbox_drain", {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"}
                )
        if "workers" in chosen:
            try:
                for result in workers_bench.run(
                    connections=1000 if quick else 3000,
                    rounds=1 if quick else 2,
                    generators=2,
                    concurrency=50,
                    fanout_s=4.0 if quick else 8.0,
                ):
                    report.emit(result.pop("scenario"), result)
            except Exception as exc:
                report.emit(
                    "workers_admission", {"broker": "market-bridge", "error": f"{type(exc).__name__}: {exc}"}
                )

        if "cluster" in chosen:
            _cluster(report, quick)

    for other in brokers:
        if other != "market-bridge" and (line := ratios(report, other)) is not None:
            report.emit("ratio", line)
    report.emit(
        "summary",
        {"wall_s": round(time.monotonic() - started, 1), "loadavg": os.getloadavg(), "failed": report.failed},
    )
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
