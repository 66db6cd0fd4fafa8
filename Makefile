# Every target sets itself up: a fresh machine needs only python3 (and apt for redis in CI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit unit-uvloop bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/market-bridge demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

# The whole suite on uvloop (broker.event_loop: uvloop): test loops, broker threads, subprocesses.
unit-uvloop: $(STAMP)
	BRIDGE_TEST_EVENT_LOOP=uvloop $(BIN)/pytest

# Fan-out baseline: 1 TCP feed, 20 WebSocket subscribers (saturated, then paced).
bench: $(STAMP)
	$(BIN)/python -m bench.fanout --subscribers 20 --messages 10000 --tz on
	$(BIN)/python -m bench.fanout --subscribers 20 --messages 10000 --tz off
	if command -v mosquitto >/dev/null; then $(BIN)/python -m bench.fanout --subscribers 20 --messages 10000 --broker mosquitto; fi
	$(BIN)/python -m bench.fanout --subscribers 20 --messages 2000 --rate 100
	$(BIN)/python -m bench.connect --connections 2000 --idle 1000
	$(BIN)/python -m bench.conn_memory --steps 1000 10000
	$(BIN)/python -m bench.offline --messages 10000

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
