"""Run the bridge: the broker plus its configured feeds, until asked to stop.

Lifetimes nest: the broker is started and always shut down by ``async with``; the feeds run
in a TaskGroup inside it, one named task each. Stopping cancels the feeds first, then the
broker closes its listeners and clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from bridge.config import BridgeConfig, FeedConfig, PollerFeedConfig, ReplayFeedConfig, SimulatorFeedConfig
from bridge.core.origin import dashboard_origins
from bridge.edge.broker import MarketBroker
from bridge.errors import ConfigError, FeedError
from bridge.http import HttpServer
from feeds.base import Feed, TickSink
from feeds.poller import SPECS, HttpPoller
from feeds.replay import ReplayFeed
from feeds.simulator import SimulatorFeed

__all__ = ["build_feed", "pump", "raise_open_files_limit", "run", "serve", "tune_gc"]

log = logging.getLogger(__name__)

# Young-generation threshold once serving (CPython's default is 700). A CONNECT allocates
# thousands of container objects, so at 700 several young and middle collections ran per
# connection, each also walking survivors of every connection before it. In a storm of
# 10,000 WebSocket connections this was ~0.3-0.5 ms of broker CPU per connection; the cost
# is cyclic garbage living a little longer (at most this many objects' worth).
GC_GEN0_THRESHOLD = 20_000

T = TypeVar("T")


def loop_factory(event_loop: Literal["asyncio", "uvloop"]) -> Callable[[], asyncio.AbstractEventLoop]:
    """``broker.event_loop`` as a loop factory; a missing uvloop is a config error."""
    if event_loop == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        raise ConfigError("broker.event_loop", "uvloop is not installed (pip install uvloop)") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], event_loop: Literal["asyncio", "uvloop"] = "asyncio") -> T:
    """``asyncio.run`` on the configured event loop."""
    try:
        factory = loop_factory(event_loop)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def build_feed(config: FeedConfig, index: int = 0) -> Feed:
    """One feed from its config entry; errors name ``feeds.<index>``."""
    try:
        if isinstance(config, SimulatorFeedConfig):
            markets = [tuple(m.split("/", 1)) for m in config.markets] or None
            return SimulatorFeed(
                markets=[(e, p) for e, p in markets] if markets else None,
                interval_s=config.interval_s,
                seed=config.seed,
            )
        if isinstance(config, ReplayFeedConfig):
            return ReplayFeed(config.path, speed=config.speed, loop=config.loop)
        assert isinstance(config, PollerFeedConfig)
        return HttpPoller(
            spec=SPECS[config.kind],
            base_url=str(config.base_url),
            pairs=config.pairs or None,
            interval_s=config.interval_s,
        )
    except FeedError as exc:
        raise ConfigError(f"feeds.{index}", exc.message) from None


async def pump(feed: Feed, sink: TickSink) -> None:
    """Move ticks from a feed into a sink; a broken feed ends alone, never the broker."""
    count = 0
    try:
        async for tick in feed.ticks():
            await sink.publish(tick)
            count += 1
    except FeedError as exc:
        log.error("feed %s stopped: %s", feed.name, exc)
    log.info("feed %s ended after %d ticks", feed.name, count)


# File descriptors the broker needs besides its clients: listeners, store, HTTP, logs.
FD_HEADROOM = 256


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every client holds a file descriptor.

    Many systems start processes at a soft limit of 1024, which would refuse clients (EMFILE
    in accept) long before ``limits.max_connections``. Returns the soft limit now in force
    and warns when it is still below ``max_connections`` plus headroom.
    """
    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit (above fs.nr_open): then ask for what is needed.
    target = hard if hard != unlimited else max(soft, max_connections + FD_HEADROOM)
    if soft != unlimited and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("open files limit raised from %d to %d", soft, target)
            soft = target
    if soft != unlimited and soft < max_connections + FD_HEADROOM:
        log.warning(
            "open files limit %d is below limits.max_connections %d + %d: clients past ~%d will be"
            " refused by the OS (raise the hard limit, e.g. LimitNOFILE= or ulimit -Hn)",
            soft,
            max_connections,
            FD_HEADROOM,
            max(0, soft - FD_HEADROOM),
        )
    return soft


def tune_gc() -> None:
    """Startup is done: what it built lives for the process, so the collector stops walking
    it (``gc.freeze``), and young collections run every :data:`GC_GEN0_THRESHOLD` objects."""
    gc.collect()  # startup's garbage first: frozen objects are never collected
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, middle, old)
    log.info("gc: %d startup objects frozen, thresholds %s", gc.get_freeze_count(), gc.get_threshold())


async def serve(
    config: BridgeConfig,
    *,
    stop: asyncio.Event,
    on_ready: Callable[[MarketBroker, HttpServer | None], None] | None = None,
) -> None:
    """Run broker, HTTP surface and feeds until ``stop`` is set, then stop gracefully.

    Order on stop: feeds end; the broker drains (readiness turns 503 at once, listeners close,
    in-flight deliveries get ``broker.drain_timeout_s``, snapshots are flushed); the HTTP
    server stops; the broker closes its sessions and the store.
    """
    feeds = [build_feed(entry, index) for index, entry in enumerate(config.feeds)]
    raise_open_files_limit(config.limits.max_connections)
    log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
    broker = MarketBroker(config)
    async with broker.running(), contextlib.AsyncExitStack() as stack:
        http = None
        if config.http.enabled:
            http = await stack.enter_async_context(HttpServer(broker, config.http.host, config.http.port))
            if broker.ws_origins is not None:  # the dashboard's page may use the WebSocket
                broker.ws_origins.allow(dashboard_origins(config.http.host, http.port))
        tune_gc()
        if on_ready is not None:
            on_ready(broker, http)
        # Everything loaded so far (modules, config, the restored sessions) lives as long as
        # the process: keep it out of the cyclic collector's full passes, which otherwise
        # walked it every few thousand messages (~3 us of each stored message's time).
        gc.freeze()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(pump(feed, broker), name=f"feed:{feed.name}") for feed in feeds]
            if http is not None:
                tasks.append(group.create_task(http.metrics.lag.run(), name="loop-lag"))
            await stop.wait()
            log.info("stopping: %d feed(s), then draining the broker", len(feeds))
            for task in tasks:
                task.cancel()
        await broker.drain(config.broker.drain_timeout_s)
