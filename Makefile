# Every target bootstraps what it needs: a virtual environment with the package, Mosquitto and
# the TimescaleDB extension for the machine's PostgreSQL. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes: many tests wait on servers, timeouts and subprocesses, so four workers (each
# with its own PostgreSQL and Mosquitto) keep two cores busy: 8 min 50 s for the suite where
# three took 10 min (1,747 tests on a slower machine, 2026-12-01; two took 11 min 36 s on the
# faster one). TEST_WORKERS=0 runs in one.
TEST_WORKERS ?= 4
# A test that fails is run once more (pytest-rerunfailures) and the run fails only if it fails
# again: many tests race real brokers, processes and timeouts on a busy machine, and a rerun
# is printed as R in the progress and listed in the summary. TEST_RERUNS=0 turns it off.
TEST_RERUNS ?= 1

.PHONY: help test test-ha demo bench mutate lint migrate proto system-deps venv clean add-mqtt-user

help:
	@echo "make test      run the test suite (starts its own PostgreSQL+TimescaleDB and Mosquitto)"
	@echo "make test-ha   build .venv-ha (Home Assistant 2024.3) and run the Home Assistant tests"
	@echo "make demo      simulated station through the whole pipeline"
	@echo "make bench     ingest, policy and dashboard benchmarks"
	@echo "make mutate    prove each safety rule: break it in a copy, a named test must fail (ONLY=S5,...)"
	@echo "make lint      ruff"
	@echo "make proto     regenerate collector/proto/*_pb2.py from the .proto schemas"
	@echo "make migrate   apply migrations to DATABASE_URL / POSTGRES_*"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	@touch $@

venv: $(STAMP)

system-deps:
	@scripts/install-system-deps

test: $(STAMP) system-deps
	REQUIRE_TIMESCALEDB=1 $(PY) -m pytest -n $(TEST_WORKERS) --reruns $(TEST_RERUNS) $(PYTEST_ARGS)

# Home Assistant is big (about 200 packages), so it gets its own venv; tests marked
# `homeassistant` use it when it is there (make test too) and skip without it. docs/home-assistant.md
HA_VENV ?= .venv-ha
HA_STAMP := $(HA_VENV)/.installed

$(HA_STAMP): tests/requirements-ha.txt
	@test -x $(HA_VENV)/bin/python || $(PYTHON) -m venv $(HA_VENV)
	$(HA_VENV)/bin/python -m pip install -q -r tests/requirements-ha.txt
	@touch $@

test-ha: $(STAMP) system-deps $(HA_STAMP)
	REQUIRE_TIMESCALEDB=1 $(PY) -m pytest -n 0 -m homeassistant $(PYTEST_ARGS)

# make demo FOLLOW=1 keeps everything running until Ctrl-C
demo: $(STAMP) system-deps
	FOLLOW=$(FOLLOW) $(PY) -m demo

bench: $(STAMP) system-deps
	$(PY) -m bench.ingest $(BENCH_ARGS)
	$(PY) -m bench.collector
	$(PY) -m bench.dashboards
	$(PY) -m bench.policy
	BENCH=1 $(PY) -m pytest tests/test_policy_bench.py -q -s -p no:cacheprovider

# make mutate ONLY=S5-no-soc-clear-margin (ids or rules, comma-separated); docs/mutation.md
mutate: $(STAMP) system-deps
	$(PY) -m mutations.run $(if $(ONLY),--only $(ONLY)) $(MUTATE_ARGS)

proto: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/gen-proto

# make add-mqtt-user NAME=nas-01: create or update a broker user in compose/mosquitto/passwd
add-mqtt-user:
	@test -n "$(NAME)" || { echo "usage: make add-mqtt-user NAME=<user>"; exit 2; }
	scripts/add-mqtt-user $(NAME)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

migrate: $(STAMP)
	$(VENV)/bin/ecoflow-migrate

clean:
	rm -rf $(VENV) $(HA_VENV) .pytest_cache .ruff_cache
