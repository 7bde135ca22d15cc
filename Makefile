# make run  : create .venv, install queen-tw with its extras, run the server on an embedded PostgreSQL.
# make test : create .venv, install, run the test suite (pytest's exit 5, "no tests ran", fails too).
# make lint : ruff and mypy over the tree, with the settings in pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv run test lint clean

venv: $(STAMP)

# Reinstall whenever the packaging metadata changes.  Compat mode makes the editable
# install visible to twistd's plugin discovery.
$(STAMP): pyproject.toml setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]' --config-settings editable_mode=compat
	touch $@

run: venv
	mkdir -p var/buffers
	$(BIN)/twistd -n --pidfile= queen --embedded-pg .pgdata --file-buffer-dir var/buffers

test: venv
	$(BIN)/python -m pytest -m "not soak" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf build dist *.egg-info .pytest_cache var twisted/plugins/dropin.cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
