"""Test infrastructure: one real PostgreSQL server per session, one fresh database per test.

The session starts its own PostgreSQL (``initdb`` as the ``postgres`` OS user when run as
root, in a fresh temporary directory on /dev/shm when it has room, else under /tmp, or
under ``$TOKENTRACK_TEST_TMPDIR``; trust authentication, 127.0.0.1 only, a free port,
``fsync=off``) and stops it and removes the directory at the end, or uses the server of
``$TOKENTRACK_TEST_DSN`` when that is set.

pytest-postgresql's ``postgresql_noproc`` factory, wired to that server through
``depends_on="pg_server"``, builds one template database with every tokentrack version
installed by the migrator. Each test then gets a new database cloned from it
(``CREATE DATABASE ... TEMPLATE``), dropped after the test, so no test re-runs migrations.

Fixtures:

``pg_server``     the server (session): ``host``, ``port``, ``user``, ``dsn(dbname)``,
                  ``bin(name)`` for the matching ``pg_dump``/``psql``.
``db_dsn``        DSN of a fresh database with tokentrack installed.
``empty_db_dsn``  DSN of a fresh empty database (from ``template0``).
``make_database`` async factory for more fresh databases in one test.
``conn``          an asyncpg connection to ``db_dsn``, closed after the test.
``connect``       async factory of more asyncpg connections to ``db_dsn``, all closed after.
``schema_dump``   ``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql import factories
from pytest_postgresql.executors.noop import NoopExecutor
from pytest_postgresql.janitor import AsyncDatabaseJanitor

from pgserver import PgServer, find_pg_bindir, running_server
from tokentrack_client import migrate

pytest_plugins = [
    "client_fixtures",  # pool, tracker, pgbouncer, fault_proxy (client tests)
    "ops_history",  # history_template, history_dsn (operations command tests)
]

# Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default "ci"). Every example of the
# property tests runs real calls against the test server, so "ci" keeps the counts small
# enough for `make test` on 2 cores; it is derandomized (the same examples on every run)
# and prints the @reproduce_failure blob of a failure. "long" explores new random examples
# on every run (its failures print the blob, and the seed when a failure is flaky):
#   HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/test_invariants_mixes.py
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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (or the one of ``$TOKENTRACK_TEST_DSN``)."""
    external = os.environ.get("TOKENTRACK_TEST_DSN")
    if external:
        params = conninfo_to_dict(external)
        yield PgServer(
            host=str(params.get("host", "127.0.0.1")),
            port=int(params.get("port", 5432)),
            user=str(params.get("user", "postgres")),
            password=str(params["password"]) if params.get("password") else None,
            maintenance_dbname=str(params.get("dbname", "postgres")),
            bindir=find_pg_bindir(),
        )
        return

    with running_server() as server:
        yield server


# --------------------------------------------------------------------------------------------
# Template databases (pytest-postgresql noproc + janitor)
# --------------------------------------------------------------------------------------------


def _install_tokentrack(host: str, port: int, user: str, dbname: str, **kwargs: Any) -> None:
    """pytest-postgresql loader: install every tokentrack version with the migrator."""
    password = kwargs.get("password")
    server = PgServer(host=host, port=int(port), user=user, password=password, bindir=Path())
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            asyncio.run(migrate.install(server.dsn(dbname)))
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    # A thread of its own so that asyncio.run never meets the test's running event loop.
    thread = threading.Thread(target=worker, name="tokentrack-template-install")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


tokentrack_template = factories.postgresql_noproc(
    dbname="tokentrack_test", load=[_install_tokentrack], depends_on="pg_server"
)
"""Session fixture: the template database ``tokentrack_test_tmpl`` with tokentrack installed."""


DatabaseFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_database(pg_server: PgServer) -> AsyncIterator[DatabaseFactory]:
    """Factory ``await make_database(template=None) -> dsn`` of fresh databases, dropped after.

    ``template`` is a template database name; ``None`` means an empty database from template0.
    """
    janitors: list[AsyncDatabaseJanitor] = []

    async def create(template: str | None = None) -> str:
        name = f"tt_{uuid.uuid4().hex[:16]}"
        janitor = AsyncDatabaseJanitor(
            user=pg_server.user,
            host=pg_server.host,
            port=pg_server.port,
            password=pg_server.password,
            dbname=name,
            template_dbname=template or "template0",
            maintenance_dbname=pg_server.maintenance_dbname,
        )
        await janitor.init()
        janitors.append(janitor)
        return pg_server.dsn(name)

    yield create
    for janitor in reversed(janitors):
        await janitor.drop()


@pytest.fixture
async def db_dsn(tokentrack_template: NoopExecutor, make_database: DatabaseFactory) -> str:
    """DSN of a fresh database cloned from the template with every tokentrack version."""
    return await make_database(tokentrack_template.template_dbname)


@pytest.fixture
async def empty_db_dsn(make_database: DatabaseFactory) -> str:
    """DSN of a fresh, empty database (from template0), for installer tests."""
    return await make_database()


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


async def _close(connection: asyncpg.Connection) -> None:
    if connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), timeout=5)
    except (TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
        connection.terminate()


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to ``db_dsn`` (tokentrack installed), closed after the test."""
    connection = await asyncpg.connect(db_dsn)
    try:
        yield connection
    finally:
        await _close(connection)


ConnectFactory = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture
async def connect(db_dsn: str) -> AsyncIterator[ConnectFactory]:
    """Factory ``await connect()`` of extra asyncpg connections to ``db_dsn``, closed after."""
    opened: list[asyncpg.Connection] = []

    async def factory() -> asyncpg.Connection:
        connection = await asyncpg.connect(db_dsn)
        opened.append(connection)
        return connection

    try:
        yield factory
    finally:
        await asyncio.gather(*(_close(c) for c in opened))


# --------------------------------------------------------------------------------------------
# Schema dumps
# --------------------------------------------------------------------------------------------

_VARYING_PREFIXES = ("--", "SET ", "SELECT pg_catalog.set_config(", "\\restrict", "\\unrestrict")


def normalise_dump(text: str) -> str:
    """Strip comments, blank lines and the session/`\\restrict` lines that vary between dumps."""
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not line.startswith(_VARYING_PREFIXES))


SchemaDump = Callable[[str], str]


@pytest.fixture
def schema_dump(pg_server: PgServer) -> SchemaDump:
    """``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only`` of that database."""

    def dump(dsn: str) -> str:
        result = subprocess.run(
            [pg_server.bin("pg_dump"), "--schema-only", "--no-password", "-d", dsn],
            capture_output=True,
            text=True,
            check=False,
            env=pg_server.client_env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {result.stderr}")
        return normalise_dump(result.stdout)

    return dump
