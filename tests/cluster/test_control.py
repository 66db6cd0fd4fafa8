"""bridge.cluster.control: the command codec table-driven; commands across two "nodes" on a
real Redis Cluster."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable

import pytest

from bridge import redis_keys as keys
from bridge.cluster.backbone import Backbone
from bridge.cluster.control import (
    ControlError,
    ControlListener,
    TakeoverNotice,
    UserMail,
    decode_control,
    encode_control,
    send_control,
)

pytestmark = pytest.mark.timeout(60)
DEADLINE_S = 20.0
MAX = 1024


@pytest.mark.parametrize(
    "command",
    [
        TakeoverNotice("c1", "a:1", "b"),
        TakeoverNotice('we"ird\n{}', "a:99", "node-2"),
        UserMail("alice", "user/alice/alerts", b'{"x":1}', 1, True, "n1"),
        UserMail("b\u00f6b", "user/b\u00f6b/t", bytes(range(256)), 0, False, "n2"),
        UserMail("carol", "user/carol/t", b"", 2, False, "n3"),
        UserMail("dave", "user/dave/t", b"x" * MAX, 1, True, "n4"),
    ],
)
def test_control_round_trip(command: TakeoverNotice | UserMail) -> None:
    assert decode_control(encode_control(command), max_payload=MAX) == command


def _mail(**fields: object) -> bytes:
    data: dict[str, object] = {
        "op": "mail",
        "user": "u",
        "topic": "user/u/t",
        "payload": "",
        "qos": 1,
        "stored": False,
        "by": "n",
    } | fields
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        (b"", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "close or mail"),
        (b'{"op": "open"}', "close or mail"),
        (b'{"op": "close", "client_id": 1, "lease": "x", "by": "b"}', "strings"),
        (b'{"op": "close", "client_id": "c"}', "strings"),
        (b'{"op":"close","client_id":"' + b"x" * 5000 + b'"}', "bytes"),
        (_mail(user=None), "strings"),
        (_mail(qos=3), "qos"),
        (_mail(qos=True), "qos"),
        (_mail(stored="yes"), "stored"),
        (_mail(payload="***"), "base64"),
        (_mail(payload=base64.b64encode(b"x" * (MAX + 1)).decode()), "above"),
        (_mail(payload="A" * (MAX * 2 + 20_000)), "bytes"),
    ],
)
def test_bad_control_messages(raw: bytes, mentions: str) -> None:
    with pytest.raises(ControlError, match=mentions):
        decode_control(raw, max_payload=MAX)


def test_a_node_without_mail_takes_no_mail() -> None:
    with pytest.raises(ControlError, match="above 0"):
        decode_control(encode_control(UserMail("u", "user/u/t", b"x", 1, False, "n")))


async def test_commands_reach_the_node_and_garbage_is_counted(make_backbone: Callable[[], Backbone]) -> None:
    closes: list[TakeoverNotice] = []
    mails: list[UserMail] = []
    arrived = asyncio.Event()

    def on_close(notice: TakeoverNotice) -> None:
        closes.append(notice)

    def on_mail(mail: UserMail) -> None:
        mails.append(mail)
        arrived.set()

    def explode(_mail: UserMail) -> None:
        raise RuntimeError("a bug in a handler")

    sender, receiver = make_backbone(), make_backbone()
    await sender.connect()
    await receiver.connect()
    listener = ControlListener(receiver, node_id="a", on_close=on_close, on_mail=on_mail, max_payload=MAX)
    await listener.start()
    try:
        assert await send_control(sender, "nobody", b"{}") == 0
        await sender.redis.spublish(keys.node_control("a"), b'{"op": "explode"}')
        await send_control(sender, "a", encode_control(TakeoverNotice("c", "a:1", "b")))
        mail = UserMail("alice", "user/alice/t", b"hello", 1, True, "b")
        assert await send_control(sender, "a", encode_control(mail)) == 1
        async with asyncio.timeout(DEADLINE_S):
            await arrived.wait()
        assert (closes, mails, listener.bad_messages) == ([TakeoverNotice("c", "a:1", "b")], [mail], 1)
        # A handler that raises is logged; the listener keeps going.
        listener._on_mail = explode
        await send_control(sender, "a", encode_control(mail))
        listener._on_mail = on_mail
        arrived.clear()
        await send_control(sender, "a", encode_control(mail))
        async with asyncio.timeout(DEADLINE_S):
            await arrived.wait()
        assert len(mails) == 2
    finally:
        await listener.stop()
