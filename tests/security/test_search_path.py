"""Security: a hostile search_path never reaches into tokentrack's functions.

Look-alikes of everything the functions name are created in ``public`` and in a schema on the
caller's ``search_path`` (placed even before ``pg_catalog``), and as temporary views in the
caller's ``pg_temp``: functions (``now()``, ``gen_random_uuid()``, ``jsonb_build_object``,
``format``, functions named like ``coalesce``/``greatest``/``nullif``, tokentrack's own
internal names...), aggregates (``sum``, ``count``, ``array_agg``, ``jsonb_agg``), operators
(``=(uuid,uuid)``, ``+(bigint,bigint)``, ``->>(jsonb,text)``...), types (domains named
``uuid``, ``jsonb``, ``text``, ``timestamptz``) and tables. Every look-alike raises SQLSTATE
HJ001 when it is used. A full report lifecycle then runs as a service login role with that
search_path, a reader reads through row level security with it, and the owner trips the
ledger's trigger with it: nothing raises HJ001 and every answer equals the answer of the
same calls in a clean database. Finally tokentrack is installed by a session whose
search_path puts the look-alikes first, and no installed object depends on any of them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from securitykit import LoginRoles, login_roles, rows_by_account
from sqlkit import TABLES, call, expire
from tokentrack_client import migrate

HIJACK_STATE = "HJ001"

# (name, arguments, result): look-alikes of functions that tokentrack's SQL calls.
FUNCTIONS = (
    ("now", "", "timestamptz"),
    ("statement_timestamp", "", "timestamptz"),
    ("transaction_timestamp", "", "timestamptz"),
    ("clock_timestamp", "", "timestamptz"),
    ("gen_random_uuid", "", "uuid"),
    ("jsonb_build_object", "VARIADIC text[]", "jsonb"),
    ("jsonb_build_object", "text, boolean", "jsonb"),
    ("jsonb_build_object", "text, boolean, text, text, text, text", "jsonb"),
    ("jsonb_build_object", "text, bigint", "jsonb"),
    ("jsonb_strip_nulls", "jsonb", "jsonb"),
    ("format", "text, VARIADIC text[]", "text"),
    ("format", "text, uuid", "text"),
    ("format", "text, uuid, text", "text"),
    ("coalesce", "bigint, integer", "bigint"),
    ("coalesce", "jsonb, jsonb", "jsonb"),
    ("greatest", "bigint, integer", "bigint"),
    ("least", "timestamptz, timestamptz", "timestamptz"),
    ("nullif", "text, text", "text"),
    ("length", "text", "integer"),
    ("btrim", "text", "text"),
    ("left", "text, integer", "text"),
    ("upper", "text", "text"),
    ("current_setting", "text", "text"),
    ("current_setting", "text, boolean", "text"),
    ("set_config", "text, text, boolean", "text"),
    ("make_interval", "months integer", "interval"),
    ("current_account_id", "", "uuid"),
    ("expire_reservations", "integer", "jsonb"),
    ("finalize_reservation", "uuid, text", "jsonb"),
    ("lock_report_reservation", "uuid, uuid", "uuid"),
    ("reservation_refusal", "uuid, uuid", "jsonb"),
    ("require_read_committed", "text", "void"),
)

# (operator, left, right): look-alikes of the operators the functions use.
OPERATORS = (
    ("=", "uuid", "uuid"),
    ("<>", "uuid", "uuid"),
    ("=", "text", "text"),
    ("<>", "text", "text"),
    ("=", "bigint", "bigint"),
    ("<>", "bigint", "bigint"),
    ("=", "integer", "integer"),
    ("+", "bigint", "bigint"),
    ("+", "integer", "integer"),
    ("+", "bigint", "integer"),
    ("-", "bigint", "bigint"),
    ("<", "integer", "integer"),
    ("<=", "integer", "integer"),
    (">", "bigint", "bigint"),
    (">", "integer", "integer"),
    ("<", "bigint", "bigint"),
    ("<=", "timestamptz", "timestamptz"),
    (">", "timestamptz", "timestamptz"),
    ("->>", "jsonb", "text"),
    ("||", "jsonb", "jsonb"),
    ("+", "timestamptz", "interval"),
)

# (name, argument type, state type): look-alike aggregates.
AGGREGATES = (
    ("sum", "integer", "bigint"),
    ("sum", "bigint", "numeric"),
    ("count", "*", "bigint"),
    ("array_agg", "uuid", "uuid[]"),
    ("jsonb_agg", "jsonb", "jsonb"),
)

TYPES = ("uuid", "jsonb", "text", "timestamptz")


def lookalikes_sql(schema: str, *, raising: bool = True) -> str:
    """SQL that fills ``schema`` with look-alikes that raise HJ001 when used.

    With ``raising=False`` they quietly return true/NULL instead (to look at what an
    installer binds to without making it fail).
    """
    act = (
        f"RAISE EXCEPTION 'search_path hijack: % was used', what USING ERRCODE = '{HIJACK_STATE}'"
        if raising
        else "RETURN true"
    )
    out = [
        f"CREATE FUNCTION {schema}.hijacked(what pg_catalog.text) RETURNS pg_catalog.bool"
        f" LANGUAGE plpgsql AS $$ BEGIN {act}; END $$"
    ]

    def lookalike(name: str, args: str, result: str) -> str:
        what = f"{schema}.{name}({args})".replace("'", "")
        return (
            f'CREATE FUNCTION {schema}."{name}"({args}) RETURNS {result} LANGUAGE plpgsql'
            f" AS $$ BEGIN PERFORM {schema}.hijacked('{what}');"
            f" RETURN{'' if result == 'void' else ' NULL'}; END $$"
        )

    out += [lookalike(name, args, result) for name, args, result in FUNCTIONS]
    for i, (op, left, right) in enumerate(OPERATORS):
        out.append(lookalike(f"op_{i}", f"{left}, {right}", "boolean"))
        out.append(
            f"CREATE OPERATOR {schema}.{op} "
            f"(LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {schema}.op_{i})"
        )
    for i, (name, arg, state) in enumerate(AGGREGATES):
        args = f"{state}" if arg == "*" else f"{state}, {arg}"
        out.append(lookalike(f"agg_{i}", args, state))
        out.append(
            f"CREATE AGGREGATE {schema}.{name}({arg}) (SFUNC = {schema}.agg_{i}, STYPE = {state})"
        )
    for table in (*TABLES, "schema_migrations"):
        out.append(
            f"CREATE VIEW {schema}.{table} AS SELECT"
            f" {schema}.hijacked('{schema}.{table}') AS id,"
            f" {schema}.hijacked('{schema}.{table}') AS account_id,"
            f" {schema}.hijacked('{schema}.{table}') AS status"
        )
    out.append(f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC")
    out.append(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO PUBLIC")
    return ";\n".join(out)


def domains_sql(schema: str) -> str:
    """Domains named like the types tokentrack uses, whose check raises HJ001."""
    return ";\n".join(
        f"CREATE DOMAIN {schema}.{name} AS pg_catalog.{name}"
        f" CHECK ({schema}.hijacked('{schema}.{name} (a type)'))"
        for name in TYPES
    )


def temp_views_sql(schema: str) -> str:
    """Temporary look-alike tables, created by the caller in its own pg_temp."""
    return ";\n".join(
        f"CREATE TEMP VIEW {table} AS SELECT {schema}.hijacked('pg_temp.{table}') AS id"
        for table in TABLES
    )


VARYING = {"expires_at", "period_start", "period_end", "reservation_id", "step_id", "period_id"}
VARYING |= {"previous_period_id"}


def normalise(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without the values that differ between two runs (ids, timestamps)."""
    return {k: ("<varies>" if k in VARYING else v) for k, v in answer.items()}


