# tokentrack: every entry point. `make help` lists the targets (from their `## ` comments).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
STEPS ?= 1
PG_MAJOR := 15
# Where the PostgreSQL server binaries live: pg_config's answer, else Debian's path.
PG_BINDIR ?= $(or $(shell pg_config --bindir 2>/dev/null),/usr/lib/postgresql/$(PG_MAJOR)/bin)

.PHONY: help venv postgres install-sql rollback-sql lint test demo clean

help: ## List the targets
	@awk -F ':.*## ' '/^[a-zA-Z_-]+:.*## / { printf "  %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## Create .venv and install tokentrack with its dev tools (editable)

$(VENV_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

postgres: ## Make sure the PostgreSQL server binaries are installed (apt-get when missing)
	@if [ ! -x /usr/lib/postgresql/$(PG_MAJOR)/bin/pg_ctl ] && [ ! -x "$(PG_BINDIR)/pg_ctl" ] \
	    && ! command -v pg_ctl >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then \
	    echo "PostgreSQL server not found: installing it with apt-get"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	fi

install-sql: venv ## Install or upgrade the tokentrack SQL: make install-sql DATABASE_URL=postgresql://...
	@test -n "$$DATABASE_URL" || { echo "make: DATABASE_URL=postgresql://... is required" >&2; exit 2; }
	@$(BIN)/tokentrack migrate install

rollback-sql: venv ## Roll back the newest STEPS versions (default 1): make rollback-sql DATABASE_URL=... STEPS=1
	@test -n "$$DATABASE_URL" || { echo "make: DATABASE_URL=postgresql://... is required" >&2; exit 2; }
	@$(BIN)/tokentrack migrate rollback --steps "$(STEPS)"

lint: venv ## sqlfluff on sql/, ruff check + ruff format --check, mypy --strict
	$(BIN)/sqlfluff lint sql/
	$(BIN)/ruff check python tests
	$(BIN)/ruff format --check python tests
	$(BIN)/mypy --strict python

test: venv postgres ## Run the test suite against a throwaway PostgreSQL server it starts
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/pytest

demo: venv ## Run the demo report generator
	@$(BIN)/tokentrack demo

clean: ## Remove the venv, caches and build output
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
