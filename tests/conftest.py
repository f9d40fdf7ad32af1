"""Test infrastructure: one real PostgreSQL server per session, one fresh database per test.

The fixtures come from the plugin that tokentrack ships for its users,
:mod:`tokentrack_client.testing.pytest_plugin`: the session starts its own PostgreSQL
(``initdb`` as the ``postgres`` OS user when run as root, on /dev/shm when it has room, else
under /tmp, or under ``$TOKENTRACK_TEST_TMPDIR``; trust authentication, 127.0.0.1 only, a
free port, ``fsync=off``) and stops it and removes its directory at the end, or uses the
server of ``$TOKENTRACK_TEST_DSN`` when that is set. The migrator installs every tokentrack
version once into a template database; each test's database is cloned from it
(``CREATE DATABASE ... TEMPLATE``), dropped after the test, so no test re-runs migrations.

``pg_server``     the server (session): ``host``, ``port``, ``user``, ``dsn(dbname)``,
                  ``bin(name)`` for the matching ``pg_dump``/``psql``.
``db_dsn``        DSN of a fresh database with tokentrack installed.
``empty_db_dsn``  DSN of a fresh empty database (from ``template0``).
``make_database`` async factory for more fresh databases in one test.
``conn``          an asyncpg connection to ``db_dsn``, closed after the test.
``connect``       async factory of more asyncpg connections to ``db_dsn``, all closed after.
``pool``          an asyncpg pool to ``db_dsn``.
``schema_dump``   ``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = [
    # pg_server, tokentrack_template, make_database, db_dsn, empty_db_dsn, conn, connect,
    # pool, schema_dump: the fixtures tokentrack ships for its users' tests
    "tokentrack_client.testing.pytest_plugin",
    "pytester",  # test_testing.py runs a user's test session
    "client_fixtures",  # tracker, pgbouncer, fault_proxy (client tests)
    "ops_history",  # history_template, history_dsn, cron_server (operations command tests)
]

# Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default "ci"). Every example of the
# property tests runs real calls against the test server, so "ci" keeps the counts small
# enough for `make test` on 2 cores; it is derandomized (the same examples on every run)
# and prints the @reproduce_failure blob of a failure. "long" explores new random examples
# on every run (its failures print the blob, and the seed when a failure is flaky):
#   HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/invariants/test_mixes.py
settings.register_profile(
    "ci",
    max_examples=20,
    stateful_step_count=10,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=400,
    stateful_step_count=40,
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Extensions a server build may lack. A test that needs one is marked
# ``@pytest.mark.requires_extension("pg_cron")``. On a server that has it (Debian's 15 with the
# packages `make test` installs) it runs; where it is missing it skips saying so, or fails
# under CI=true. A build known to lack it (the npm builds of 16, 17 and 18: `make test PG=17`)
# is run with ``--missing-extension 'pg_cron=<why>'``: its tests are deselected, and the
# session's header and summary name each one with the reason, never counted as passed.
EXTENSIONS = ("pg_cron", "plpgsql_check")
_MISSING = pytest.StashKey[dict[str, str]]()  # name -> reason, from --missing-extension
_DESELECTED = pytest.StashKey[list[tuple[str, str]]]()  # (nodeid, reason) for the summary


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--missing-extension",
        action="append",
        default=[],
        metavar="NAME=REASON",
        help=(
            "the server build lacks extension NAME (one of: " + ", ".join(EXTENSIONS) + "): "
            "deselect the tests marked requires_extension(NAME) and say REASON"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_extension(name): the test needs that extension on the server "
        "(deselected with --missing-extension NAME=REASON)",
    )
    missing: dict[str, str] = {}
    for item in config.getoption("--missing-extension"):
        name, _, reason = item.partition("=")
        if name not in EXTENSIONS:
            raise pytest.UsageError(
                f"--missing-extension {name!r}: not one of {', '.join(EXTENSIONS)}"
            )
        missing[name] = reason or f"the server has no {name}"
    config.stash[_MISSING] = missing
    config.stash[_DESELECTED] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = config.stash[_MISSING]
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        needs = [m.args[0] for m in item.iter_markers("requires_extension")]
        lacking = [name for name in needs if name in missing]
        if lacking:
            dropped.append(item)
            config.stash[_DESELECTED].append((item.nodeid, missing[lacking[0]]))
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    lines = [f"hypothesis profile: {profile} (HYPOTHESIS_PROFILE=ci|long)"]
    bindir = os.environ.get("TOKENTRACK_PG_BINDIR")
    if bindir:
        lines.append(f"PostgreSQL programs: {bindir}")
    lines += [
        f"missing extension {name}: its tests are deselected ({reason})"
        for name, reason in config.stash[_MISSING].items()
    ]
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    deselected = terminalreporter.config.stash[_DESELECTED]
    if not deselected:
        return
    terminalreporter.section(f"{len(deselected)} deselected: an extension this server lacks")
    for nodeid, reason in deselected:
        terminalreporter.write_line(f"DESELECTED {nodeid}: {reason}")
