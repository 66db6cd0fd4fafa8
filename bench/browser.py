"""What the browser-facing settings cost: anonymous access, the Origin allowlist and
X-Forwarded-For from trusted proxies (issue 16).

Two parts, one JSON line per figure:

- ``pure``: µs per call of the decisions made once per handshake or CONNECT
  (``OriginPolicy.refusal``, ``client_address`` with 1 and 16 hops and a stuffed 2 KiB
  header, ``decide_anonymous``), best and median of ``--repeat`` runs;
- ``connect``: a broker in this process (its own thread and loop) on loopback; sequential
  WebSocket handshakes + CONNECT -> CONNACK, once as JWT clients (token cache warm) and once
  as anonymous clients, with ``allowed_origins`` and ``trusted_proxies`` set and the client
  sending ``Origin`` and ``X-Forwarded-For``, then with neither set: µs per connection,
  median and spread over ``--repeat`` rounds.

    python -m bench.browser [--connections 500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any

from bench.mqttws import check_handshake, connect, handshake_request, masked_frame
from bridge.anonymous import AnonymousPolicy, decide_anonymous
from bridge.auth import SigningKey, mint_token
from bridge.config import BridgeConfig
from bridge.core.forwarded import TrustedProxies, client_address, parse_networks
from bridge.core.hooks import ConnectRequest
from bridge.core.origin import OriginPolicy
from bridge.edge.broker import MarketBroker

SECRET = "bench-browser-secret-0123456789abcdef0123"
KEY = SigningKey(kid="bench", key=SECRET.encode(), algorithm="HS256")
CONNACK_OK = b"\x82\x04\x20\x02\x00\x00"


def _per_call_us(fn: Any, number: int, repeat: int) -> dict[str, float]:
    runs = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat)]
    return {"best_us": round(min(runs), 3), "median_us": round(statistics.median(runs), 3)}


def pure(repeat: int) -> list[dict[str, Any]]:
    origins = OriginPolicy([f"https://dash{i}.example.com" for i in range(20)])
    trusted = TrustedProxies(parse_networks(["10.0.0.0/8", "172.16.0.0/12", "2001:db8::/32"]))
    hops = ", ".join(["10.0.0.7"] * 15)
    stuffed = "6.6.6.6, " * 1000 + "203.0.113.9"
    policy = AnonymousPolicy.of(["market/#"], "Africa/Lagos")
    request = ConnectRequest("mqttjs_1234abcd", None, None, True, "ws", "10.0.0.5", 0.0)
    cases = {
        "origin_allowed": lambda: origins.refusal(["https://dash7.example.com"]),
        "origin_refused": lambda: origins.refusal(["https://evil.example.com"]),
        "xff_1_hop": lambda: client_address("10.0.0.5", ["203.0.113.9"], trusted),
        "xff_16_hops": lambda: client_address("10.0.0.5", [f"203.0.113.9, {hops}"], trusted),
        "xff_stuffed_9kb": lambda: client_address("10.0.0.5", [stuffed], trusted),
        "xff_untrusted_peer": lambda: client_address("198.51.100.1", [stuffed], trusted),
        "decide_anonymous": lambda: decide_anonymous(request, policy),
    }
    return [{"part": "pure", "case": name, **_per_call_us(fn, 20_000, repeat)} for name, fn in cases.items()]


def _config(store: Path, *, browser: bool) -> BridgeConfig:
    ws: dict[str, Any] = {"port": 0}
    if browser:
        ws |= {"allowed_origins": ["https://dash.example.com"], "trusted_proxies": ["127.0.0.1/32"]}
    return BridgeConfig(
        listeners={"ws": ws, "tcp": {"port": 0}},
        store={"path": str(store / f"{int(browser)}.sqlite3")},
        feeds=[],
        http={"enabled": False},
        limits={"max_connections": 100_000, "max_connections_per_user": 100_000},
        auth={
            "keys": [{"kid": "bench", "algorithms": ["HS256"], "secret": SECRET}],
            "anonymous": {"enabled": True, "max_connections": 100_000},
        },
    )


async def _start_broker(config: BridgeConfig) -> MarketBroker:
    broker = MarketBroker(config)  # amqtt binds to the running loop
    await broker.start()
    return broker


def _one(port: int, packet: bytes, headers: bytes) -> None:
    request, accept = handshake_request("127.0.0.1", port, "/mqtt")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request[:-2] + headers + b"\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"closed during the handshake: {head!r}")
            head += chunk
        check_handshake(head.split(b"\r\n\r\n", 1)[0], accept)
        sock.sendall(masked_frame(packet))
        got = head.split(b"\r\n\r\n", 1)[1]
        while len(got) < len(CONNACK_OK):
            chunk = sock.recv(64)
            if not chunk:
                break
            got += chunk
        if got[: len(CONNACK_OK)] != CONNACK_OK:
            raise RuntimeError(f"CONNACK {got!r}")


def connect_rounds(connections: int, repeat: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-browser-") as scratch:
        for browser in (False, True):
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, daemon=True)
            thread.start()
            config = _config(Path(scratch), browser=browser)
            broker = asyncio.run_coroutine_threadsafe(_start_broker(config), loop).result(30)
            try:
                port = broker.bound_port("ws")
                headers = (
                    b"Origin: https://dash.example.com\r\nX-Forwarded-For: 203.0.113.9\r\n"
                    if browser
                    else b""
                )
                token = mint_token(KEY, sub="viewer", role="subscriber", now=time.time(), ttl_s=3600)
                kinds: dict[str, tuple[str | None, str | None]] = {
                    "jwt": ("viewer", token),
                    "anonymous": (None, None),
                }
                for kind, (user, password) in kinds.items():  # warm: the token cache, code paths
                    _one(port, connect(f"{kind}-warm", user, password), headers)
                per_conn: dict[str, list[float]] = {kind: [] for kind in kinds}
                for round_ in range(repeat):
                    # Interleaved, the order flipped every round: drift (other jobs, sockets
                    # in TIME_WAIT) falls on both kinds alike.
                    for kind in sorted(kinds, reverse=bool(round_ % 2)):
                        user, password = kinds[kind]
                        started = time.perf_counter()
                        for n in range(connections):
                            _one(port, connect(f"{kind}-{round_}-{n}", user, password), headers)
                        per_conn[kind].append((time.perf_counter() - started) / connections * 1e6)
                results += [
                    {
                        "part": "connect",
                        "kind": kind,
                        "origin_and_xff": browser,
                        "connections": connections,
                        "median_us_per_connection": round(statistics.median(runs), 1),
                        "min_us": round(min(runs), 1),
                        "max_us": round(max(runs), 1),
                    }
                    for kind, runs in per_conn.items()
                ]
            finally:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(30)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(10)
                loop.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for line in pure(args.repeat) + connect_rounds(args.connections, args.repeat):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
