"""The market-bridge core: what the broker knows and decides, with no amqtt in it.

Pure, I/O-free pieces the broker is built on, each tested table-driven without a broker:
the tick model and its per-topic sequencer, topics and the subscription index, the MQTT
codec (packet framing, the CONNECT parser, wire encoding), per-zone timestamps, rate limits,
message envelopes, the store contract (mailbox, sessions, snapshots, seq reservations) and
the session-limit rules. Nothing under ``bridge.core`` imports amqtt or websockets (a test
holds that); the amqtt adapter imports the core, never the other way round.
"""
