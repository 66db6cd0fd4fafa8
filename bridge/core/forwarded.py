"""The client's address behind trusted reverse proxies (``X-Forwarded-For``), pure.

Behind a proxy every connection comes from the proxy's address; the proxy appends the address
it was connected from to ``X-Forwarded-For``. Anyone can send that header, so it is believed
only as far as the chain of trusted proxies goes:

- the TCP peer is not in ``trusted`` (a list of networks): the header is ignored, whatever it
  says (a client cannot choose its own address);
- otherwise walk the header from the right (the nearest hop first): each trusted address
  passes the question on to the entry left of it; the first untrusted address is the
  client. Entries left of it were written by the client and are never read.
- Bounded: only the last :data:`MAX_XFF_CHARS` characters and :data:`MAX_HOPS` entries are
  read. An entry that is not an address (garbage, a name, ``unknown``), or running out of
  entries or of hops while every address was trusted, ends the walk at the last trusted
  address: the most that can be vouched for.

Entries may be ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1`` or ``[2001:db8::1]:443``;
several headers are read as one list, in order. IPv4-mapped IPv6 addresses
(``::ffff:10.0.0.1``, from a dual-stack socket) count as their IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = [
    "MAX_HOPS",
    "MAX_XFF_CHARS",
    "Network",
    "TrustedProxies",
    "client_address",
    "parse_address",
    "parse_networks",
]

MAX_XFF_CHARS = 2048
MAX_HOPS = 16

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "::1"]`` as networks (a bare address is a one-address network);
    raises ValueError naming the first bad entry (config validation)."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{cidr[:64]!r} is not an IP network in CIDR form ({exc})") from None
    return tuple(networks)


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_address(entry: str) -> Address | None:
    """One ``X-Forwarded-For`` entry (or a socket's peer address) as an address, port and
    brackets dropped; None for anything else. Never raises."""
    text = entry.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        text, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    elif text.count(":") == 1:  # IPv4 with a port (a bare IPv6 has two colons or more)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    if "%" in text:  # a zone index means nothing beyond the proxy's host
        return None
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


class TrustedProxies:
    """The trusted networks, as integers: ``address in networks`` is a few integer operations
    per network instead of ipaddress's object comparisons (16 hops cost 170 µs that way)."""

    __slots__ = ("_masks", "networks")

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)
        self._masks = tuple((n.version, int(n.network_address), int(n.netmask)) for n in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: Address) -> bool:
        value, version = int(address), address.version
        return any(version == v and value & mask == network for v, network, mask in self._masks)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The address to use for the connection from ``peer`` (see the module docstring):
    ``peer`` itself unless it is a trusted proxy. Never raises."""
    if not trusted or not forwarded_for:
        return peer
    current = parse_address(peer)
    if current is None or current not in trusted:
        return peer
    header = ",".join(forwarded_for)[-MAX_XFF_CHARS:]
    # Cut from the right: a cut-off left-most entry is garbage, which ends the walk anyway.
    entries = header.rsplit(",", MAX_HOPS)[-MAX_HOPS:]
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            break
        current = address
        if address not in trusted:
            break
    return str(current)
