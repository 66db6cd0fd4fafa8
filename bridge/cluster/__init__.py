"""Several broker nodes on one Redis (Cluster): the building blocks, not wired into the broker yet.

Each module has one concept and a narrow async interface (in its docstring):

- :mod:`~bridge.cluster.backbone`: the node's connection to Redis (a cluster or one server)
  and the slot map that sharded subscriptions follow.
- :mod:`~bridge.cluster.bus`: cross-node tick fan-out; ``publish`` a tick, receive every
  node's ticks (own ones included, in seq order per topic) in ``on_batch``.
- :mod:`~bridge.cluster.seq`: the Lua script behind ``publish`` (one seq per topic
  cluster-wide, snapshots that never regress) and the snapshot read at start-up.
- :mod:`~bridge.cluster.limits`: cluster-wide connection limits (leases) and client-id
  ownership with takeover notices to the old node.
- :mod:`~bridge.cluster.node`: node registry and readiness.

Wiring (when ``config.cluster.enabled``), in the order a node starts::

    backbone = Backbone.from_config(config.cluster); await backbone.connect()
    node_id = default_node_id(config.cluster.node_id)
    registry = NodeRegistry(backbone, node_id=node_id, lease_ttl_s=...)  -> /readyz
    snapshots = await SeqLedger(backbone.redis).snapshots(range(partitions))  -> retained
    limits = ClusterConnectionLimits(...)  # replaces LocalConnectionLimits (await acquire)
    owners = ClientOwnership(...); ControlListener(..., on_close=close that connection)
    bus = TickBus(..., on_batch=the broker's fan-out of ticks already stamped)
    feeds / publishers: bus.publish(topic, payload) instead of stamping locally

With ``enabled: false`` none of this is created and the broker runs as a single node.
"""
