"""Contract: billed report_step_usage rows are billing records, immutable like the ledger
(version 20261202000000), even for the table owner; unbilled rows are not billing records yet.

The owner here is a role that is not a superuser and installed tokentrack itself, so it owns
every table (the usual production layout: the database owner runs the migrator).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from sqlkit import assert_reconciled, call, new_account, reserve, step
from tokentrack_client import migrate

GUARD_VERSION = "20261202000000"
TRIGGERS = ("report_step_usage_billed_immutable", "report_step_usage_billed_no_truncate")


def _as_role(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}@{host}"))


@pytest.fixture
async def owner_dsn(empty_db_dsn: str) -> AsyncIterator[str]:
    """The URL of a fresh database as a non-superuser role that installed tokentrack into it
    (CREATEROLE for version 20251219000000's roles); the role is dropped afterwards."""
    role = f"tt_owner_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(empty_db_dsn)
    try:
        database = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'CREATE ROLE "{role}" LOGIN CREATEROLE NOSUPERUSER')
        await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
        dsn = _as_role(empty_db_dsn, role)
        await migrate.install(dsn)
        yield dsn
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


@pytest.fixture
async def owner(owner_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as that owner, which is no superuser and owns report_step_usage."""
    conn = await asyncpg.connect(owner_dsn)
    try:
        role = await conn.fetchval("SELECT current_user")
        assert (
            await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role) is False
        )
        assert (
            await conn.fetchval(
                "SELECT tableowner FROM pg_tables"
                " WHERE schemaname = 'tokentrack' AND tablename = 'report_step_usage'"
            )
            == role
        )
        yield conn
    finally:
        await conn.close()


async def _billed_report(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """An account with a report whose two steps were billed by finalize, and a late step."""
    account = await new_account(conn)
    report, _ = await reserve(conn, account, 100)
    await step(conn, report, account, "AN0", 10, 5)
    await step(conn, report, account, "AN1", 1, 1)
    billed = await call(conn, "finalize_report_usage", report, account)
    assert (billed["success"], billed["billed_tokens"], billed["steps"]) == (True, 17, 2)
    late = await step(conn, report, account, "LATE", 2, 2)
    assert late["late"] is True
    return account, report


async def _steps(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        # Version 2's columns: those that every version after it leaves in place.
        "SELECT (s.id, s.report_id, s.account_id, s.step_name, s.input_tokens, s.output_tokens,"
        " s.total_tokens, s.model, s.completed_at, s.billed_at, s.billed_period_id,"
        " s.billing_entry_id, s.late)::text AS row"
        " FROM tokentrack.report_step_usage AS s ORDER BY 1"
    )
    return [r["row"] for r in rows]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE tokentrack.report_step_usage SET total_tokens = 99 WHERE report_id = $1",
        "UPDATE tokentrack.report_step_usage SET billed_at = NULL, billed_period_id = NULL,"
        " billing_entry_id = NULL WHERE report_id = $1",
        "UPDATE tokentrack.report_step_usage SET billed_at = now() WHERE report_id = $1",
        "UPDATE tokentrack.report_step_usage SET model = 'other' WHERE report_id = $1",
        "DELETE FROM tokentrack.report_step_usage WHERE report_id = $1",
    ],
    ids=["total", "unbill", "billed_at", "model", "delete"],
)
async def test_billed_steps_refuse_update_and_delete_by_the_owner(
    owner: asyncpg.Connection, statement: str
) -> None:
    """Point 11 of issue #11: the owner could change or delete a billed step."""
    _, report = await _billed_report(owner)
    before = await _steps(owner)
    with pytest.raises(asyncpg.PostgresError, match="billed step is not allowed") as caught:
        await owner.execute(statement, report)
    assert caught.value.sqlstate == "55000"
    assert await _steps(owner) == before
    await assert_reconciled(owner)


async def test_billed_steps_refuse_truncate_by_the_owner(owner: asyncpg.Connection) -> None:
    await _billed_report(owner)
    before = await _steps(owner)
    with pytest.raises(asyncpg.PostgresError, match="holds billed steps") as caught:
        await owner.execute("TRUNCATE tokentrack.report_step_usage")
    assert caught.value.sqlstate == "55000"
    assert await _steps(owner) == before


async def test_unbilled_steps_are_not_billing_records_yet(owner: asyncpg.Connection) -> None:
    """Billing is the one UPDATE of an unbilled row, and keeps working; an unbilled row can
    be changed or deleted (nothing was billed from it), and TRUNCATE of a table holding only
    unbilled rows is allowed."""
    account = await new_account(owner)
    report, _ = await reserve(owner, account, 100)
    for name in ("AN0", "AN1", "AN2"):
        await step(owner, report, account, name, 3, 3)
    assert (
        await owner.execute(
            "UPDATE tokentrack.report_step_usage SET model = 'm' WHERE step_name = 'AN0'"
        )
        == "UPDATE 1"
    )
    assert (
        await owner.execute("DELETE FROM tokentrack.report_step_usage WHERE step_name = 'AN2'")
        == "DELETE 1"
    )
    billed = await call(owner, "finalize_report_usage", report, account)
    assert (billed["billed_tokens"], billed["steps"]) == (12, 2)
    await assert_reconciled(owner)

    with pytest.raises(asyncpg.PostgresError, match="holds billed steps"):
        await owner.execute("TRUNCATE tokentrack.report_step_usage")


async def test_truncate_of_only_unbilled_steps_is_allowed(owner: asyncpg.Connection) -> None:
    account = await new_account(owner)
    report, _ = await reserve(owner, account, 100)
    await step(owner, report, account, "AN0", 1, 1)
    await owner.execute("TRUNCATE tokentrack.report_step_usage")
    assert await owner.fetchval("SELECT count(*) FROM tokentrack.report_step_usage") == 0


async def test_rolling_back_the_guard_drops_only_its_triggers(
    owner: asyncpg.Connection, owner_dsn: str
) -> None:
    """The rollback of version 20261202000000 (as the owner, with the versions after it) drops
    its triggers and their function; every step row stays as it was, and installing again puts
    the guard back."""
    await _billed_report(owner)
    before = await _steps(owner)
    versions = [v.version for v in migrate.load_versions()]
    before_guard = versions[versions.index(GUARD_VERSION) - 1]
    rolled = await migrate.rollback(owner_dsn, to=before_guard)
    assert [v.version for v in rolled.versions][-1] == GUARD_VERSION
    triggers = (
        "SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger"
        " WHERE tgrelid = 'tokentrack.report_step_usage'::regclass AND NOT tgisinternal"
    )
    assert await owner.fetchval(triggers) is None
    guard = "tokentrack.report_step_usage_billed_is_immutable()"
    assert await owner.fetchval("SELECT to_regprocedure($1)", guard) is None
    assert await _steps(owner) == before
    await assert_reconciled(owner)

    await migrate.install(owner_dsn)
    assert await owner.fetchval(triggers) == sorted(TRIGGERS)
    assert await _steps(owner) == before
