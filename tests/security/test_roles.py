"""Security: least privilege and row level security, proven as real login roles.

Each test creates LOGIN roles, grants them ``tokentrack_reader`` or ``tokentrack_service``
(or nothing), and connects as them over 127.0.0.1. Two accounts are seeded with rows in
every table; the reader must see only the account named by ``SET LOCAL
tokentrack.account_id``, write nothing, call no write function; the service role must not
bill a report under another account; a role without grants must not read anything.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from securitykit import (
    ACCOUNT_COLUMN,
    ROUTINES_SQL,
    Account,
    LoginRoles,
    assert_denied,
    login_roles,
    routine_call,
    rows_by_account,
    seed_account,
)
from sqlkit import TABLES, call, snapshot, step

ALL_TABLES = (*TABLES, "schema_migrations")

# The contract's API plus the operator entry points: what tokentrack_service may call.
SERVICE_API = {
    "increment_usage",
    "try_reserve_tokens",
    "persist_step_usage",
    "finalize_report_usage",
    "finish_report",
    "cleanup_expired_reservations",
    "reconcile",
    "open_usage_period",
    "expire_reservations",
    "sweep_expired_reservations",
    "health",
    "record_step",
    "reserve",
    "extend_reservation",
    "set_budget",
    "grant_credits",
    "adjust_usage",
    "refund_report",
    "claim_notifications",
    "ack_notification",
    # version 20261213000000: the exporter's read-only figures, as health()
    "metrics",
    "billing_totals",
    # version 20261214000000: the incremental reconcile and the advance of its point
    "reconcile_recent",
    "advance_reconcile_point",
}
# Version 20261210000000's tables: account data under row level security whose reader policy
# calls the hook without a subquery (Citus refuses subqueries in policies).
BUDGET_TABLES = ("budgets", "budget_changes", "budget_windows")
# Version 20261211000000's correction records, the same way.
CREDIT_TABLES = ("credit_grants", "usage_adjustments", "report_refunds")
# Version 20261212000000's table, under the same rules.
NOTIFICATION_TABLES = ("notifications",)
# Version 20261214000000's verified point of the incremental reconcile: owner only (read and
# written by SECURITY DEFINER functions), row level security on with no policy.
RECONCILE_TABLES = ("reconcile_point", "reconcile_periods", "reconcile_windows")
ACCOUNT_HOOK = "current_account_id"


@pytest.fixture
async def roles(conn: asyncpg.Connection, db_dsn: str) -> AsyncIterator[LoginRoles]:
    async with login_roles(conn, db_dsn) as made:
        yield made


@pytest.fixture
async def accounts(conn: asyncpg.Connection) -> tuple[Account, Account]:
    return await seed_account(conn), await seed_account(conn)


def write_statements(table: str) -> dict[str, str]:
    """Every way to change a table directly (or to lock its rows against the functions)."""
    column = ACCOUNT_COLUMN.get(table, "version")
    return {
        "INSERT": f"INSERT INTO tokentrack.{table} DEFAULT VALUES",
        "UPDATE": f"UPDATE tokentrack.{table} SET {column} = {column}",
        "DELETE": f"DELETE FROM tokentrack.{table}",
        "TRUNCATE": f"TRUNCATE tokentrack.{table}",
        "SELECT FOR UPDATE": f"SELECT FROM tokentrack.{table} FOR UPDATE",
        "SELECT FOR SHARE": f"SELECT FROM tokentrack.{table} FOR KEY SHARE",
        "LOCK TABLE": f"LOCK TABLE tokentrack.{table} IN SHARE ROW EXCLUSIVE MODE",
    }


async def assert_cannot_write(connection: asyncpg.Connection, own: uuid.UUID, who: str) -> None:
    for table in ALL_TABLES:
        for verb, statement in write_statements(table).items():

            async def attempt(statement: str = statement) -> None:
                async with connection.transaction():
                    await connection.execute(f"SET LOCAL tokentrack.account_id = '{own}'")
                    await connection.execute(statement)

            await assert_denied(attempt, f"{who}: {verb} on tokentrack.{table}")


async def routines(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows = await conn.fetch(ROUTINES_SQL)
    assert {r["name"] for r in rows} >= SERVICE_API | {ACCOUNT_HOOK}
    return rows


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


async def test_a_reader_sees_only_the_account_it_sets_in_every_table(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    everything = await rows_by_account(conn)
    for table in TABLES:
        assert all(everything[table].get(a.id, 0) > 0 for a in accounts), table

    reader = await roles.connect(await roles.create("reader", "tokentrack_reader"))
    for account in accounts:
        async with reader.transaction():
            await reader.execute(f"SET LOCAL tokentrack.account_id = '{account.id}'")
            seen = await rows_by_account(reader)
            assert seen == {t: {account.id: everything[t][account.id]} for t in TABLES}
            other = next(a for a in accounts if a != account)
            for table, column in ACCOUNT_COLUMN.items():
                # Asking for the other account's rows by id finds nothing either.
                n = await reader.fetchval(
                    f"SELECT pg_catalog.count(*) FROM tokentrack.{table} WHERE {column} = $1",
                    other.id,
                )
                assert n == 0, table
        # SET LOCAL ended with the transaction: nothing is visible any more.
        assert await rows_by_account(reader) == {t: {} for t in TABLES}


async def test_a_reader_without_an_account_sees_nothing(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    reader = await roles.connect(await roles.create("reader", "tokentrack_reader"))
    nothing = {t: {} for t in TABLES}
    assert await rows_by_account(reader) == nothing
    async with reader.transaction():
        await reader.execute("SET LOCAL tokentrack.account_id = ''")
        assert await rows_by_account(reader) == nothing
    async with reader.transaction():
        # An unknown account sees nothing; a malformed one is an error, never all rows.
        await reader.execute(f"SET LOCAL tokentrack.account_id = '{uuid.uuid4()}'")
        assert await rows_by_account(reader) == nothing
    async with reader.transaction():
        await reader.execute("SET LOCAL tokentrack.account_id = 'not-a-uuid'")
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await reader.fetch("SELECT * FROM tokentrack.reports")


async def test_a_reader_cannot_write_lock_or_truncate_any_table(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    before = await snapshot(conn)
    reader = await roles.connect(await roles.create("reader", "tokentrack_reader"))
    await assert_cannot_write(reader, accounts[0].id, "reader")
    assert await snapshot(conn) == before


async def test_a_reader_cannot_call_any_function_but_the_account_hook(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    before = await snapshot(conn)
    reader = await roles.connect(await roles.create("reader", "tokentrack_reader"))
    for r in await routines(conn):
        if r["name"] == ACCOUNT_HOOK:
            continue
        sql = routine_call(r["name"], r["kind"], r["types"])
        await assert_denied(lambda sql=sql: reader.execute(sql), f"reader: {sql}")
    # Real arguments make no difference: the privilege check comes first.
    account, report = accounts[0].id, accounts[0].running_report
    for name, args in {
        "try_reserve_tokens": (account, uuid.uuid4(), 10),
        "persist_step_usage": (report, account, "x", 1, 1, None, None),
        "finalize_report_usage": (report, account),
        "finish_report": (report, account, "cancelled", None),
        "increment_usage": (account, 1, False, False),
    }.items():
        await assert_denied(lambda n=name, a=args: call(reader, n, *a), f"reader: {name}")
    assert await snapshot(conn) == before


async def test_a_reader_cannot_change_the_hook_the_policies_or_the_schema(
    roles: LoginRoles,
) -> None:
    reader = await roles.connect(await roles.create("reader", "tokentrack_reader"))
    for statement in (
        "CREATE OR REPLACE FUNCTION tokentrack.current_account_id() RETURNS uuid"
        " LANGUAGE sql AS $$ SELECT NULL::uuid $$",
        "CREATE TABLE tokentrack.mine (id int)",
        "CREATE FUNCTION tokentrack.mine() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "ALTER TABLE tokentrack.reports DISABLE ROW LEVEL SECURITY",
        "DROP POLICY reports_reader_own ON tokentrack.reports",
        "CREATE POLICY mine ON tokentrack.reports FOR SELECT USING (true)",
        "ALTER FUNCTION tokentrack.finalize_report_usage(uuid, uuid) SECURITY INVOKER",
    ):
        await assert_denied(lambda s=statement: reader.execute(s), f"reader: {statement}")


# --------------------------------------------------------------------------------------------
# The service role
# --------------------------------------------------------------------------------------------


async def test_the_service_role_reads_every_account_but_writes_only_through_functions(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    service = await roles.connect(await roles.create("service", "tokentrack_service"))
    assert await rows_by_account(service) == await rows_by_account(conn)
    before = await snapshot(conn)
    await assert_cannot_write(service, accounts[0].id, "service")
    for r in await routines(conn):
        if r["name"] in SERVICE_API or r["name"] == ACCOUNT_HOOK:
            continue
        sql = routine_call(r["name"], r["kind"], r["types"])
        await assert_denied(lambda sql=sql: service.execute(sql), f"service: internal {sql}")
    assert await snapshot(conn) == before

    # ...and its functions work.
    account = accounts[0]
    assert (await step(service, account.running_report, account.id, "draft", 1, 2))["success"]
    answer = await call(service, "finalize_report_usage", account.running_report, account.id)
    assert answer["success"] is True
    assert answer["billed_tokens"] == 10 + 3
    assert (await call(service, "reconcile", None))["ok"] is True


async def test_the_service_role_cannot_bill_a_report_under_another_account(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    owner, other = accounts
    service = await roles.connect(await roles.create("service", "tokentrack_service"))
    stranger = uuid.uuid4()  # an account that does not even exist
    before = await snapshot(conn)
    for report in (owner.running_report, owner.billed_report):
        for account in (other.id, stranger):
            attempts = {
                "finalize_report_usage": (report, account),
                "finish_report complete": (report, account, "complete", None),
                "finish_report cancelled": (report, account, "cancelled", "by someone else"),
                "persist_step_usage new": (report, account, "injected", 1_000, 1_000, None, None),
                "persist_step_usage same": (report, account, "outline", 10, 20, None, None),
            }
            for what, args in attempts.items():
                answer = await call(service, what.split()[0], *args)
                assert answer["success"] is False, (what, answer)
                assert answer["error"] == "report_account_mismatch", (what, answer)
                assert "billed_tokens" not in answer, (what, answer)
        answer = await call(service, "try_reserve_tokens", other.id, report, 10)
        assert answer["error"] == "report_account_mismatch", answer
    assert await snapshot(conn) == before, "a refused call wrote something"


# --------------------------------------------------------------------------------------------
# Roles without grants
# --------------------------------------------------------------------------------------------


async def test_an_unprivileged_role_reads_nothing_and_calls_nothing(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    # `exposed` was given USAGE on the schema by mistake: still nothing, because no table and
    # no function grants anything to PUBLIC.
    nobody = await roles.connect(await roles.create("nobody"))
    exposed_role = await roles.create("exposed")
    await conn.execute(f"GRANT USAGE ON SCHEMA tokentrack TO {exposed_role}")
    exposed = await roles.connect(exposed_role)
    all_routines = await routines(conn)
    for who, connection in (("nobody", nobody), ("exposed", exposed)):
        for table in ALL_TABLES:
            sql = f"SELECT * FROM tokentrack.{table}"
            await assert_denied(lambda c=connection, s=sql: c.fetch(s), f"{who}: {sql}")
        for r in all_routines:
            sql = routine_call(r["name"], r["kind"], r["types"])
            await assert_denied(lambda c=connection, s=sql: c.execute(s), f"{who}: {sql}")
        await assert_cannot_write(connection, accounts[0].id, who)


async def test_readers_and_services_cannot_read_the_migration_table(roles: LoginRoles) -> None:
    for group in ("tokentrack_reader", "tokentrack_service"):
        connection = await roles.connect(await roles.create("member", group))
        for sql in (
            "SELECT * FROM tokentrack.schema_migrations",
            "SELECT version FROM tokentrack.schema_migrations",
        ):
            await assert_denied(lambda c=connection, s=sql: c.fetch(s), f"{group}: {sql}")


async def test_a_member_of_both_roles_is_the_service_and_sees_everything(
    conn: asyncpg.Connection, roles: LoginRoles, accounts: tuple[Account, Account]
) -> None:
    # Documented in docs/SECURITY.md: policies of one table are OR-ed, so a login role that is
    # both reader and service sees every account. Application users must get the reader only.
    both = await roles.connect(
        await roles.create("both", "tokentrack_reader", "tokentrack_service")
    )
    async with both.transaction():
        await both.execute(f"SET LOCAL tokentrack.account_id = '{accounts[0].id}'")
        assert await rows_by_account(both) == await rows_by_account(conn)


# --------------------------------------------------------------------------------------------
# The catalog: exactly these privileges and policies, nothing more
# --------------------------------------------------------------------------------------------


async def test_privileges_are_exactly_the_documented_ones(conn: asyncpg.Connection) -> None:
    owner = await conn.fetchval(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'tokentrack'"
    )

    async def acl(sql: str) -> dict[str, dict[str, set[str]]]:
        result: dict[str, dict[str, set[str]]] = {}
        for r in await conn.fetch(sql):
            grantees = result.setdefault(r["object"], {})
            if r["grantee"] is not None:
                grantees.setdefault(r["grantee"], set()).add(r["privilege"])
        return result

    # Relations (tables and the ledger's identity sequence).
    relations = await acl(
        "SELECT c.relname AS object,"
        " CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,"
        " a.privilege_type AS privilege"
        " FROM pg_class c LEFT JOIN LATERAL"
        "  aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a ON true"
        " WHERE c.relnamespace = 'tokentrack'::regnamespace AND c.relkind IN ('r', 'S', 'v', 'm')"
    )
    everything = {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
        "REFERENCES",
        "TRIGGER",
    }
    # PostgreSQL 17 added MAINTAIN (VACUUM, ANALYZE, REINDEX...), which an owner holds too.
    if int(await conn.fetchval("SHOW server_version_num")) >= 170000:
        everything.add("MAINTAIN")
    for name, grantees in relations.items():
        # model_prices holds no account data: readable by both roles, without row level security.
        if (
            name in TABLES
            or name in BUDGET_TABLES
            or name in CREDIT_TABLES
            or name in NOTIFICATION_TABLES
            or name == "model_prices"
        ):
            assert grantees == {
                owner: everything,
                "tokentrack_reader": {"SELECT"},
                "tokentrack_service": {"SELECT"},
            }, name
        else:  # schema_migrations and the sequence: the owner only
            assert set(grantees) == {owner}, name
    assert set(TABLES) < set(relations)
    column_acls = await conn.fetchval(
        "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " WHERE c.relnamespace = 'tokentrack'::regnamespace AND a.attacl IS NOT NULL"
    )
    assert column_acls == 0

    # Routines: EXECUTE for the owner and, by name, the service (API) or both roles (hook).
    routine_acl = await acl(
        "SELECT p.proname AS object,"
        " CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,"
        " a.privilege_type AS privilege"
        " FROM pg_proc p LEFT JOIN LATERAL"
        "  aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a ON true"
        " WHERE p.pronamespace = 'tokentrack'::regnamespace"
    )
    for name, grantees in routine_acl.items():
        expected = {owner}
        if name in SERVICE_API:
            expected.add("tokentrack_service")
        if name == ACCOUNT_HOOK:
            expected |= {"tokentrack_service", "tokentrack_reader"}
        assert set(grantees) == expected, name

    # The schema: USAGE for both roles, CREATE for nobody but its owner.
    schema = await acl(
        "SELECT 'tokentrack' AS object,"
        " CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,"
        " a.privilege_type AS privilege"
        " FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'tokentrack'"
    )
    assert schema["tokentrack"] == {
        owner: {"USAGE", "CREATE"},
        "tokentrack_reader": {"USAGE"},
        "tokentrack_service": {"USAGE"},
    }

    # The group roles cannot log in and hold no attribute beyond that.
    for r in await conn.fetch(
        "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls,"
        " rolreplication FROM pg_roles WHERE rolname IN ('tokentrack_reader', 'tokentrack_service')"
    ):
        assert not any(r[k] for k in list(r.keys())[1:]), dict(r)


async def test_row_level_security_is_select_only_and_keyed_on_the_hook(
    conn: asyncpg.Connection,
) -> None:
    tables = await conn.fetch(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class"
        " WHERE relnamespace = 'tokentrack'::regnamespace AND relkind = 'r'"
        " AND relname NOT IN ('schema_migrations', 'schema_functions', 'model_prices')"
    )
    assert {r["relname"] for r in tables} == (
        set(TABLES)
        | set(BUDGET_TABLES)
        | set(CREDIT_TABLES)
        | set(NOTIFICATION_TABLES)
        | set(RECONCILE_TABLES)
    )
    for r in tables:
        # Enabled; not forced, so the SECURITY DEFINER functions (run as the owner) can write.
        assert r["relrowsecurity"], r["relname"]
        assert not r["relforcerowsecurity"], r["relname"]
    policies = await conn.fetch(
        "SELECT tablename, policyname, cmd, roles::text[] AS roles, qual, with_check"
        " FROM pg_policies WHERE schemaname = 'tokentrack'"
    )
    by_table: dict[str, dict[str, str]] = {}
    for p in policies:
        assert p["cmd"] == "SELECT", dict(p)
        assert p["with_check"] is None, dict(p)
        assert len(p["roles"]) == 1, dict(p)
        by_table.setdefault(p["tablename"], {})[p["roles"][0]] = p["qual"]
    for table, column in ACCOUNT_COLUMN.items():
        # Through a scalar subquery: evaluated once per statement, not once per row.
        hook = "( SELECT tokentrack.current_account_id() AS current_account_id)"
        assert by_table[table] == {
            "tokentrack_reader": f"({column} = {hook})",
            "tokentrack_service": "true",
        }, table
    for table in (*BUDGET_TABLES, *CREDIT_TABLES, *NOTIFICATION_TABLES):
        assert by_table[table] == {
            "tokentrack_reader": "(account_id = tokentrack.current_account_id())",
            "tokentrack_service": "true",
        }, table
