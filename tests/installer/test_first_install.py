"""A first install by a database owner without CREATEROLE (managed PostgreSQL's usual owner).

The first version creates the cluster-wide roles tokentrack_service and tokentrack_reader
when they are missing. An owner that may not create roles must get one line naming both
roles and the statements an administrator runs first, and the database must be left exactly
as it was (no tokentrack schema, no bookkeeping tables). Once the roles exist, the same
owner installs, and verify passes.

Roles are cluster-wide and the session's server has them already (its template database is
installed), so this module starts a server of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ops_history import CliResult, tokentrack
from tokentrack_client.testing import PostgresServer, run_in_thread

OWNER = "tt_owner"
ROLES = ("tokentrack_service", "tokentrack_reader")
INSTALL_MD = Path(__file__).resolve().parents[2] / "docs" / "INSTALL.md"


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A server of this test's own, with a LOGIN CREATEDB owner role (no CREATEROLE)."""
    with PostgresServer(prefix="tokentrack-first-install-") as pg:

        async def owner() -> None:
            admin = await asyncpg.connect(pg.dsn())
            try:
                await admin.execute(f"CREATE ROLE {OWNER} LOGIN CREATEDB NOCREATEROLE")
            finally:
                await admin.close()

        run_in_thread(owner)
        yield pg


def as_owner(server: PostgresServer, dbname: str) -> str:
    return f"postgresql://{OWNER}@{server.host}:{server.port}/{dbname}"


async def owned_database(server: PostgresServer, name: str) -> str:
    """CREATE DATABASE as the owner role itself (it has CREATEDB): it owns the database."""
    conn = await asyncpg.connect(as_owner(server, "postgres"))
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return as_owner(server, name)


async def leftovers(dsn: str) -> list[str]:
    """Schemas and roles that a tokentrack install creates, as found now."""
    conn = await asyncpg.connect(dsn)
    try:
        schemas = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname = 'tokentrack'")
        roles = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE 'tokentrack%'")
        return [r[0] for r in schemas] + [r[0] for r in roles]
    finally:
        await conn.close()


def one_line(result: CliResult) -> str:
    assert result.code == 2, result
    assert "Traceback" not in result.out + result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("tokentrack: error: "), lines
    return lines[0]


async def test_a_first_install_without_createrole_names_the_roles_and_leaves_nothing(
    server: PostgresServer,
) -> None:
    dsn = await owned_database(server, "app")
    result = await tokentrack("migrate", "install", "--database-url", dsn)
    line = one_line(result)
    assert "permission denied to create role" in line
    assert "CREATEROLE" in line
    for role in ROLES:
        assert f"CREATE ROLE {role} NOLOGIN;" in line
    assert "nothing was installed" in line
    assert await leftovers(dsn) == []  # no schema, no bookkeeping tables, no roles

    # What the message says, the administrator does; then the same owner installs.
    admin = await asyncpg.connect(server.dsn())
    try:
        for statement in re.findall(r"CREATE ROLE \w+ NOLOGIN;", line):
            await admin.execute(statement)
    finally:
        await admin.close()
    installed = await tokentrack("migrate", "install", "--database-url", dsn)
    assert installed.code == 0, installed
    assert "tokentrack schema is now at version" in installed.out
    verified = await tokentrack("verify", "--database-url", dsn)
    assert verified.code == 0, verified.out + verified.err
    assert "verify: all checks passed" in verified.out


async def test_the_pre_created_roles_are_documented_in_install_md() -> None:
    text = INSTALL_MD.read_text(encoding="utf-8")
    for role in ROLES:
        assert f"CREATE ROLE {role} NOLOGIN;" in text
    assert "CREATEROLE" in text
