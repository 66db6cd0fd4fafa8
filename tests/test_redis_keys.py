"""bridge.redis_keys: the cluster's keys are prefixed and the ones a script touches together
share a hash slot (pure: the slot function, no Redis)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from bridge import redis_keys as keys


def slot(name: str) -> int:
    return key_slot(name.encode())


@pytest.mark.parametrize("partition", [0, 1, 7, 15, 4095])
def test_a_partition_lives_on_one_slot(partition: int) -> None:
    together = [
        keys.partition_seq(partition),
        keys.partition_snapshots(partition),
        keys.partition_channel(partition),
    ]
    assert len({slot(name) for name in together}) == 1
    assert keys.partition_seq(partition).startswith(keys.PREFIX)
    assert keys.partition_snapshots(partition).startswith(keys.PREFIX)


def test_partitions_spread_over_slots() -> None:
    assert len({slot(keys.partition_channel(p)) for p in range(16)}) == 16


@pytest.mark.parametrize("user", ["alice", "we{ird}", "}{", "", "zoë", "a|b"])
def test_cluster_user_and_client_keys(user: str) -> None:
    # A user's lease set sits with the user's queue; distinct users get distinct keys.
    assert slot(keys.lease_user(user)) == slot(keys.queue_order(user))
    assert keys.lease_user(user) != keys.lease_user(user + "x")
    assert slot(keys.client_owner(user)) == slot(keys.session(user))
    for name in (keys.lease_user(user), keys.client_owner(user), keys.lease_all(), keys.nodes()):
        assert name.startswith(keys.PREFIX)


@pytest.mark.parametrize("node", ["n1", "web-1.example-42"])
def test_node_control_channel(node: str) -> None:
    assert keys.node_control(node) == "{mb:node:" + node + "}:control"
