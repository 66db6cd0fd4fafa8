"""Every Redis key market-bridge uses, in one place, all under :data:`PREFIX`.

Nothing else in the project builds a Redis key by hand: add new keys here (and to the table).

==============================  ==========  ================================================
Key                             Type        Holds
==============================  ==========  ================================================
``mb:seq``                      string      global message counter (INCR); ids and FIFO
``mb:q:{<user>}:order``         sorted set  message id -> ``(3 - priority) * 2**40 + seq``:
                                            ZRANGE gives URGENT first, then FIFO
``mb:q:{<user>}:msgs``          hash        message id -> encoded message (see
                                            :mod:`bridge.redis_store`)
``mb:q:{<user>}:expiry``        sorted set  message id -> ``expires_at`` (epoch seconds)
``mb:q:{<user>}:sent``          hash        message id -> deliveries without an ack (absent: 0)
``mb:q:{<user>}:bytes``         string      payload bytes queued (integer; INCRBY/DECRBY)
``mb:session:{<client_id>}``    hash        ``owner`` -> user, ``subscriptions`` -> JSON
                                            object ``{filter: qos}``, ``disconnected_at``
                                            -> epoch seconds (absent while connected)
``mb:sessions``                 set         client ids of every persistent session
``mb:user:{<user>}:sessions``   set         client ids of the sessions ``user`` owns
``mb:snapshots``                hash        market topic -> ``b"<seq>:" + payload``
``mb:seq_reserved``             hash        market topic (``""``: every other topic) ->
                                            ``"<reserved> <at> <clean 0|1>"``, the seq
                                            reservation (see :mod:`bridge.core.sequencer`)
``mb:user_tz``                  hash        user -> IANA time zone override
``mb:seq:{mb:p<n>}``            hash        cluster: topic -> last seq of partition ``n``
``mb:snap:{mb:p<n>}``           hash        cluster: topic -> ``b"<seq>:" + payload``, the
                                            latest tick (never replaced by an older seq)
``{mb:p<n>}:ticks``             channel     cluster: sharded pub/sub, batches of partition
                                            ``n`` (see :mod:`bridge.cluster.bus`)
``mb:lease:{<user>}``           sorted set  cluster: lease id -> expiry (epoch ms): the
                                            user's live connections on every node
``mb:lease:all``                sorted set  cluster: ``<lease id>|<user>`` -> expiry (epoch
                                            ms): every live connection
``mb:lease:anonymous``          sorted set  cluster: the same for anonymous connections only
                                            (``auth.anonymous``: a cap of their own)
``mb:cid:{<client_id>}``        hash        cluster: ``user``, ``node``, ``lease``: who owns
                                            the client id and which node holds it live
``mb:nodes``                    sorted set  cluster: node id -> heartbeat expiry (epoch ms)
``{mb:node:<id>}:control``      channel     cluster: sharded pub/sub, commands to node ``id``
                                            (close a taken-over connection, user mail)
``{mb:node:<id>}:conns``        hash        cluster: client id -> JSON of a live connection
                                            on node ``id`` (the admin API's list); expires
                                            with the node
==============================  ==========  ================================================

A cluster partition's counter, snapshots and channel share the tag ``{mb:p7}``, so they
live on one shard and one Lua script stamps, stores and publishes a batch atomically
(channels are not keys: they carry no prefix of their own). Node ids are plain
(``[A-Za-z0-9_.-]``, checked by the config), so they need no escaping.

The ``{...}`` parts are Redis Cluster hash tags: all keys of one user's queue hash to the
same slot, so each queue operation (one Lua script) touches a single slot. Inside a tag,
``%``, ``{`` and ``}`` are percent-escaped (so the tag is the whole name and distinct names
give distinct keys) and an empty name is written ``%`` (an empty tag ``{}`` would not be a
hash tag).
"""

from __future__ import annotations

__all__ = [
    "PREFIX",
    "client_owner",
    "hash_tag",
    "lease_all",
    "lease_anonymous",
    "lease_user",
    "message_seq",
    "node_connections",
    "node_control",
    "nodes",
    "partition_channel",
    "partition_seq",
    "partition_snapshots",
    "queue_bytes",
    "queue_expiry",
    "queue_keys",
    "queue_messages",
    "queue_order",
    "queue_sent",
    "seq_reservations",
    "session",
    "sessions_index",
    "snapshots",
    "user_sessions",
    "user_tz",
]

PREFIX = "mb:"

_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def hash_tag(name: str) -> str:
    """``{name}`` with the characters that would end the tag early escaped; never empty."""
    return "{" + (name.translate(_ESCAPES) or "%") + "}"


def message_seq() -> str:
    return f"{PREFIX}seq"


def _queue(user: str, part: str) -> str:
    return f"{PREFIX}q:{hash_tag(user)}:{part}"


def queue_order(user: str) -> str:
    return _queue(user, "order")


def queue_messages(user: str) -> str:
    return _queue(user, "msgs")


def queue_expiry(user: str) -> str:
    return _queue(user, "expiry")


def queue_sent(user: str) -> str:
    return _queue(user, "sent")


def queue_bytes(user: str) -> str:
    return _queue(user, "bytes")


def queue_keys(user: str) -> list[str]:
    """The keys of one user's queue, in the order the store's Lua scripts take them."""
    return [queue_order(user), queue_messages(user), queue_expiry(user), queue_sent(user), queue_bytes(user)]


def session(client_id: str) -> str:
    return f"{PREFIX}session:{hash_tag(client_id)}"


def sessions_index() -> str:
    return f"{PREFIX}sessions"


def user_sessions(user: str) -> str:
    return f"{PREFIX}user:{hash_tag(user)}:sessions"


def snapshots() -> str:
    return f"{PREFIX}snapshots"


def seq_reservations() -> str:
    return f"{PREFIX}seq_reserved"


def user_tz() -> str:
    return f"{PREFIX}user_tz"


# -- cluster (bridge/cluster/) ------------------------------------------------------------------


def _partition_tag(partition: int) -> str:
    return f"{{{PREFIX}p{partition}}}"


def partition_seq(partition: int) -> str:
    return f"{PREFIX}seq:{_partition_tag(partition)}"


def partition_snapshots(partition: int) -> str:
    return f"{PREFIX}snap:{_partition_tag(partition)}"


def partition_channel(partition: int) -> str:
    return f"{_partition_tag(partition)}:ticks"


def lease_user(user: str) -> str:
    return f"{PREFIX}lease:{hash_tag(user)}"


def lease_all() -> str:
    return f"{PREFIX}lease:all"


def lease_anonymous() -> str:
    return f"{PREFIX}lease:anonymous"


def client_owner(client_id: str) -> str:
    return f"{PREFIX}cid:{hash_tag(client_id)}"


def nodes() -> str:
    return f"{PREFIX}nodes"


def node_control(node_id: str) -> str:
    return f"{{{PREFIX}node:{node_id}}}:control"


def node_connections(node_id: str) -> str:
    return f"{{{PREFIX}node:{node_id}}}:conns"
