# tokentrack: every entry point. `make help` lists the targets (from their `## ` comments).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
# The operators' targets (install-sql, rollback-sql, install-cron) need only the runtime
# package: its own stamp, which `make venv` (a superset) also satisfies.
RUNTIME_STAMP := $(VENV)/.runtime-installed
STEPS ?= 1
TO ?=
ARCHIVE ?=
DURATION ?= 60
SEED ?= 1
PG_MAJOR := 15
# Where the PostgreSQL server binaries live: pg_config's answer, else Debian's path.
PG_BINDIR ?= $(or $(shell pg_config --bindir 2>/dev/null),/usr/lib/postgresql/$(PG_MAJOR)/bin)

.PHONY: help venv runtime postgres pgbouncer pg-cron promtool check-rules install-sql rollback-sql install-cron catalog lint test stress demo bench bench-smoke clean

help: ## List the targets
	@awk -F ':.*## ' '/^[a-zA-Z_-]+:.*## / { printf "  %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## Create .venv and install tokentrack with its dev tools (editable)

$(VENV_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@ $(RUNTIME_STAMP)

runtime: $(RUNTIME_STAMP) ## Create .venv with tokentrack and its runtime dependency only (asyncpg), no dev tools

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

postgres: ## Make sure the PostgreSQL server binaries are installed (apt-get when missing)
	@if [ ! -x /usr/lib/postgresql/$(PG_MAJOR)/bin/pg_ctl ] && [ ! -x "$(PG_BINDIR)/pg_ctl" ] \
	    && ! command -v pg_ctl >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then \
	    echo "PostgreSQL server not found: installing it with apt-get"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	fi

pg-cron: ## Make sure Debian's pg_cron is installed (the `tokentrack cron` tests run a real pg_cron)
	@if [ ! -f /usr/share/postgresql/$(PG_MAJOR)/extension/pg_cron.control ] \
	    && [ ! -f "$$(pg_config --sharedir 2>/dev/null)/extension/pg_cron.control" ]; then \
	    echo "pg_cron not found: installing postgresql-$(PG_MAJOR)-cron with apt-get"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-$(PG_MAJOR)-cron; \
	fi

pgbouncer: ## Make sure Debian's pgbouncer is installed (the client's PgBouncer tests need it)
	@if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then \
	    echo "pgbouncer not found: installing it with apt-get"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends pgbouncer; \
	fi

promtool: ## Make sure promtool is installed (Debian's prometheus package ships it; apt-get when missing)
	@if ! command -v promtool >/dev/null 2>&1; then \
	    echo "promtool not found: installing Debian's prometheus package with apt-get"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; \
	fi

check-rules: promtool ## promtool check rules and promtool test rules on deploy/prometheus (the tests run them too)
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml

install-sql: $(RUNTIME_STAMP) ## Install or upgrade the tokentrack SQL: make install-sql DATABASE_URL=postgresql://...
	@test -n "$$DATABASE_URL" || { echo "make: DATABASE_URL=postgresql://... is required" >&2; exit 2; }
	@$(BIN)/tokentrack migrate install

rollback-sql: $(RUNTIME_STAMP) ## Roll back the newest STEPS versions (default 1), or those newer than TO=VERSION; ARCHIVE=1 bills and archives their billing data: make rollback-sql DATABASE_URL=... [STEPS=1 | TO=VERSION] [ARCHIVE=1]
	@test -n "$$DATABASE_URL" || { echo "make: DATABASE_URL=postgresql://... is required" >&2; exit 2; }
	@case "$(ARCHIVE)" in 1) archive=--archive ;; ""|0) archive= ;; \
	    *) echo "make: ARCHIVE must be 1 (bill and archive billing data) or 0, got '$(ARCHIVE)'" >&2; exit 2 ;; esac; \
	    if [ -n "$(TO)" ]; then how_far="--to $(TO)"; else how_far="--steps $(STEPS)"; fi; \
	    $(BIN)/tokentrack migrate rollback $$how_far $$archive

install-cron: $(RUNTIME_STAMP) ## Schedule the expiry sweep every 2 hours through pg_cron: make install-cron DATABASE_URL=...
	@test -n "$$DATABASE_URL" || { echo "make: DATABASE_URL=postgresql://... is required" >&2; exit 2; }
	@$(BIN)/tokentrack cron install

catalog: venv postgres ## Rewrite sql/catalog.json (what verify expects) from clean installs on a throwaway server
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python -m tokentrack_client.ops.catalog

lint: venv ## sqlfluff on sql/, ruff check + ruff format --check, mypy --strict, vulture, plpgsql_check
	$(BIN)/sqlfluff lint sql/
	$(BIN)/ruff check python tests examples bench
	$(BIN)/ruff format --check python tests examples bench
	$(BIN)/mypy --strict python
	MYPYPATH=examples $(BIN)/mypy --strict examples
	@# dead code: all four trees together (tests and examples use the public API); what a
	@# framework or the users use, and vulture cannot see, is listed in vulture_whitelist.py
	$(BIN)/vulture python tests examples bench vulture_whitelist.py --min-confidence 60 \
	    --ignore-decorators '@rule,@initialize,@invariant'
	@# plpgsql_check on a throwaway server; skipped (said so) without the extension, except with CI=true
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python tests/support/plpgsql_lint.py

test: venv postgres pgbouncer pg-cron promtool ## Run the test suite against a throwaway PostgreSQL server it starts
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/pytest

stress: venv postgres ## Concurrent workload (budgets, subjects, extensions) with faults, then every invariant: make stress DURATION=600 SEED=42 [STRESS_ARGS="--crash-every 30" | "--no-budgets"]
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python tests/support/stress.py --duration "$(DURATION)" --seed "$(SEED)" $(STRESS_ARGS)

demo: venv postgres ## Four report types on a throwaway PostgreSQL (DATABASE_URL is ignored), then reconcile
	@TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/tokentrack demo

bench: venv postgres ## Benchmark vs pgbench simple-update on its own server (~15 min): bench/results/latest.*
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python bench/run.py

bench-smoke: venv postgres ## The benchmark in about a minute, small sizes (not part of make test): bench/results/smoke.*
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python bench/run.py --smoke

clean: ## Remove the venv, caches and build output
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
