"""``make cluster-demo``: a local Redis Cluster (3 masters + 3 replicas, bridge/cluster/local.py),
three broker nodes of one cluster on their own (free) ports, the configured feeds (the
simulator in config/bridge.yaml) on node 1 only; prints each node's connect lines and a token,
and stops everything on Ctrl-C. A subscriber on node 3 sees the ticks fed on node 1.

The nodes run in this one process (one event loop), each a full broker with its own
listeners, HTTP surface and store; only Redis connects them, exactly as separate processes or
hosts would be. Their stores are SQLite files unless the config's store is a Redis (then shared,
and persistent sessions move between nodes).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path

from bridge.cli import connect_banner
from bridge.cluster.local import RedisCluster
from bridge.config import DEFAULT_CONFIG_PATH, DEV_SECRET_PATH, BridgeConfig, ClusterConfig, load_config
from bridge.edge.broker import MarketBroker
from bridge.errors import MarketBridgeError
from bridge.http import HttpServer
from bridge.keys import generate_dev_secret
from bridge.logs import setup_logging
from bridge.runtime import run, serve

__all__ = ["NODES", "main", "node_configs", "run_nodes"]

NODES = 3

OnReady = Callable[[int, MarketBroker, HttpServer | None], None]


def node_configs(
    base: BridgeConfig, seeds: Sequence[str], workdir: Path, nodes: int = NODES
) -> list[BridgeConfig]:
    """``base`` as ``nodes`` cluster nodes: ``node1``.. on free ports, feeds on node 1 only."""
    configs = []
    for number in range(1, nodes + 1):
        listeners = base.listeners.model_copy(
            update={
                "ws": base.listeners.ws.model_copy(update={"port": 0}),
                "tcp": base.listeners.tcp.model_copy(update={"port": 0}),
            }
        )
        store = base.store
        if store.redis_url is None:
            store = store.model_copy(update={"path": workdir / f"node{number}.sqlite3"})
        cluster = ClusterConfig(enabled=True, node_id=f"node{number}", redis_cluster_nodes=list(seeds))
        configs.append(
            base.model_copy(
                update={
                    "cluster": cluster,
                    "listeners": listeners,
                    "http": base.http.model_copy(update={"port": 0}),
                    "store": store,
                    "feeds": base.feeds if number == 1 else [],
                }
            )
        )
    return configs


async def run_nodes(configs: Sequence[BridgeConfig], *, stop: asyncio.Event, on_ready: OnReady) -> None:
    """Serve every node until ``stop`` is set (each stops gracefully, as ``market-bridge run``)."""
    async with asyncio.TaskGroup() as group:
        for index, config in enumerate(configs):
            group.create_task(
                serve(config, stop=stop, on_ready=partial(on_ready, index)), name=f"node{index + 1}"
            )


async def _demo(configs: list[BridgeConfig]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def ready(index: int, broker: MarketBroker, http: HttpServer | None) -> None:
        role = (
            "feeds: " + ", ".join(feed.kind for feed in configs[index].feeds)
            if configs[index].feeds
            else "no feed"
        )
        print(f"\n=== node{index + 1} ({role}) ===", flush=True)
        print(connect_banner(broker, configs[index], http), flush=True)

    await run_nodes(configs, stop=stop, on_ready=ready)


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    if not DEV_SECRET_PATH.exists():
        generate_dev_secret(DEV_SECRET_PATH)
        print(f"created a development JWT key at {DEV_SECRET_PATH}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="market-bridge-cluster-"))
    redis = None
    try:
        base = load_config(DEFAULT_CONFIG_PATH)
        setup_logging(base.logging)
        redis = RedisCluster(workdir / "redis")
        print("starting a local Redis Cluster (3 masters + 3 replicas) ...", flush=True)
        redis.start()
        print("Redis Cluster seeds: " + " ".join(redis.startup_nodes), flush=True)
        with suppress(KeyboardInterrupt):
            run(_demo(node_configs(base, redis.startup_nodes, workdir)), base.broker.event_loop)
        return 0
    except MarketBridgeError as exc:
        print(f"market-bridge cluster-demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