async def lifecycle(
    service: asyncpg.Connection,
    admin: asyncpg.Connection,
    account: uuid.UUID,
    reports: list[uuid.UUID],
) -> list[dict[str, Any]]:
    """Every API function, their refusals and the sweep; the answers, normalised."""
    r1, r2, r3, r4, r5, stranger = reports
    answers: list[dict[str, Any]] = []

    async def answer(function: str, *args: Any) -> None:
        answers.append(normalise(await call(service, function, *args)))

    await answer("open_usage_period", account, 10_000, None)
    await answer("try_reserve_tokens", account, r1, 1_000)
    await answer("try_reserve_tokens", account, r1, 1_000)  # existing
    await answer("persist_step_usage", r1, account, "outline", 10, 20, None, "model-a")
    await answer("persist_step_usage", r1, account, "outline", 10, 20, None, "model-a")  # dup
    await answer("persist_step_usage", r1, account, "outline", 11, 20, None, "model-a")  # conflict
    await answer("persist_step_usage", r1, account, "draft", 5, 5, 12, None)
    await answer("finalize_report_usage", r1, account)
    await answer("finalize_report_usage", r1, account)  # already finalized
    await answer("persist_step_usage", r1, account, "late", 1, 1, None, None)
    await answer("try_reserve_tokens", account, r2, 500)
    await answer("persist_step_usage", r2, account, "outline", 3, 4, None, None)
    await answer("finish_report", r2, account, "cancelled", "stopped by the user")
    await answer("finish_report", r2, account, "complete", None)  # report_finalized
    await answer("try_reserve_tokens", account, r3, 100)
    await answer("persist_step_usage", r3, account, "outline", 2, 2, None, None)
    await expire(admin, r3)
    await answer("cleanup_expired_reservations")
    await answer("try_reserve_tokens", account, r4, 100)
    await answer("persist_step_usage", r4, account, "outline", 1, 2, None, None)
    await expire(admin, r4)
    await service.execute("CALL tokentrack.sweep_expired_reservations(1)")
    await answer("increment_usage", account, 3, True, False)
    await answer("try_reserve_tokens", account, r5, 999_999)  # insufficient
    await answer("try_reserve_tokens", stranger, r5, 10)  # account_not_found
    await answer("persist_step_usage", r5, account, "x", 1, 1, None, None)  # no reservation
    await answer("reconcile", account)
    await answer("reconcile", None)
    period = await admin.fetchrow(
        "SELECT tokens_used, reports_count FROM tokentrack.usage_periods WHERE account_id = $1",
        account,
    )
    answers.append(dict(period))
    return answers


