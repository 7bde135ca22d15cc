# make run  : create .venv, install queen-tw with its extras, run the server on an embedded PostgreSQL.
# make test : create .venv (and .venv-client26 for queen-mq 2.6.0), install, run the test suite (pytest's exit 5, "no tests ran", fails too).
# make lint : ruff and mypy over the tree, with the settings in pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv client26 run test lint clean

venv: $(STAMP)

# The newest official client (queen-mq 2.6.0) imports as `queen` like 0.15.0, so it lives in a
# venv of its own; tests/client26.py runs scenarios in it (CLIENT26_PYTHON).
CLIENT26 := .venv-client26
CLIENT26_STAMP := $(CLIENT26)/.installed

# Reinstall whenever the packaging metadata changes.  Compat mode makes the editable
# install visible to twistd's plugin discovery.
$(STAMP): pyproject.toml setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]' --config-settings editable_mode=compat
	touch $@

$(CLIENT26_STAMP): Makefile
	test -x $(CLIENT26)/bin/python || $(PYTHON) -m venv $(CLIENT26)
	$(CLIENT26)/bin/python -m pip install --quiet 'queen-mq[zstd]==2.6.0'
	touch $@

client26: $(CLIENT26_STAMP)

run: venv
	mkdir -p var/buffers
	$(BIN)/twistd -n --pidfile= queen --embedded-pg .pgdata --file-buffer-dir var/buffers

test: venv client26
	$(BIN)/python -m pytest -m "not soak" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf build dist *.egg-info .pytest_cache var twisted/plugins/dropin.cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
