"""bridge.core.forwarded: the client's address behind trusted proxies, table-driven, with
the spoofing attempts it must resist."""

from __future__ import annotations

import pytest

from bridge.core.forwarded import (
    MAX_HOPS,
    MAX_XFF_CHARS,
    TrustedProxies,
    client_address,
    parse_address,
    parse_networks,
)

TRUSTED = TrustedProxies(parse_networks(["10.0.0.0/8", "127.0.0.1", "2001:db8:1::/48"]))


@pytest.mark.parametrize(
    ("entry", "address"),
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9 ", "203.0.113.9"),
        ("203.0.113.9:51234", "203.0.113.9"),
        ("2001:db8::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # a dual-stack socket's IPv4 peer
        ("unknown", None),
        ("", None),
        ("evil.example.com", None),
        ("203.0.113.9:x", None),
        ("203.0.113", None),
        ("[2001:db8::7", None),
        ("[2001:db8::7]x", None),
        ("fe80::1%eth0", None),
        ("1" * 100, None),
    ],
)
def test_parse_address(entry: str, address: str | None) -> None:
    parsed = parse_address(entry)
    assert (str(parsed) if parsed is not None else None) == address


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        # No proxy trusted or no header: the peer.
        ("198.51.100.1", [], "198.51.100.1"),
        ("10.0.0.5", [], "10.0.0.5"),
        # Spoofing: the header from a peer that is not a trusted proxy is ignored.
        ("198.51.100.1", ["203.0.113.9"], "198.51.100.1"),
        ("198.51.100.1", ["10.0.0.1"], "198.51.100.1"),
        # One trusted proxy: the address it appended.
        ("10.0.0.5", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.5", ["203.0.113.9:4711"], "203.0.113.9"),
        # Spoofing through the proxy: what the client wrote is left of the proxy's entry.
        ("10.0.0.5", ["6.6.6.6, 203.0.113.9"], "203.0.113.9"),
        ("10.0.0.5", ["6.6.6.6", "203.0.113.9"], "203.0.113.9"),  # two headers: one list
        ("10.0.0.5", ["10.0.0.9, 203.0.113.9"], "203.0.113.9"),  # a trusted-looking lie
        # Several trusted hops: the right-most untrusted address.
        ("10.0.0.5", ["6.6.6.6, 203.0.113.9, 10.0.0.7, 127.0.0.1"], "203.0.113.9"),
        ("127.0.0.1", ["203.0.113.9, 10.1.1.1"], "203.0.113.9"),
        # IPv6 hops and clients.
        ("2001:db8:1::2", ["[2001:db8:ffff::9]:5555"], "2001:db8:ffff::9"),
        ("2001:db8:1::2", ["203.0.113.9, 2001:db8:1::3"], "203.0.113.9"),
        ("::ffff:10.0.0.5", ["203.0.113.9"], "203.0.113.9"),
        # Garbage ends the walk at the last trusted address.
        ("10.0.0.5", ["not-an-ip"], "10.0.0.5"),
        ("10.0.0.5", ["203.0.113.9, garbage, 10.0.0.7"], "10.0.0.7"),
        ("10.0.0.5", [""], "10.0.0.5"),
        ("10.0.0.5", [",,,"], "10.0.0.5"),
        # Every entry trusted: the left-most of them (as far as can be vouched for).
        ("10.0.0.5", ["10.0.0.6, 10.0.0.7"], "10.0.0.6"),
        # A peer that is not an address (a Unix socket): as it is.
        ("", ["203.0.113.9"], ""),
    ],
)
def test_client_address(peer: str, xff: list[str], client: str) -> None:
    assert client_address(peer, xff, TRUSTED) == client


def test_nothing_trusted_ignores_the_header() -> None:
    assert client_address("10.0.0.5", ["203.0.113.9"], TrustedProxies()) == "10.0.0.5"


def test_many_hops_are_read_only_up_to_the_bound() -> None:
    hops = ", ".join(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(MAX_HOPS + 5))
    # Every hop trusted and more of them than the bound: the walk stops after MAX_HOPS.
    stopped = client_address("10.0.0.5", ["203.0.113.9, " + hops], TRUSTED)
    assert stopped != "203.0.113.9"
    assert stopped.startswith("10.")
    short = ", ".join(["10.0.0.7"] * (MAX_HOPS - 1))
    assert client_address("10.0.0.5", [f"203.0.113.9, {short}"], TRUSTED) == "203.0.113.9"


def test_a_huge_header_is_read_from_its_right_end_only() -> None:
    stuffed = "6.6.6.6, " * 50_000 + "203.0.113.9"
    assert len(stuffed) > MAX_XFF_CHARS
    assert client_address("10.0.0.5", [stuffed], TRUSTED) == "203.0.113.9"
    # A cut at the left end leaves a partial entry: garbage, never a fabricated address.
    cut = "1" * (MAX_XFF_CHARS - 5) + ".2.3.4, 10.0.0.7"
    assert client_address("10.0.0.5", [cut], TRUSTED) == "10.0.0.7"


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.0.0.1/8", "proxy.internal", ""])
def test_parse_networks_names_the_bad_entry(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an IP network"):
        parse_networks(["10.0.0.0/8", bad])
