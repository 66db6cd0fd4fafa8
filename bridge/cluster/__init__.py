"""Several broker nodes on one Redis (Cluster); :mod:`~bridge.cluster.link` wires them into a node.

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
- :mod:`~bridge.cluster.link`: what a broker node starts (the pieces above, in the order
  below) and calls; :mod:`~bridge.cluster.tickwire`: a tick as it crosses the bus.
- :mod:`~bridge.cluster.local` / :mod:`~bridge.cluster.demo`: a local Redis Cluster (tests,
  ``make cluster-demo``) and the three-node demo.

Wiring (when ``config.cluster.enabled``; ``ClusterLink.start``), in the order a node starts,
before its listeners open::

    backbone = Backbone.from_config(config.cluster); await backbone.connect()
    registry = NodeRegistry(backbone, node_id=..., lease_ttl_s=...)  -> /readyz
    limits = ClusterConnectionLimits(...)  # the auth plugin's lease hooks await it
    owners = ClientOwnership(...); ControlListener(..., on_close=close that connection)
    bus = TickBus(..., on_batch=the broker's fan-out of ticks already stamped)
    snapshots = await bus.ledger.snapshots(range(partitions))  -> retained (after subscribing:
        nothing falls between; a newer tick from the bus wins over a snapshot)
    feeds / publishers: bus.publish(topic, payload) instead of stamping locally

With ``enabled: false`` none of this is created and the broker runs as a single node.
"""