@pytest.fixture
async def roles(conn: asyncpg.Connection, db_dsn: str) -> AsyncIterator[LoginRoles]:
    async with login_roles(conn, db_dsn) as made:
        yield made


@pytest.mark.parametrize(
    "search_path",
    ["{evil}, public", "{evil}, public, pg_catalog", "public, {evil}, pg_catalog, pg_temp"],
)
async def test_lookalikes_on_the_callers_search_path_are_never_used(
    conn: asyncpg.Connection,
    roles: LoginRoles,
    make_database: Any,
    tokentrack_template: Any,
    search_path: str,
) -> None:
    account = uuid.uuid4()
    reports = [uuid.uuid4() for _ in range(6)]

    # The reference: the same calls in a clean database with the default search_path.
    clean_dsn = await make_database(tokentrack_template.template_dbname)
    clean = await asyncpg.connect(clean_dsn)
    try:
        expected = await lifecycle(clean, clean, account, reports)
    finally:
        await clean.close()

    evil = f"tt_evil_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE SCHEMA {evil}")
    await conn.execute(lookalikes_sql(evil))
    await conn.execute(lookalikes_sql("public"))
    await conn.execute(domains_sql(evil))
    path = search_path.format(evil=evil)

    service = await roles.connect(
        await roles.create("service", "tokentrack_service"), search_path=path
    )
    assert await service.fetchval("SHOW search_path") == path
    await service.execute(temp_views_sql(evil))
    # The look-alikes are live: unqualified names in this session do reach them (built-in
    # functions too, where the path puts pg_catalog after the look-alikes).
    probes = ["SELECT * FROM accounts", "SELECT current_account_id()"]
    if "pg_catalog" in path:
        probes += ["SELECT now()", "SELECT '{}'::jsonb", "SELECT 1 + 1"]
    for probe in probes:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await service.execute(probe)
        assert caught.value.sqlstate == HIJACK_STATE, probe

    assert await lifecycle(service, conn, account, reports) == expected

    # A reader under the same search_path: row level security calls the hook.
    reader = await roles.connect(
        await roles.create("reader", "tokentrack_reader"), search_path=path
    )
    await reader.execute(temp_views_sql(evil))
    async with reader.transaction():
        await reader.execute(f"SET LOCAL tokentrack.account_id = '{account}'")
        seen = await rows_by_account(reader)
    assert {t: set(n) for t, n in seen.items()} == {t: {account} for t in TABLES}

    # The owner under the same search_path: the ledger's trigger function still refuses.
    await conn.execute(f"SET search_path = {path}")
    try:
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="append-only"):
            await conn.execute("DELETE FROM tokentrack.usage_ledger")
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="append-only"):
            await conn.execute("UPDATE tokentrack.usage_ledger SET tokens = tokens")
    finally:
        await conn.execute("RESET search_path")


