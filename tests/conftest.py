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


def pytest_report_header() -> str:
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    return f"hypothesis profile: {profile} (HYPOTHESIS_PROFILE=ci|long)"
