"""Helpers of the security tests: real login roles, and a small two-account data set.

Login roles are cluster-wide: every role made here has a unique name, a password (so the
tests also work against a server that asks for one) and is dropped after the test.
Connections go over TCP to the test server (127.0.0.1, trust authentication).
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg

from sqlkit import TABLES, call, new_account, reserve, step

# Every routine of the schema except the account hook, as (name, identity arguments, kind).
ROUTINES_SQL = """
SELECT p.proname AS name,
       pg_catalog.pg_get_function_identity_arguments(p.oid) AS args,
       p.prokind::text AS kind,
       p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype AS is_trigger,
       ARRAY(SELECT pg_catalog.format_type(t, NULL)
             FROM pg_catalog.unnest(p.proargtypes::pg_catalog.oid[]) AS t) AS types
FROM pg_catalog.pg_proc AS p
WHERE p.pronamespace = 'tokentrack'::pg_catalog.regnamespace
ORDER BY 1, 2
"""

# The column that says which account a row belongs to.
ACCOUNT_COLUMN = {table: ("id" if table == "accounts" else "account_id") for table in TABLES}


def routine_call(name: str, kind: str, types: list[str]) -> str:
    """SQL that calls a tokentrack routine with NULL arguments of its exact types."""
    args = ", ".join(f"NULL::{t}" for t in types)
    if kind == "p":
        return f"CALL tokentrack.{name}({args})"
    return f"SELECT tokentrack.{name}({args})"


@dataclass
class LoginRoles:
    """Factory of login roles on the test server; drops them all afterwards."""

    admin: asyncpg.Connection
    dsn_template: str
    made: list[str] = field(default_factory=list)
    connections: list[asyncpg.Connection] = field(default_factory=list)
    password: str = field(default_factory=lambda: secrets.token_hex(16))

    async def create(
        self, label: str, *member_of: str, login: bool = True, options: str = ""
    ) -> str:
        """``CREATE ROLE ... LOGIN`` (plus ``options``), member of ``member_of``; its name."""
        name = f"tt_sec_{label}_{uuid.uuid4().hex[:10]}"
        can_login = "LOGIN" if login else "NOLOGIN"
        await self.admin.execute(
            f"CREATE ROLE {name} {can_login} {options} PASSWORD '{self.password}'"
        )
        self.made.append(name)
        for group in member_of:
            await self.admin.execute(f"GRANT {group} TO {name}")
        return name

    def dsn(self, role: str) -> str:
        """The test database's DSN, logging in as ``role``."""
        parts = urlsplit(self.dsn_template)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 5432
        return f"postgresql://{quote(role)}:{self.password}@{host}:{port}{parts.path}"

    async def connect(self, role: str, **settings: str) -> asyncpg.Connection:
        """A connection to the test database as ``role`` (``settings``: server settings)."""
        connection = await asyncpg.connect(self.dsn(role), server_settings=settings or None)
        self.connections.append(connection)
        assert await connection.fetchval("SELECT current_user") == role
        return connection

    async def drop_all(self) -> None:
        await asyncio.gather(*(c.close(timeout=5) for c in self.connections if not c.is_closed()))
        for name in reversed(self.made):
            await self.admin.execute(f"DROP OWNED BY {name}")
            await self.admin.execute(f"DROP ROLE {name}")


@asynccontextmanager
async def login_roles(admin: asyncpg.Connection, db_dsn: str) -> AsyncIterator[LoginRoles]:
    """Login roles on the test server, connected to the test database; dropped on exit.

    ``admin`` is a superuser connection to the test database (the ``conn`` fixture).
    """
    roles = LoginRoles(admin=admin, dsn_template=db_dsn)
    try:
        yield roles
    finally:
        await roles.drop_all()


@dataclass(frozen=True)
class Account:
    """One seeded account: a billed report, a running report and a legacy increment."""

    id: uuid.UUID
    billed_report: uuid.UUID  # reserved, two steps, finalized
    running_report: uuid.UUID  # reserved (active), one unbilled step


async def seed_account(conn: asyncpg.Connection) -> Account:
    """An account with rows in every tokentrack table."""
    account = await new_account(conn)
    assert (await call(conn, "increment_usage", account, 7, True, False))["success"] is True
    billed, answer = await reserve(conn, account, 1_000)
    assert answer["success"] is True
    assert (await step(conn, billed, account, "outline", 10, 20))["success"] is True
    assert (await step(conn, billed, account, "draft", 30, 40))["success"] is True
    assert (await call(conn, "finalize_report_usage", billed, account))["success"] is True
    running, answer = await reserve(conn, account, 1_000)
    assert answer["success"] is True
    assert (await step(conn, running, account, "outline", 5, 5))["success"] is True
    return Account(id=account, billed_report=billed, running_report=running)


async def rows_by_account(conn: asyncpg.Connection) -> dict[str, dict[uuid.UUID, int]]:
    """{table: {account id: rows}} as the connection sees it."""
    result: dict[str, dict[uuid.UUID, int]] = {}
    for table, column in ACCOUNT_COLUMN.items():
        rows = await conn.fetch(
            f"SELECT {column} AS account, pg_catalog.count(*) AS n"
            f" FROM tokentrack.{table} GROUP BY {column}"
        )
        result[table] = {r["account"]: r["n"] for r in rows}
    return result


Check = Callable[[], Awaitable[Any]]


async def assert_denied(action: Check, what: str) -> None:
    """``action`` fails with SQLSTATE 42501 (insufficient_privilege)."""
    state = await sqlstate_of(action)
    assert state == "42501", f"{what}: expected 42501 (insufficient_privilege), got {state}"


async def sqlstate_of(action: Check) -> str | None:
    """The SQLSTATE that ``action`` fails with, or None when it succeeds."""
    try:
        await action()
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    return None
