"""Vanilla amqtt 0.12.1, the baseline: a plain ``amqtt.broker.Broker`` with a TCP and a WebSocket listener.

amqtt's default plugin set (event and packet loggers, anonymous auth allowing anonymous
clients, $SYS every 20 s): what ``amqtt`` users get out of the box. Logging at WARNING so
the loggers cost what they cost in production. Runs until SIGTERM or SIGINT.

    python -m bench.vanilla_amqtt --tcp-port 1883 --ws-port 8083
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from amqtt.broker import Broker


async def serve(tcp_port: int, ws_port: int) -> None:
    broker = Broker(
        {
            "listeners": {
                "default": {"type": "tcp", "bind": f"127.0.0.1:{tcp_port}"},
                "ws": {"type": "ws", "bind": f"127.0.0.1:{ws_port}"},
            }
        }
    )
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.tcp_port, args.ws_port))


if __name__ == "__main__":
    main()
