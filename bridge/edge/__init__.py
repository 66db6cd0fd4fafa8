"""The amqtt edge: the only package that imports amqtt (and websockets' server side).

It adapts amqtt 0.12.1's ``Broker`` (listeners, sessions, protocol handler) to the core in
:mod:`bridge.core`; the core never imports or calls back into it. What amqtt still does for
us, in one place:

- ``Broker`` start/shutdown bookkeeping and its ``_servers`` table (listeners are ours);
- ``Session`` objects as the per-client-id record of subscriptions and QoS 2 state;
- ``BrokerProtocolHandler``'s SUBSCRIBE/UNSUBSCRIBE decoding, UNSUBACK, and the inbound
  QoS 2 flow (PUBREC/PUBREL/PUBCOMP);
- the ``plugins_manager`` event bus (client connected/disconnected, subscribed); admission
  and permissions are the plugins on the named hooks (``bridge.core.hooks``), not amqtt's.

The modules: ``broker.py`` (``MarketBroker``: construction, lifecycle, user messages and
cluster glue) built from one mixin per concept, ``admission``, ``listeners``, ``sessions``,
``subscriptions``, ``snapshots``, ``ticks``, ``fanout``, ``inbound`` and ``zones`` (their shared
state declared in ``state``); ``handler`` (the read path) with its ``keepalive``, ``outbound``
and ``inbound_acks`` mixins; sockets in ``streams`` and ``ws_connection``; ``outbox``,
``client_loop``, ``session``, ``mailbox_link``, ``user_inbound``, ``lean``.

Everything else on the connection path (sockets, the WebSocket handshake and frames,
CONNECT, admission, CONNACK/SUBACK, reading packets, fan-out, QoS 0/1 user publishes,
outbound QoS 1/2, keep-alive) is ours.
"""
