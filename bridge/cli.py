"""``market-bridge``: run the broker, the demo, a stand-alone feed, or check a config.

Exit codes: 0 on a clean stop (SIGINT/SIGTERM), 2 for bad configuration or arguments,
1 when the bridge cannot start (e.g. a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bridge.auth import ROLES, ClaimsModel, Role, mint_token
from bridge.config import (
    DEFAULT_CONFIG_PATH,
    DEV_SECRET_PATH,
    BridgeConfig,
    LoggingConfig,
    PollerFeedConfig,
    ReplayFeedConfig,
    SimulatorFeedConfig,
    load_config,
    redacted,
)
from bridge.core.timezones import is_valid_zone
from bridge.edge.broker import MarketBroker
from bridge.errors import ConfigError, MarketBridgeError
from bridge.http import HttpServer
from bridge.keys import generate_dev_secret, load_signing_key
from bridge.logs import setup_logging
from bridge.runtime import build_feed, pump, run, serve
from bridge.workers import STOP_MARGIN_S, Supervisor, parse_workers, plan_workers, signal_ready, worker_argv
from broker_plugins.offline_store import open_store
from feeds.poller import FEED_KINDS, POLLED_EXCHANGES
from feeds.publisher import MqttTickPublisher

__all__ = ["connect_banner", "main"]

log = logging.getLogger("bridge.cli")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError("--ttl", f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def mint(
    config: BridgeConfig,
    *,
    sub: str,
    role: Role,
    ttl_s: float,
    tz: str | None = None,
    kid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A token from the configured signing key (development and tests)."""
    return mint_token(
        load_signing_key(config.auth, kid),
        sub=sub,
        role=role,
        now=time.time(),
        ttl_s=ttl_s,
        tz=tz,
        audience=config.auth.audience,
        issuer=config.auth.issuer,
        extra=extra,
    )


def connect_banner(broker: MarketBroker, config: BridgeConfig, http: HttpServer | None = None) -> str:
    """How to connect, with commands that work as printed (and a token when auth is on)."""
    lines = ["market-bridge is serving market/<exchange>/<pair> (e.g. market/luno/BTC-ZAR)", ""]
    listeners = config.listeners
    cred_paho, cred_sub, token = "", "", ""
    if config.auth.enabled:
        token = mint(config, sub="demo", role="subscriber", ttl_s=86400, tz="Africa/Lagos")
        lines += [
            "  Auth: JWT in the MQTT password, username = the token's sub. A 24 h subscriber token",
            "  for user 'demo' (Africa/Lagos); mint others with `market-bridge token --sub NAME`:",
            f"    TOKEN={token}",
            "",
        ]
        cred_paho = f" c.username_pw_set('demo', '{token}');"
        cred_sub = f" -u demo -P {token}"
    if "ws" in broker.listener_names():
        scheme = "wss" if listeners.ws.tls else "ws"
        url = f"{scheme}://{listeners.ws.host}:{broker.bound_port('ws')}{listeners.ws.path}"
        lines += [
            f"  WebSocket  {url}   (MQTT 3.1.1, subprotocol 'mqtt')",
            '    paho:  python -c "import paho.mqtt.client as m; c=m.Client(m.CallbackAPIVersion.VERSION2,'
            f" transport='websockets'); c.ws_set_options(path='{listeners.ws.path}');{cred_paho}"
            " c.on_message=lambda c,u,msg: print(msg.topic, msg.payload.decode());"
            f" c.connect('{listeners.ws.host}', {broker.bound_port('ws')}); c.subscribe('market/#');"
            ' c.loop_forever()"',
        ]
    if "tcp" in broker.listener_names():
        scheme = "mqtts" if listeners.tcp.tls else "mqtt"
        port = broker.bound_port("tcp")
        lines += [
            f"  TCP        {scheme}://{listeners.tcp.host}:{port}",
            f"    mosquitto_sub -h {listeners.tcp.host} -p {port} -t 'market/#' -v{cred_sub}",
            '    paho:  python -c "import paho.mqtt.client as m; c=m.Client(m.CallbackAPIVersion.VERSION2);'
            f"{cred_paho} c.on_message=lambda c,u,msg: print(msg.topic, msg.payload.decode());"
            f" c.connect('{listeners.tcp.host}', {port}); c.subscribe('market/#'); c.loop_forever()\"",
        ]
    if http is not None:
        base = f"http://{config.http.host}:{http.port}"
        # The token goes in the fragment: the browser never sends it to the server in a URL.
        fragment = f"#token={token}" if config.auth.enabled else ""
        lines += [f"  Dashboard  {base}/{fragment}"]
        lines += [
            f"  HTTP       {base}   (/healthz, /readyz, /metrics, /admin/..., docs at /docs)",
            f"    curl {base}/readyz",
        ]
    lines += ["", "Press Ctrl-C to stop."]
    return "\n".join(lines)


async def _run(config: BridgeConfig, *, banner: bool) -> None:
    stop = asyncio.Event()
    _stop_on_signals(stop)

    def ready(broker: MarketBroker, http: HttpServer | None) -> None:
        if http is not None:
            log.info("http listening on %s:%s", config.http.host, http.port)
        if banner:
            print(connect_banner(broker, config, http), flush=True)
        signal_ready()  # a --workers supervisor waits for this

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


