"""Fixtures shared by the edge tests that drive the broker from raw sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.edge.test_handler import RawClient


@pytest.fixture
def raw_clients() -> Iterator[Callable[..., RawClient]]:
    made: list[RawClient] = []

    def factory(port: int, **kwargs: Any) -> RawClient:
        client = RawClient(port, **kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()
