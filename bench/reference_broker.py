"""A minimal QoS 0 fan-out server, to measure the load generator's own ceiling.

Not a broker to run for anything else: no auth, no topic matching (every subscriber gets
every PUBLISH), QoS 0 only, no retained messages, no keep-alive enforcement. It does the
least a broker can do per delivery: each read from a publisher is split into PUBLISH
packets, wrapped once in a single WebSocket frame, and written once to every subscriber.
So its CPU per delivery is a fraction of a microsecond, and the ``generator_ceiling``
scenario shows how many deliveries/s the generator can take in on this machine.

    python -m bench.reference_broker --tcp-port 1883 --ws-port 8083
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONNACK = b"\x20\x02\x00\x00"
PINGRESP = b"\xd0\x00"


def ws_frame(data: bytes) -> bytes:
    size = len(data)
    if size < 126:
        return bytes((0x82, size)) + data
    if size < 65536:
        return bytes((0x82, 126)) + size.to_bytes(2, "big") + data
    return bytes((0x82, 127)) + size.to_bytes(8, "big") + data


def unmask(key: bytes, payload: bytes) -> bytes:
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(size, "little")


class Hub:
    def __init__(self) -> None:
        self.subscribers: set[Connection] = set()

    def fan_out(self, packets: bytes) -> None:
        frame = ws_frame(packets)
        for subscriber in self.subscribers:
            subscriber.write_raw(frame if subscriber.websocket else packets)


class Connection(asyncio.Protocol):
    def __init__(self, hub: Hub, *, websocket: bool) -> None:
        self.hub = hub
        self.websocket = websocket
        self._transport: asyncio.Transport | None = None
        self._head: bytearray | None = bytearray() if websocket else None
        self._frames = b""
        self._mqtt = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.subscribers.discard(self)

    def write_raw(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def send(self, packet: bytes) -> None:
        self.write_raw(ws_frame(packet) if self.websocket else packet)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._upgrade(bytes(self._head[:end]))
            data = bytes(self._head[end + 4 :])
            self._head = None
        if self.websocket:
            data = self._unframe(data)
        self._packets(self._mqtt + data if self._mqtt else data)

    def _upgrade(self, head: bytes) -> None:
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        self.write_raw(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )

    def _unframe(self, data: bytes) -> bytes:
        buf = self._frames + data if self._frames else data
        parts: list[bytes] = []
        i = 0
        while len(buf) - i >= 6:
            size = buf[i + 1] & 0x7F
            start = i + 2
            if size == 126:
                if len(buf) - i < 8:
                    break
                size, start = int.from_bytes(buf[i + 2 : i + 4], "big"), i + 4
            elif size == 127:
                if len(buf) - i < 14:
                    break
                size, start = int.from_bytes(buf[i + 2 : i + 10], "big"), i + 10
            end = start + 4 + size
            if end > len(buf):
                break
            opcode = buf[i] & 0x0F
            if opcode == 0x8:
                self.close()
                return b""
            if opcode in (0x0, 0x2):
                parts.append(unmask(buf[start : start + 4], buf[start + 4 : end]))
            i = end
        self._frames = buf[i:]
        return b"".join(parts)

    def _packets(self, buf: bytes) -> None:
        publishes: list[bytes] = []
        disconnect = False
        i = 0
        while len(buf) - i >= 2:
            size, shift, at = 0, 0, i + 1
            while at < len(buf):
                byte = buf[at]
                size |= (byte & 0x7F) << shift
                at += 1
                if byte < 0x80:
                    break
                shift += 7
            else:
                break
            end = at + size
            if end > len(buf):
                break
            kind = buf[i] >> 4
            if kind == 3:
                publishes.append(buf[i:end])
            elif kind == 1:
                self.send(CONNACK)
            elif kind == 8:
                # SUBACK: same packet id, QoS 0 granted for each filter.
                filters, at = 0, at + 2
                while at < end:
                    at += 2 + (buf[at] << 8 | buf[at + 1]) + 1
                    filters += 1
                self.send(bytes((0x90, 2 + filters)) + buf[end - size : end - size + 2] + b"\x00" * filters)
                self.hub.subscribers.add(self)
            elif kind == 12:
                self.send(PINGRESP)
            elif kind == 14:
                disconnect = True
                break
            i = end
        self._mqtt = buf[i:]
        # Publishes read before a DISCONNECT still go out.
        if publishes:
            self.hub.fan_out(b"".join(publishes))
        if disconnect:
            self.close()

    def close(self) -> None:
        self.hub.subscribers.discard(self)
        if self._transport is not None:
            self._transport.close()


async def serve(tcp_port: int, ws_port: int) -> None:
    hub = Hub()
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(lambda: Connection(hub, websocket=False), "127.0.0.1", tcp_port)
    ws = await loop.create_server(lambda: Connection(hub, websocket=True), "127.0.0.1", ws_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    tcp.close()
    ws.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.tcp_port, args.ws_port))


if __name__ == "__main__":
    main()
