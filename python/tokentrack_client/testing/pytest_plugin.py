"""pytest fixtures for testing code that uses tokentrack against a real PostgreSQL.

Enable them in your root ``conftest.py``::

    pytest_plugins = ["tokentrack_client.testing.pytest_plugin"]

and install the ``testing`` extra (``pip install 'tokentrack[testing]'``: pytest and
pytest-asyncio). The session starts a throwaway PostgreSQL (see
:class:`tokentrack_client.testing.PostgresServer`; it needs the PostgreSQL server programs,
found as :func:`~tokentrack_client.testing.find_bindir` says) or, when
``$TOKENTRACK_TEST_DSN`` is set, uses that server (the user must be allowed to create
databases). The migrator installs tokentrack once into a template database; each test that
asks for a database gets a new one cloned from it, dropped after the test.

``pg_server``           the server (session): ``dsn(dbname)``, ``host``, ``port``, ``user``,
                        ``bin(name)``/``run(name, ...)`` for the matching psql, pg_dump...
``tokentrack_template`` the template database (session): ``template_dbname``.
``make_database``       ``await make_database(template=None) -> dsn``: more fresh databases
                        (``None``: an empty one), dropped after the test.
``db_dsn``              DSN of a fresh database with tokentrack installed.
``empty_db_dsn``        DSN of a fresh, empty database.
``conn``                an asyncpg connection to ``db_dsn``, closed after the test.
``connect``             ``await connect()``: more asyncpg connections to ``db_dsn``.
``pool``                an asyncpg pool to ``db_dsn`` (what ``TokenTracker`` takes).
``schema_dump``         ``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only``.

The async fixtures are pytest-asyncio fixtures (function scope): they work in its strict
and auto modes.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tokentrack_client import migrate
from tokentrack_client.testing import PostgresServer, run_in_thread

__all__ = [
    "ConnectFactory",
    "DatabaseFactory",
    "SchemaDump",
    "TemplateDatabase",
    "normalise_dump",
]

DatabaseFactory = Callable[..., Awaitable[str]]
ConnectFactory = Callable[[], Awaitable[asyncpg.Connection]]
SchemaDump = Callable[[str], str]


@dataclass(frozen=True)
class TemplateDatabase:
    """The database tokentrack was installed into once, to clone test databases from."""

    template_dbname: str
    dsn: str


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (or the one of ``$TOKENTRACK_TEST_DSN``)."""
    external = os.environ.get("TOKENTRACK_TEST_DSN")
    if external:
        yield PostgresServer.existing(external)
        return
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def tokentrack_template(pg_server: PostgresServer) -> Iterator[TemplateDatabase]:
    """Session: a database with every tokentrack version installed by the migrator.

    Its name is new for every session, so that sessions sharing one server never meet.
    """
    name = f"tokentrack_tmpl_{uuid.uuid4().hex[:12]}"

    async def build() -> str:
        dsn = await pg_server.create_database(name)
        await migrate.install(dsn)
        return dsn

    try:
        yield TemplateDatabase(name, run_in_thread(build))
    finally:
        run_in_thread(lambda: pg_server.drop_database(name))


@pytest_asyncio.fixture
async def make_database(pg_server: PostgresServer) -> AsyncIterator[DatabaseFactory]:
    """Factory ``await make_database(template=None) -> dsn`` of fresh databases, dropped after.

    ``template`` is a template database name; ``None`` means an empty database (template0).
    """
    created: list[str] = []

    async def create(template: str | None = None) -> str:
        name = f"tt_{uuid.uuid4().hex[:16]}"
        dsn = await pg_server.create_database(name, template=template or "template0")
        created.append(name)
        return dsn

    try:
        yield create
    finally:
        for name in reversed(created):
            await pg_server.drop_database(name)


@pytest_asyncio.fixture
async def db_dsn(tokentrack_template: TemplateDatabase, make_database: DatabaseFactory) -> str:
    """DSN of a fresh database cloned from the template (every tokentrack version)."""
    return await make_database(tokentrack_template.template_dbname)


@pytest_asyncio.fixture
async def empty_db_dsn(make_database: DatabaseFactory) -> str:
    """DSN of a fresh, empty database, for installer tests."""
    return await make_database()


async def _close(connection: asyncpg.Connection) -> None:
    if connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), timeout=5)
    except (TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
        connection.terminate()


@pytest_asyncio.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to ``db_dsn`` (tokentrack installed), closed after the test."""
    connection = await asyncpg.connect(db_dsn)
    try:
        yield connection
    finally:
        await _close(connection)


@pytest_asyncio.fixture
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


@pytest_asyncio.fixture
async def pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    """An asyncpg pool to ``db_dsn`` (1 to 8 connections), closed after the test."""
    created = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    try:
        yield created
    finally:
        await asyncio.wait_for(created.close(), timeout=10)


_VARYING_PREFIXES = ("--", "SET ", "SELECT pg_catalog.set_config(", "\\restrict", "\\unrestrict")


def normalise_dump(text: str) -> str:
    """Strip comments, blank lines and the session/`\\restrict` lines that vary between dumps."""
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not line.startswith(_VARYING_PREFIXES))


@pytest.fixture
def schema_dump(pg_server: PostgresServer) -> SchemaDump:
    """``schema_dump(dsn) -> str``: normalised ``pg_dump --schema-only`` of that database."""

    def dump(dsn: str) -> str:
        return normalise_dump(
            pg_server.run("pg_dump", "--schema-only", "--no-password", "-d", dsn).stdout
        )

    return dump
