"""bridge.core.origin: the WebSocket Origin allowlist, table-driven."""

from __future__ import annotations

import pytest

from bridge.core.origin import MAX_ORIGIN_CHARS, OriginPolicy, dashboard_origins, normalize_origin


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("https://dash.example.com", "https://dash.example.com"),
        ("HTTPS://Dash.Example.COM", "https://dash.example.com"),  # scheme and host: any case
        ("https://dash.example.com:443", "https://dash.example.com"),  # the default port
        ("http://dash.example.com:80", "http://dash.example.com"),
        ("http://dash.example.com:8080", "http://dash.example.com:8080"),
        ("https://dash.example.com:80", "https://dash.example.com:80"),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
        ("http://[::1]:8081", "http://[::1]:8081"),
        ("http://[0:0:0:0:0:0:0:1]:8081", "http://[::1]:8081"),
        ("null", None),
        ("", None),
        ("https://dash.example.com/", None),  # an origin has no path
        ("https://dash.example.com/app", None),
        ("https://dash.example.com?x=1", None),
        ("https://dash.example.com#x", None),
        ("https://user@dash.example.com", None),
        ("https://dash.example.com:", None),
        ("https://dash.example.com:99999", None),
        ("https://dash.example.com:x", None),
        ("ftp://dash.example.com", None),
        ("chrome-extension://abcdef", None),
        ("dash.example.com", None),
        ("https://", None),
        ("https://dash example.com", None),
        ("https://dash.example.com\r\nX-Evil: 1", None),
        ("https://dásh.example.com", None),  # browsers send IDNs in punycode
        ("http://[::zz]:80", None),
        ("https://" + "a" * MAX_ORIGIN_CHARS, None),
    ],
)
def test_normalize_origin(text: str, normal: str | None) -> None:
    assert normalize_origin(text) == normal


POLICY = OriginPolicy(["https://dash.example.com", "http://localhost:3000"])


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ([], None),  # not a browser: allowed
        (["https://dash.example.com"], None),
        (["https://DASH.example.com:443"], None),
        (["http://localhost:3000"], None),
        (["https://evil.example.com"], "Origin is not allowed"),
        (["http://dash.example.com"], "Origin is not allowed"),  # another scheme is another origin
        (["https://dash.example.com:8443"], "Origin is not allowed"),  # and another port
        (["https://dash.example.com.evil.com"], "Origin is not allowed"),
        (["https://evil.com/https://dash.example.com"], "Origin is not an http(s) origin"),
        (["null"], "Origin is not an http(s) origin"),
        (["https://dash.example.com", "https://evil.example.com"], "more than one Origin header"),
        (["https://dash.example.com", "https://dash.example.com"], "more than one Origin header"),
    ],
)
def test_origin_policy(values: list[str], refusal: str | None) -> None:
    assert POLICY.refusal(values) == refusal


def test_allow_adds_and_refuses_what_is_not_an_origin() -> None:
    policy = OriginPolicy([])
    assert policy.refusal(["http://127.0.0.1:8081"]) == "Origin is not allowed"
    policy.allow(dashboard_origins("127.0.0.1", 8081))
    assert policy.refusal(["http://127.0.0.1:8081"]) is None
    assert policy.refusal(["http://localhost:8081"]) is None
    with pytest.raises(ValueError, match="not an origin"):
        policy.allow(["https://dash.example.com/app"])


@pytest.mark.parametrize(
    ("host", "port", "origins"),
    [
        (
            "127.0.0.1",
            8081,
            {
                "http://127.0.0.1:8081",
                "https://127.0.0.1:8081",
                "http://localhost:8081",
                "https://localhost:8081",
                "http://[::1]:8081",
                "https://[::1]:8081",
            },
        ),
        ("dash.example.com", 443, {"http://dash.example.com:443", "https://dash.example.com"}),
        ("10.1.2.3", 80, {"http://10.1.2.3", "https://10.1.2.3:80"}),
        ("2001:db8::5", 8081, {"http://[2001:db8::5]:8081", "https://[2001:db8::5]:8081"}),
        ("0.0.0.0", 8081, set()),  # which name people use is unknown
        ("::", 8081, set()),
        ("127.0.0.1", 0, set()),  # not bound yet
    ],
)
def test_dashboard_origins(host: str, port: int, origins: set[str]) -> None:
    assert set(dashboard_origins(host, port)) == origins
