# Two commands for a newcomer: `make run` (the local stack) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint format protos bench-overhead bench-routing clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The peer routers the routing benchmark (and its tests) compare with, in their own virtualenv.
PEERS_STAMP := .peers/.installed
$(PEERS_STAMP): $(STAMP) bench/peers.py
	$(BIN)/python -m bench.peers --install
	touch $@

## The local stack on embedded defaults: Redis, 3 emulated engines, gateway, Envoy on :8888.
run: $(STAMP)
	$(BIN)/brickyard up

## Lint, then every test (unit, protocol, integration with real Envoy and Redis).
test: $(STAMP) $(PEERS_STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Regenerate brickyard/api from protos/ (a test fails when they are stale).
protos: $(STAMP)
	$(BIN)/python protos/generate.py

## Gateway overhead benchmark (see docs/benchmarks.md).
bench-overhead: $(STAMP)
	$(BIN)/python -m bench.overhead

## Routing benchmarks (see docs/benchmarks/routing.md): simulation of every strategy, live against
## the peer routers, and the in-process decision cost.
bench-routing: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m bench.routing.simulation
	$(BIN)/python -m bench.routing.live
	$(BIN)/python -m bench.routing.decision_cost

clean:
	rm -rf $(VENV) .peers .pytest_cache .ruff_cache
