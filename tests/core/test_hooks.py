"""The hook registry: plugins attach by method name and are called in registration order."""

from __future__ import annotations

import pytest

from bridge.core.hooks import Admitted, ConnectRequest, Hooks, Refused
from bridge.core.tick import TickParts

REQUEST = ConnectRequest("c1", "alice", b"t", True, "ws", "127.0.0.1:1", 0.0)
ALICE = Admitted("alice")


class Yes:
    def on_connect(self, request: ConnectRequest) -> Admitted:
        return Admitted(request.username or "")


class No:
    def on_connect(self, request: ConnectRequest) -> Refused:
        return Refused(5, "not_authorized", "no")


class Abstain:
    def on_connect(self, request: ConnectRequest) -> None:
        return None


class CapQos1:
    def on_subscribe(self, admitted: Admitted, topic_filter: str, qos: int) -> int:
        return min(qos, 1)


class DenyUser:
    def on_subscribe(self, admitted: Admitted, topic_filter: str, qos: int) -> int:
        return 0x80 if topic_filter.startswith("user/") else qos

    def on_publish(self, admitted: Admitted, topic: str) -> bool:
        return not topic.startswith("user/")


class Counting:
    """Holds at most one connection per user; on_release gives the slot back."""

    def __init__(self) -> None:
        self.held: dict[str, object] = {}

    async def on_lease(self, user: str, replacing: object | None) -> object | Refused:
        if user in self.held and self.held[user] is not replacing:
            return Refused(3, "user_limit", f"{user} holds one")
        lease = self.held[user] = object()
        return lease

    async def on_release(self, lease: object) -> None:
        self.held = {user: held for user, held in self.held.items() if held is not lease}


class Upper:
    def on_deliver(self, payload: bytes, zone: str | None, topic: str) -> bytes:
        return payload.upper()


class Suffix:
    def on_deliver(self, payload: bytes, zone: str | None, topic: str) -> bytes:
        return payload + (zone or "UTC").encode()


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        ([], None),
        ([Abstain()], None),
        ([Yes()], ALICE),
        ([Abstain(), No(), Yes()], Refused(5, "not_authorized", "no")),
        ([Yes(), No()], ALICE),
    ],
)
def test_on_connect_first_opinion_wins(plugins: list[object], expected: object) -> None:
    assert Hooks(plugins).on_connect(REQUEST) == expected


@pytest.mark.parametrize(
    ("topic_filter", "qos", "granted"),
    [("market/#", 2, 1), ("market/#", 0, 0), ("user/bob/#", 1, 0x80)],
)
def test_on_subscribe_chains_grants(topic_filter: str, qos: int, granted: int) -> None:
    assert Hooks([CapQos1(), DenyUser()]).on_subscribe(ALICE, topic_filter, qos) == granted


@pytest.mark.parametrize(("topic", "allowed"), [("market/luno/XBTZAR", True), ("user/bob/x", False)])
def test_on_publish_needs_every_plugin(topic: str, allowed: bool) -> None:
    assert Hooks([DenyUser()]).on_publish(ALICE, topic) is allowed
    assert Hooks().on_publish(ALICE, topic) is True


def test_on_deliver_runs_in_registration_order() -> None:
    assert Hooks([Upper(), Suffix()]).on_deliver(b"x", "Africa/Lagos", "t") == b"XAfrica/Lagos"
    assert Hooks([Suffix(), Upper()]).on_deliver(b"x", None, "t") == b"XUTC"


def test_a_plugin_without_hooks_is_refused() -> None:
    with pytest.raises(TypeError, match="none of the hooks"):
        Hooks([object()])


async def test_on_lease_first_holder_decides_and_release_frees() -> None:
    counting = Counting()
    hooks = Hooks([Abstain(), counting])
    first = await hooks.on_lease("alice", None)
    assert not isinstance(first, Refused)
    assert first is not None
    assert await hooks.on_lease("alice", None) == Refused(3, "user_limit", "alice holds one")
    second = await hooks.on_lease("alice", first)  # a takeover transfers the slot
    assert not isinstance(second, Refused)
    assert second is not first
    await hooks.on_release(first)  # the old connection's late release frees nothing
    assert isinstance(await hooks.on_lease("alice", None), Refused)
    await hooks.on_release(second)
    await hooks.on_release(None)
    assert not isinstance(await hooks.on_lease("alice", None), Refused)


async def test_without_a_lease_plugin_nothing_is_counted() -> None:
    assert await Hooks([Yes()]).on_lease("alice", None) is None


class FastTick:
    def on_deliver(self, payload: bytes, zone: str | None, topic: str) -> bytes:
        return b"slow:" + payload

    def on_deliver_tick(self, parts: TickParts, zone: str | None, topic: str) -> bytes:
        return b"fast:" + parts.data


def test_on_deliver_tick_takes_the_first_plugins_fast_path_then_chains() -> None:
    parts = TickParts(b"{}", b"{", "2026-01-01T00:00:00Z", b"}", 0, 0)
    assert Hooks().on_deliver_tick(parts, "Africa/Lagos", "t") == b"{}"
    assert Hooks([FastTick(), Suffix()]).on_deliver_tick(parts, "Africa/Cairo", "t") == b"fast:{}Africa/Cairo"
    assert Hooks([Suffix(), FastTick()]).on_deliver_tick(parts, None, "t") == b"slow:{}UTC"


class BatchTicks(FastTick):
    def on_deliver_ticks(self, ticks: list[tuple[str, TickParts]], zone: str) -> list[bytes]:
        return [b"batch:" + parts.data + topic.encode() for topic, parts in ticks]


def test_on_deliver_ticks_takes_the_first_plugins_batch_then_chains_each() -> None:
    ticks = [("a", TickParts(b"{1}", b"{", "", b"1}", 0, 0)), ("b", TickParts(b"{2}", b"{", "", b"2}", 0, 0))]
    assert Hooks().on_deliver_ticks(ticks, "Africa/Lagos") == [b"{1}", b"{2}"]
    assert Hooks([BatchTicks(), Suffix()]).on_deliver_ticks(ticks, "Africa/Cairo") == [
        b"batch:{1}aAfrica/Cairo",
        b"batch:{2}bAfrica/Cairo",
    ]
    # A first plugin without a batch: its per-tick fast path, tick by tick.
    assert Hooks([FastTick(), Suffix()]).on_deliver_ticks(ticks, "UTC") == [b"fast:{1}UTC", b"fast:{2}UTC"]
