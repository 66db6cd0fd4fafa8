"""``market-bridge``: run the broker, the demo, a stand-alone feed, or check a config.

Exit codes: 0 on a clean stop (SIGINT/SIGTERM), 2 for bad configuration or arguments,
1 when the bridge cannot start (e.g. a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from bridge.broker import MarketBroker
from bridge.config import (
    DEFAULT_CONFIG_PATH,
    BridgeConfig,
    PollerFeedConfig,
    ReplayFeedConfig,
    SimulatorFeedConfig,
    load_config,
)
from bridge.errors import ConfigError, MarketBridgeError
from bridge.logs import setup_logging
from bridge.runtime import build_feed, pump, serve
from feeds.publisher import MqttTickPublisher

__all__ = ["connect_banner", "main"]


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def connect_banner(broker: MarketBroker, config: BridgeConfig) -> str:
    """How to connect, with commands that work as printed."""
    lines = ["market-bridge is serving market/<exchange>/<pair> (e.g. market/luno/BTC-ZAR)", ""]
    listeners = config.listeners
    if "ws" in broker.listener_names():
        scheme = "wss" if listeners.ws.tls else "ws"
        url = f"{scheme}://{listeners.ws.host}:{broker.bound_port('ws')}{listeners.ws.path}"
        lines += [
            f"  WebSocket  {url}   (MQTT 3.1.1, subprotocol 'mqtt')",
            '    paho:  python -c "import paho.mqtt.client as m; c=m.Client(m.CallbackAPIVersion.VERSION2,'
            f" transport='websockets'); c.ws_set_options(path='{listeners.ws.path}');"
            " c.on_message=lambda c,u,msg: print(msg.topic, msg.payload.decode());"
            f" c.connect('{listeners.ws.host}', {broker.bound_port('ws')}); c.subscribe('market/#');"
            ' c.loop_forever()"',
        ]
    if "tcp" in broker.listener_names():
        scheme = "mqtts" if listeners.tcp.tls else "mqtt"
        port = broker.bound_port("tcp")
        lines += [
            f"  TCP        {scheme}://{listeners.tcp.host}:{port}",
            f"    mosquitto_sub -h {listeners.tcp.host} -p {port} -t 'market/#' -v",
            '    paho:  python -c "import paho.mqtt.client as m; c=m.Client(m.CallbackAPIVersion.VERSION2);'
            " c.on_message=lambda c,u,msg: print(msg.topic, msg.payload.decode());"
            f" c.connect('{listeners.tcp.host}', {port}); c.subscribe('market/#'); c.loop_forever()\"",
        ]
    lines += ["", "Press Ctrl-C to stop."]
    return "\n".join(lines)


async def _run(config: BridgeConfig, *, banner: bool) -> None:
    stop = asyncio.Event()
    _stop_on_signals(stop)

    def ready(broker: MarketBroker) -> None:
        if banner:
            print(connect_banner(broker, config), flush=True)

    await serve(config, stop=stop, on_ready=ready)


async def _feed(args: argparse.Namespace) -> None:
    if args.kind == "simulator":
        entry: SimulatorFeedConfig | ReplayFeedConfig | PollerFeedConfig = SimulatorFeedConfig(
            kind="simulator", interval_s=args.interval, seed=args.seed
        )
    elif args.kind == "replay":
        entry = ReplayFeedConfig(kind="replay", path=args.path, speed=args.speed, loop=not args.once)
    else:
        entry = PollerFeedConfig(
            kind=args.kind, base_url=args.base_url, pairs=args.pairs or [], interval_s=args.interval
        )
    feed = build_feed(entry)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with MqttTickPublisher(args.broker, username=args.username, password=args.password) as sink:
        async with asyncio.TaskGroup() as group:
            feed_task = group.create_task(pump(feed, sink), name=f"feed:{feed.name}")
            stop_task = group.create_task(stop.wait(), name="stop")
            await asyncio.wait({feed_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            feed_task.cancel()
            stop_task.cancel()
        print(
            f"published {sink.published} ticks, dropped {sink.dropped_offline} while disconnected", flush=True
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="market-bridge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the broker and the feeds in the config")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    demo = commands.add_parser(
        "demo", help="run the embedded default with simulated feeds and print how to connect"
    )
    demo.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    check = commands.add_parser("config", help="validate a config and print the effective values")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    feed = commands.add_parser("feed", help="run one feed on its own, publishing over MQTT")
    feed.add_argument("kind", choices=["simulator", "replay", "luno", "valr", "quidax"])
    feed.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="mqtt://, mqtts://, ws:// or wss:// URL"
    )
    feed.add_argument("--username")
    feed.add_argument("--password")
    feed.add_argument("--interval", type=float, default=1.0, help="seconds between rounds / polls")
    feed.add_argument("--seed", type=int)
    feed.add_argument("--path", type=Path, help="replay: NDJSON file of ticks")
    feed.add_argument(
        "--speed", type=float, default=1.0, help="replay: 1 = recorded pace, 0 = as fast as possible"
    )
    feed.add_argument("--once", action="store_true", help="replay: stop at the end instead of looping")
    feed.add_argument("--base-url", help="exchange API base URL (luno, valr, quidax)")
    feed.add_argument("--pairs", nargs="*", help="exchange symbols to poll; default all")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "feed":
            if args.kind == "replay" and args.path is None:
                raise ConfigError("--path", "replay needs an NDJSON file")
            if args.kind in ("luno", "valr", "quidax") and not args.base_url:
                raise ConfigError("--base-url", f"{args.kind} needs the exchange's API base URL")
            setup_logging(BridgeConfig().logging)
            asyncio.run(_feed(args))
            return 0
        config = load_config(args.config)
        if args.command == "config":
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        setup_logging(config.logging)
        asyncio.run(_run(config, banner=args.command == "demo"))
        return 0
    except ConfigError as exc:
        print(f"market-bridge: {exc}", file=sys.stderr)
        return 2
    except MarketBridgeError as exc:
        print(f"market-bridge: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        first = exc.errors()[0]
        print(
            f"market-bridge: invalid argument {'.'.join(map(str, first['loc']))}: {first['msg']}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
