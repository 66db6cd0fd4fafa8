"""bridge.edge.ws_connection: our WebSocket protocol around websockets' sans-I/O one.

What a client can make the broker hold is bounded: before these bounds one connection that
never sent CONNECT and never read grew the broker by 120 MB with 1M pings (security issue,
finding 3). An open connection keeps nothing of its handshake; opt-in pings go out; a
closing listener ends its connections with 1001.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.sync.client import connect as ws_connect

from bench.mqttws import handshake_request, masked_frame
from bridge.auth import Role
from bridge.config import load_config
from bridge.core.wire import publish_qos0
from bridge.core.wsframes import FrameReader
from bridge.edge.ws_connection import PREAUTH_PINGS, WsConnection, WsListener
from bridge.errors import ConfigError
from tests.conftest import (
    DEADLINE_S,
    BrokerThread,
    authed_connect,
    bridge_config,
    subscribe_packet,
    unique,
    wait_until,
)
from tests.edge.test_streams import closed_by_peer, raw_ws

OP_BINARY, OP_PING = 0x2, 0x9


@pytest.fixture
def patient_broker() -> Iterator[BrokerThread]:
    # Long connect timeout, smallest outbound bound and send buffer: a close seen quickly
    # comes from the bounds under test.
    config = bridge_config(
        broker={"connect_timeout_s": 120, "max_outbound_bytes": 4096, "socket_send_buffer_bytes": 4096}
    )
    with BrokerThread(config) as running:
        yield running


def flood(sock: socket.socket, frame: bytes, count: int, deadline_s: float = DEADLINE_S) -> bool:
    """Send ``frame`` ``count`` times without reading; True if the broker closed on us first."""
    batch = frame * 1000
    deadline = time.monotonic() + deadline_s
    sent = 0
    try:
        while sent < count and time.monotonic() < deadline:
            sock.sendall(batch)
            sent += 1000
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def test_pings_before_connect_are_capped(patient_broker: BrokerThread) -> None:
    sock = raw_ws(patient_broker.ws_port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    closed = flood(sock, masked_frame(b"p" * 125, OP_PING), 20_000)
    assert closed or closed_by_peer(sock)
    sock.close()


def test_a_few_pings_before_connect_are_answered_and_login_works(patient_broker: BrokerThread) -> None:
    sock = raw_ws(patient_broker.ws_port)
    for _ in range(PREAUTH_PINGS):
        sock.sendall(masked_frame(b"hi", OP_PING))
    sock.sendall(masked_frame(authed_connect(unique("pinger"), role="subscriber")))
    received = b""
    while b"\x82\x04\x20\x02\x00\x00" not in received:  # the CONNACK's binary frame
        chunk = sock.recv(4096)
        assert chunk, f"closed; got {received!r}"
        received += chunk
    assert received.count(b"\x8a\x02hi") == PREAUTH_PINGS  # every ping got its pong
    sock.close()


def test_a_message_over_the_connect_budget_before_login_closes(patient_broker: BrokerThread) -> None:
    broker = patient_broker
    sock = raw_ws(broker.ws_port)
    budget = broker.call(lambda: broker.broker._connect_budget)
    # Refused from the frame header: the payload is never sent, let alone buffered.
    header = bytes((0x82, 0xFF)) + (budget + 1).to_bytes(8, "big") + b"mask"
    sock.sendall(header)
    # websockets answers with a close frame, 1009 (message too big), and waits for ours.
    close = sock.recv(4)
    assert (close[0], close[2:]) == (0x88, (1009).to_bytes(2, "big"))
    sock.close()  # the server failed the connection: the client closes TCP (RFC 6455 7.1.1)
    wait_until(lambda: broker.call(lambda: broker.broker.stats.refusals["too_large"]) == 1, what="refusal")


def test_unread_pongs_after_login_close_the_connection(patient_broker: BrokerThread) -> None:
    broker = patient_broker
    sock = raw_ws(broker.ws_port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(masked_frame(authed_connect(unique("pongs"), role="subscriber")))
    assert sock.recv(6) == b"\x82\x04\x20\x02\x00\x00"
    # 125-byte pings, never reading the pongs: past ~1 MB unread the broker gives up.
    closed = flood(sock, masked_frame(b"p" * 125, OP_PING), 200_000)
    assert closed or closed_by_peer(sock)
    wait_until(lambda: broker.call(lambda: broker.broker.stats.connections) == 0, what="closed")
    sock.close()


CONNACK_FRAME = b"\x82\x04\x20\x02\x00\x00"


def _logged_in(port: int, name: str, role: Role = "admin") -> socket.socket:
    sock = raw_ws(port)
    sock.sendall(masked_frame(authed_connect(unique(name), role=role)))
    assert _recv_exactly(sock, 6) == CONNACK_FRAME
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed; got {data!r}"
        data += chunk
    return data


def _connections(broker: BrokerThread) -> list[WsConnection]:
    def listed() -> list[WsConnection]:
        listener = broker.broker._servers["ws"].instance
        assert isinstance(listener, WsListener)
        return list(listener.connections)

    return broker.call(listed)


def test_an_open_connection_keeps_nothing_of_its_handshake_and_still_works(broker: BrokerThread) -> None:
    sock = _logged_in(broker.ws_port, "slim")
    (connection,) = _connections(broker)
    # websockets' protocol (and the request its parser held) is gone; our frame reader is left.
    assert broker.call(lambda: (connection._ws, type(connection._frames))) == (None, FrameReader)
    # Frames still flow both ways through the restarted parser.
    topic = f"chat/{unique('room')}"
    sock.sendall(masked_frame(subscribe_packet(1, topic)))
    assert _recv_exactly(sock, 7) == b"\x82\x05\x90\x03\x00\x01\x00"
    packet = publish_qos0(topic.encode(), b"hello")
    sock.sendall(masked_frame(packet))
    assert _recv_exactly(sock, 2 + len(packet)) == bytes((0x82, len(packet))) + packet
    sock.close()


def test_pings_go_out_only_when_the_listener_asks() -> None:
    config = bridge_config(listeners={"ws": {"port": 0, "ping_interval_s": 0.2}, "tcp": {"port": 0}})
    with BrokerThread(config) as running:
        sock = _logged_in(running.ws_port, "pinged", role="subscriber")
        header = _recv_exactly(sock, 2)
        assert header == bytes((0x89, 12))  # a ping: the send time and 4 random bytes
        payload = _recv_exactly(sock, 12)
        sock.sendall(masked_frame(payload, 0xA))  # answered: the connection stays
        assert _recv_exactly(sock, 2) == bytes((0x89, 12))
        sock.close()


def test_a_closing_listener_ends_its_connections_with_1001(broker: BrokerThread) -> None:
    sock = _logged_in(broker.ws_port, "drained", role="subscriber")
    # The drain waits for the closing handshake, which this thread completes.
    drain = threading.Thread(target=broker.run, args=(broker.broker.drain(1.0),))
    drain.start()
    close = _recv_exactly(sock, 4)
    assert (close[0], close[2:]) == (0x88, (1001).to_bytes(2, "big"))
    sock.sendall(masked_frame(close[2:], 0x8))
    assert closed_by_peer(sock)  # the broker half-closes; the client then closes TCP
    sock.close()
    drain.join(DEADLINE_S)
    assert not drain.is_alive()


# --- TLS: the same protocols under asyncio's TLS transport --------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certfile, keyfile


def test_tls_listeners_serve_websocket_and_tcp_clients(tmp_path: Path) -> None:
    certfile, keyfile = _self_signed(tmp_path)
    tls = {"certfile": str(certfile), "keyfile": str(keyfile)}
    config = bridge_config(listeners={"ws": {"port": 0, "tls": tls}, "tcp": {"port": 0, "tls": tls}})
    client_tls = ssl.create_default_context(cafile=str(certfile))
    with BrokerThread(config) as running:
        with ws_connect(
            f"wss://127.0.0.1:{running.ws_port}/mqtt",
            subprotocols=["mqtt"],  # type: ignore[list-item]
            ssl=client_tls,
            open_timeout=DEADLINE_S,
        ) as ws:
            ws.send(authed_connect(unique("wss"), role="subscriber"))
            assert ws.recv(timeout=DEADLINE_S) == b"\x20\x02\x00\x00"
        raw = socket.create_connection(("127.0.0.1", running.tcp_port), timeout=DEADLINE_S)
        with client_tls.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(authed_connect(unique("tls"), role="subscriber"))
            assert _recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        wait_until(lambda: running.call(lambda: running.broker.stats.connections) == 0, what="both closed")


# -- browser settings: the Origin allowlist and X-Forwarded-For from trusted proxies ----------


def _upgrade(port: int, headers: dict[str, str] | list[tuple[str, str]]) -> tuple[int, socket.socket]:
    """A WebSocket handshake with extra headers: the status code and the socket."""
    request, _ = handshake_request("127.0.0.1", port, "/mqtt")
    items = headers.items() if isinstance(headers, dict) else headers
    extra = "".join(f"{name}: {value}\r\n" for name, value in items).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(request[:-2] + extra + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {head!r}"
        head += chunk
    return int(head.split(b" ", 2)[1]), sock


@pytest.fixture
def guarded() -> Iterator[BrokerThread]:
    listeners = {
        "ws": {
            "port": 0,
            "allowed_origins": ["https://dash.example.com"],
            "trusted_proxies": ["127.0.0.1/32"],
        },
        "tcp": {"port": 0},
    }
    with BrokerThread(bridge_config(listeners=listeners, http={"port": 0})) as running:
        yield running


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "http://dash.example.com",
        "https://dash.example.com.evil.com",
        "null",
        "https://dash.example.com/",
    ],
)
def test_a_page_from_another_origin_gets_403_before_the_upgrade(guarded: BrokerThread, origin: str) -> None:
    status, sock = _upgrade(guarded.ws_port, {"Origin": origin})
    assert status == 403
    assert closed_by_peer(sock)
    sock.close()
    listener = guarded.broker._servers["ws"].instance
    assert isinstance(listener, WsListener)
    assert guarded.call(lambda: listener.refused_origins) == 1
    assert guarded.call(lambda: guarded.broker.stats.refusals["ws_origin"]) == 1


def test_two_origin_headers_get_403(guarded: BrokerThread) -> None:
    status, sock = _upgrade(
        guarded.ws_port, [("Origin", "https://dash.example.com"), ("Origin", "https://evil.example.com")]
    )
    assert status == 403
    sock.close()


@pytest.mark.parametrize("headers", [{"Origin": "https://DASH.example.com:443"}, {}])
def test_an_allowed_origin_or_none_gets_101_and_logs_in(
    guarded: BrokerThread, headers: dict[str, str]
) -> None:
    status, sock = _upgrade(guarded.ws_port, headers)
    assert status == 101
    sock.sendall(masked_frame(authed_connect(unique("page"))))
    assert _recv_exactly(sock, 6) == CONNACK_FRAME
    sock.close()


def test_any_origin_is_allowed_without_a_list(broker: BrokerThread) -> None:
    status, sock = _upgrade(broker.ws_port, {"Origin": "https://anywhere.example.com"})
    assert status == 101
    sock.close()


def _remote_of(broker: BrokerThread, client_id: str) -> str:
    rows = broker.call(broker.broker.connection_list)
    return str(next(row["remote"] for row in rows if row["client_id"] == client_id))


@pytest.mark.parametrize(
    ("xff", "remote"),
    [
        ("203.0.113.9", "203.0.113.9:0"),
        ("6.6.6.6, 203.0.113.9", "203.0.113.9:0"),  # what the client wrote itself is not read
        ("[2001:db8::9]:443", "2001:db8::9:0"),
        ("garbage", None),  # the proxy's own address (the peer)
    ],
)
def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(
    guarded: BrokerThread, xff: str, remote: str | None
) -> None:
    status, sock = _upgrade(guarded.ws_port, {"X-Forwarded-For": xff})
    assert status == 101
    client_id = unique("behind-proxy")
    sock.sendall(masked_frame(authed_connect(client_id)))
    assert _recv_exactly(sock, 6) == CONNACK_FRAME
    local_port = sock.getsockname()[1]
    assert _remote_of(guarded, client_id) == (remote or f"127.0.0.1:{local_port}")
    sock.close()


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    listeners = {"ws": {"port": 0, "trusted_proxies": ["10.0.0.0/8"]}, "tcp": {"port": 0}}
    with BrokerThread(bridge_config(listeners=listeners)) as running:
        status, sock = _upgrade(running.ws_port, {"X-Forwarded-For": "203.0.113.9"})
        assert status == 101
        client_id = unique("spoofer")
        sock.sendall(masked_frame(authed_connect(client_id)))
        assert _recv_exactly(sock, 6) == CONNACK_FRAME
        assert _remote_of(running, client_id) == f"127.0.0.1:{sock.getsockname()[1]}"
        sock.close()


@pytest.mark.parametrize(
    ("ws", "field"),
    [
        ({"allowed_origins": ["https://dash.example.com/app"]}, "listeners.ws.allowed_origins"),
        ({"allowed_origins": ["*"]}, "listeners.ws.allowed_origins"),
        ({"allowed_origins": ["null"]}, "listeners.ws.allowed_origins"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "listeners.ws.trusted_proxies"),
        ({"trusted_proxies": ["proxy.internal"]}, "listeners.ws.trusted_proxies"),
        ({"trusted_proxies": "10.0.0.0/8"}, "listeners.ws.trusted_proxies"),
        ({"trusted_proxies": ["10.0.0.0/8"], "forwarded": True}, "listeners.ws.forwarded"),
    ],
)
def test_bad_browser_settings_fail_at_startup_naming_the_field(
    tmp_path: Path, ws: dict[str, object], field: str
) -> None:
    path = tmp_path / "bridge.yaml"
    keys = [{"secret": "0123456789abcdef0123456789abcdef", "algorithms": ["HS256"]}]
    path.write_text(json.dumps({"auth": {"keys": keys}, "listeners": {"ws": ws}}))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.field == field
    assert "\n" not in str(raised.value)


def test_browser_settings_are_normalised_and_off_by_default() -> None:
    assert (bridge_config().listeners.ws.allowed_origins, bridge_config().listeners.ws.trusted_proxies) == (
        None,
        [],
    )
    ws = {
        "port": 0,
        "allowed_origins": ["HTTPS://Dash.Example.com:443"],
        "trusted_proxies": ["10.0.0.0/8", "::1"],
    }
    config = bridge_config(listeners={"ws": ws})
    assert config.listeners.ws.allowed_origins == ["https://dash.example.com"]
    assert config.listeners.ws.trusted_proxies == ["10.0.0.0/8", "::1/128"]
