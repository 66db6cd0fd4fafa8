"""The bridge process end to end: graceful SIGTERM during a stream and during an offline replay."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bridge.auth import Role, SigningKey, mint_token
from bridge.config import DEV_SECRET_PATH
from bridge.keys import generate_dev_secret
from tests.conftest import DEADLINE_S, Client, Proc, unique

ClientFactory = Callable[..., Client]
EPHEMERAL = {
    "MARKET_BRIDGE_LISTENERS__TCP__PORT": "0",
    "MARKET_BRIDGE_LISTENERS__WS__PORT": "0",
    "MARKET_BRIDGE_HTTP__PORT": "0",
}


class Bridge:
    """``market-bridge run`` in a scratch directory, with its ports and a token minter."""

    def __init__(self, procs: Callable[..., Proc], tmp_path: Path, feeds: str = "[]") -> None:
        if not (tmp_path / DEV_SECRET_PATH).exists():
            generate_dev_secret(tmp_path / DEV_SECRET_PATH)
        secret = (tmp_path / DEV_SECRET_PATH).read_text().strip().encode()
        self._key = SigningKey("dev", secret, "HS256")
        self.proc = procs(
            "run",
            env={**EPHEMERAL, "MARKET_BRIDGE_FEEDS": feeds, "MARKET_BRIDGE_BROKER__DRAIN_TIMEOUT_S": "3"},
        )
        self.tcp = int(self.proc.wait_for_line(r"listener tcp bound to 127\.0\.0\.1:(\d+)").group(1))
        self.http = int(self.proc.wait_for_line(r"http listening on 127\.0\.0\.1:(\d+)").group(1))

    def token(self, sub: str, role: Role) -> str:
        return mint_token(self._key, sub=sub, role=role, now=time.time(), ttl_s=600)

    def terminate(self) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.popen.send_signal(signal.SIGTERM)
        code = self.proc.popen.wait(DEADLINE_S * 2)
        return code, time.monotonic() - started


def test_sigterm_during_a_stream_closes_cleanly_and_keeps_the_snapshot(
    procs: Callable[..., Proc], clients: ClientFactory, tmp_path: Path
) -> None:
    feeds = json.dumps([{"kind": "simulator", "interval_s": 0.05, "seed": 1, "markets": ["luno/BTC-ZAR"]}])
    bridge = Bridge(procs, tmp_path, feeds)
    sub = clients(bridge.tcp, username="viewer", password=bridge.token("viewer", "subscriber"))
    sub.connect()
    sub.subscribe("market/#")
    seqs = [json.loads(m.payload)["seq"] for m in sub.expect(20)]
    assert httpx.get(f"http://127.0.0.1:{bridge.http}/readyz").status_code == 200

    code, took = bridge.terminate()
    assert code == 0
    assert took < 3 + 5  # drain deadline plus shutdown
    assert sub.disconnected.wait(DEADLINE_S)
    bridge.proc.wait_for_line(r"draining: closing listeners")

    again = Bridge(procs, tmp_path, "[]")
    late = clients(again.tcp, username="viewer", password=again.token("viewer", "subscriber"))
    late.connect()
    late.subscribe("market/#")
    snapshot = json.loads(late.expect(1)[0].payload)
    # The snapshot saved on the way down is at least as new as what the subscriber saw.
    assert snapshot["seq"] >= max(seqs)
    assert again.terminate()[0] == 0


def test_sigterm_during_offline_replay_loses_nothing(
    procs: Callable[..., Proc], clients: ClientFactory, tmp_path: Path
) -> None:
    bridge = Bridge(procs, tmp_path)
    user, phone_id = unique("alice"), unique("phone")

    def phone(port: int, token: str) -> Client:
        client = clients(port, client_id=phone_id, clean_session=False, username=user, password=token)
        client.connect()
        return client

    first = phone(bridge.tcp, bridge.token(user, "subscriber"))
    first.subscribe(f"user/{user}/#", qos=1)
    first.close()
    service = clients(bridge.tcp, username="svc", password=bridge.token("svc", "service"))
    service.connect()
    total = 300
    for index in range(total):
        service.publish(f"user/{user}/fills", f"m{index}".encode(), qos=1)

    during = phone(bridge.tcp, bridge.token(user, "subscriber"))
    got_during = {during.expect(1)[0].payload}  # the replay has started
    code, _took = bridge.terminate()
    assert code == 0
    while not during.messages.empty():
        got_during.add(during.messages.get_nowait().payload)

    again = Bridge(procs, tmp_path)
    after = phone(again.tcp, again.token(user, "subscriber"))
    expected = {f"m{index}".encode() for index in range(total)}
    got_after: set[bytes] = set()
    deadline = time.monotonic() + DEADLINE_S * 3
    while (got_during | got_after) != expected and time.monotonic() < deadline:
        got_after.add(after.expect(1)[0].payload)
    assert got_during | got_after == expected
    assert again.terminate()[0] == 0
