# Every target sets itself up: a fresh machine needs only python3 (and apt for redis in CI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo cluster-demo test lint typecheck unit unit-uvloop bench bench-cluster clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The dashboard's MQTT.js (npm mqtt, pinned, sha512-checked; git-ignored): fetched once,
# again when bridge/dashboard/vendor.py changes its pin.
MQTT_JS := bridge/dashboard/vendor/mqtt.min.js

$(MQTT_JS): bridge/dashboard/vendor.py | $(STAMP)
	$(BIN)/python -m bridge.dashboard.vendor

install: $(STAMP) $(MQTT_JS)

demo: $(STAMP) $(MQTT_JS)
	$(BIN)/market-bridge demo

# A local Redis Cluster (3 masters + 3 replicas), three broker nodes, the simulator on node 1.
cluster-demo: $(STAMP)
	$(BIN)/python -m bridge.cluster.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(MQTT_JS)
	$(BIN)/pytest

test: lint typecheck unit

# The whole suite on uvloop (broker.event_loop: uvloop): test loops, broker threads, subprocesses.
unit-uvloop: $(STAMP) $(MQTT_JS)
	BRIDGE_TEST_EVENT_LOOP=uvloop $(BIN)/pytest

# Every scenario (fan-out QoS 0/1, paced latency, idle connections, retained snapshot, stalled
# subscriber, connect rate, offline backlog, two cluster nodes and a node's death when
# redis-server is installed) on our broker, vanilla amqtt and Mosquitto (when
# installed): one JSON line each. BENCH_ARGS=--quick for a short run.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The cluster on a local Redis Cluster (bench/cluster.py): the building blocks (Redis operations
# per tick, the seq's cost, ticks through a failover and a master kill), then real broker nodes
# (bench/cluster_nodes.py): per-node latency and CPU per delivery, and a node killed with 1,000 clients.
bench-cluster: $(STAMP)
	$(BIN)/python -m bench.cluster $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bridge/dashboard/vendor