async def test_an_install_under_a_hostile_search_path_binds_nothing_outside_pg_catalog(
    empty_db_dsn: str,
) -> None:
    admin = await asyncpg.connect(empty_db_dsn)
    try:
        # The migrator's own bootstrap (schema and schema_migrations) runs first, under a
        # clean path: it is not part of tokentrack's SQL files and does not pin search_path
        # (reported separately), so this test looks at what the versioned files bind to.
        await admin.execute(migrate.BOOTSTRAP_SQL)
        evil = f"tt_evil_{uuid.uuid4().hex[:8]}"
        await admin.execute(f"CREATE SCHEMA {evil}")
        await admin.execute(lookalikes_sql(evil, raising=False))
        # Domains that accept values: this test looks at what the objects bind to.
        await admin.execute(
            ";\n".join(f"CREATE DOMAIN {evil}.{t} AS pg_catalog.{t}" for t in TYPES)
        )
        dbname = await admin.fetchval("SELECT current_database()")
        await admin.execute(f"ALTER DATABASE {dbname} SET search_path = {evil}, public, pg_catalog")
    finally:
        await admin.close()

    await migrate.install(empty_db_dsn)

    admin = await asyncpg.connect(empty_db_dsn, server_settings={"search_path": "pg_catalog"})
    try:
        # Every dependency of a tokentrack object on an object in another non-system schema
        # (types of columns and arguments, defaults, constraints, policies, operators used).
        stray = await admin.fetch(
            """
            WITH ours AS (
                SELECT 'pg_class'::regclass AS classid, c.oid AS objid,
                       c.relname::text AS what
                FROM pg_class c
                WHERE c.relnamespace = 'tokentrack'::regnamespace
                  AND c.relname NOT IN ('schema_migrations', 'schema_migrations_pkey')
                UNION ALL
                SELECT 'pg_proc'::regclass, p.oid, p.oid::regprocedure::text
                FROM pg_proc p WHERE p.pronamespace = 'tokentrack'::regnamespace
                UNION ALL
                SELECT 'pg_attrdef'::regclass, d.oid, d.adrelid::regclass::text || ' default'
                FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid
                WHERE c.relnamespace = 'tokentrack'::regnamespace
                UNION ALL
                SELECT 'pg_constraint'::regclass, k.oid, k.conname::text
                FROM pg_constraint k WHERE k.connamespace = 'tokentrack'::regnamespace
                UNION ALL
                SELECT 'pg_policy'::regclass, y.oid, y.polname::text
                FROM pg_policy y JOIN pg_class c ON c.oid = y.polrelid
                WHERE c.relnamespace = 'tokentrack'::regnamespace
            ), used AS (
                SELECT o.what, d.refclassid, d.refobjid
                FROM ours o JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
            )
            SELECT u.what, pg_describe_object(u.refclassid, u.refobjid, 0) AS uses
            FROM used u
            LEFT JOIN pg_type t ON u.refclassid = 'pg_type'::regclass AND t.oid = u.refobjid
            LEFT JOIN pg_proc p ON u.refclassid = 'pg_proc'::regclass AND p.oid = u.refobjid
            LEFT JOIN pg_operator o ON u.refclassid = 'pg_operator'::regclass
                AND o.oid = u.refobjid
            WHERE COALESCE(t.typnamespace, p.pronamespace, o.oprnamespace)
                NOT IN ('pg_catalog'::regnamespace, 'tokentrack'::regnamespace)
            """
        )
        assert [dict(r) for r in stray] == []
        # Columns and arguments typed by domains of the evil schema would show above; check
        # the column types directly as well.
        columns = await admin.fetch(
            "SELECT c.relname, a.attname, a.atttypid::regtype::text AS type"
            " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE c.relnamespace = 'tokentrack'::regnamespace AND a.attnum > 0"
            " AND c.relname <> 'schema_migrations' AND t.typnamespace <> 'pg_catalog'::regnamespace"
            " AND t.typnamespace <> 'tokentrack'::regnamespace"
        )
        assert [dict(r) for r in columns] == []
    finally:
        await admin.close()