async def _user_subscriptions(config: BridgeConfig, user: str) -> dict[str, dict[str, int]]:
    """Read from the store directly, so it works whether or not the broker runs."""
    store = await open_store(config.store)
    try:
        return {record.client_id: record.subscriptions for record in await store.user_sessions(user)}
    finally:
        await store.close()


async def _user_tz(config: BridgeConfig, user: str, zone: str | None, *, clear: bool) -> str | None:
    """Connected clients pick a change up on their next connection once the broker's memory of
    the old one (10 minutes at most) has gone; the admin API's change is seen at once."""
    store = await open_store(config.store)
    try:
        if zone is not None or clear:
            await store.set_user_tz(user, zone)
        return (await store.get_user_tzs([user])).get(user)
    finally:
        await store.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="market-bridge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the broker and the feeds in the config")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    run.add_argument(
        "--workers",
        default="1",
        help="N nodes of the cluster sharing the ports (SO_REUSEPORT); 'auto' = the cores (needs cluster.enabled)",
    )

    demo = commands.add_parser(
        "demo", help="run the embedded default with simulated feeds and print how to connect"
    )
    demo.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    check = commands.add_parser("config", help="validate a config and print the effective values")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    limits = commands.add_parser("limits", help="print the effective connection and rate limits")
    limits.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    subs = commands.add_parser(
        "subscriptions", help="list a user's persistent sessions and their subscriptions"
    )
    subs.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    subs.add_argument("--user", required=True)

    tz = commands.add_parser("tz", help="show, set or clear a user's time zone override (in the store)")
    tz.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    tz.add_argument("--user", required=True)
    change = tz.add_mutually_exclusive_group()
    change.add_argument("--set", metavar="ZONE", help="IANA zone, e.g. Africa/Nairobi")
    change.add_argument("--clear", action="store_true", help="back to the token's tz claim")

    token = commands.add_parser("token", help="mint a JWT from the configured key (development, tests)")
    token.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    token.add_argument("--sub", required=True, help="the user; clients log in with this username")
    token.add_argument("--role", choices=ROLES, default="subscriber")
    token.add_argument("--tz", help="IANA zone for the user's timestamps, e.g. Africa/Nairobi")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d")
    token.add_argument("--kid", help="which configured key signs (default: the first that can)")
    token.add_argument("--sub-acl", nargs="*", help="topic filters the user may subscribe to")
    token.add_argument("--pub-acl", nargs="*", help="topic filters the user may publish to")

    feed = commands.add_parser("feed", help="run one feed on its own, publishing over MQTT")
    feed.add_argument("kind", choices=FEED_KINDS)
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
            if args.kind in POLLED_EXCHANGES and not args.base_url:
                raise ConfigError("--base-url", f"{args.kind} needs the exchange's API base URL")
            setup_logging(LoggingConfig())
            asyncio.run(_feed(args))
            return 0
        if args.command == "demo" and args.config == DEFAULT_CONFIG_PATH and not DEV_SECRET_PATH.exists():
            generate_dev_secret(DEV_SECRET_PATH)
            print(f"created a development JWT key at {DEV_SECRET_PATH}", file=sys.stderr)
        config = load_config(args.config)
        if args.command == "config":
            print(json.dumps(redacted(config), indent=2))
            return 0
        if args.command == "limits":
            print(json.dumps(config.limits.model_dump(mode="json"), indent=2))
            return 0
        if args.command == "tz":
            if args.set is not None and not is_valid_zone(args.set):
                raise ConfigError("--set", f"{args.set!r} is not an IANA time zone")
            print(
                asyncio.run(_user_tz(config, args.user, args.set, clear=args.clear))
                or "(none: the token's tz claim applies)"
            )
            return 0
        if args.command == "subscriptions":
            print(json.dumps(asyncio.run(_user_subscriptions(config, args.user)), indent=2, sort_keys=True))
            return 0
        if args.command == "token":
            extra: dict[str, Any] = {}
            if args.sub_acl is not None:
                extra["sub_acl"] = args.sub_acl
            if args.pub_acl is not None:
                extra["pub_acl"] = args.pub_acl
            ttl_s = parse_duration(args.ttl)
            # Refuse to mint what the broker would refuse (bad sub, role, tz, ACL filters).
            ClaimsModel.model_validate({"sub": args.sub, "role": args.role, "tz": args.tz, "exp": 0, **extra})
            print(
                mint(config, sub=args.sub, role=args.role, ttl_s=ttl_s, tz=args.tz, kid=args.kid, extra=extra)
            )
            return 0
        workers = parse_workers(args.workers) if args.command == "run" else 1
        if workers > 1:
            plans = plan_workers(config, workers)
            setup_logging(config.logging)
            timeout = config.broker.drain_timeout_s + STOP_MARGIN_S
            return asyncio.run(Supervisor(plans, worker_argv(args.config), stop_timeout_s=timeout).run())
        setup_logging(config.logging)
        run(_run(config, banner=args.command == "demo"), config.broker.event_loop)
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
