"""Rollback safety for billing columns: a version that adds columns to an older table.

A temporary version ``20991231000000_extra_columns`` (in a private copy of the SQL directory)
adds two columns to ``tokentrack.report_step_usage`` and declares them in its rollback file
(``-- billing-columns: report_step_usage(extra_tokens, extra_cost)``), as the token-classes
version does with its cached/reasoning tokens and cost. Rolling it back drops the columns,
not the rows: the rollback refuses while a row holds data in them, ``--archive`` keeps the
values by primary key in ``tokentrack_archive.report_step_usage__20991231000000``, and the
next install writes them back, billed steps included (past their immutability trigger).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_functions import psql
from test_install import V1, V2, assert_one_line_error, copy_sql, migration_rows, run_cli

from sqlkit import call, step
from tokentrack_client import migrate

ARCHIVE = migrate.ARCHIVE_SCHEMA
EXTRA, EXTRA_NAME = "20991231000000", "extra_columns"
EXTRA_ARCHIVE = f"{ARCHIVE}.report_step_usage__{EXTRA}"
ROOT = Path(__file__).resolve().parents[2]
DECLARATION = "-- billing-columns: report_step_usage(extra_tokens, extra_cost)"
EXTRA_SCHEMA = f"""\
-- Version {EXTRA}: {EXTRA_NAME} (a test's version: billing columns on an older table)
SET LOCAL search_path = pg_catalog, pg_temp;

ALTER TABLE tokentrack.report_step_usage
    ADD COLUMN extra_tokens integer NOT NULL DEFAULT 0,
    -- NULL: not priced; a comment holding a semicolon ; does not end the statement
    ADD COLUMN extra_cost bigint;
"""
EXTRA_ROLLBACK = f"""\
-- Rollback of version {EXTRA}: {EXTRA_NAME}
--
-- billing-tables: none
{DECLARATION}

ALTER TABLE tokentrack.report_step_usage DROP COLUMN extra_cost, DROP COLUMN extra_tokens;
"""
HELD = 3  # steps holding data in the extra columns (two of them billed), see record_steps

Values = dict[uuid.UUID, tuple[int, int | None]]


def extra_sql_dir(
    tmp_path: Path, schema: str = EXTRA_SCHEMA, rollback: str = EXTRA_ROLLBACK
) -> Path:
    """A copy of the repository's SQL directory with the extra version added."""
    sql_dir = copy_sql(tmp_path)
    (sql_dir / "schema" / f"{EXTRA}_{EXTRA_NAME}.sql").write_text(schema)
    (sql_dir / "rollback" / f"{EXTRA}_{EXTRA_NAME}.sql").write_text(rollback)
    return sql_dir


@pytest.fixture
def extra_sql(tmp_path: Path) -> Path:
    return extra_sql_dir(tmp_path)


@pytest.fixture
async def extra_db(db_dsn: str, extra_sql: Path) -> str:
    """Every version of the repository, then the extra one."""
    installed = await migrate.install(db_dsn, sql_dir=extra_sql)
    assert [v.version for v in installed.versions] == [EXTRA]
    return db_dsn


async def record_steps(dsn: str) -> Values:
    """A completed (billed) report and a running one; three steps hold extra data, two of
    them billed ones (one of which holds a value equal to its default in one column and not
    in the other); two steps hold the defaults. Returns every step's (extra_tokens,
    extra_cost)."""
    conn = await asyncpg.connect(dsn)
    try:
        account, completed, running = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        assert (await call(conn, "open_usage_period", account, 1_000_000, None))["success"]
        extras = {
            (completed, "outline"): (5, 1234),
            (completed, "draft"): (0, 0),  # cost 0 is data: the default is NULL
            (completed, "review"): None,
            (running, "outline"): (7, None),
            (running, "draft"): None,
        }
        for report in (completed, running):
            assert (await call(conn, "try_reserve_tokens", account, report, 50_000))["success"]
        for (report, name), values in extras.items():
            assert (await step(conn, report, account, name, 1_000, 100))["success"]
            if values is not None:  # before billing: billed steps cannot be updated any more
                await conn.execute(
                    "UPDATE tokentrack.report_step_usage SET extra_tokens = $3, extra_cost = $4"
                    " WHERE report_id = $1 AND step_name = $2",
                    report,
                    name,
                    *values,
                )
        assert (await call(conn, "finish_report", completed, account, "complete", None))["success"]
        billed = await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_step_usage WHERE billed_at IS NOT NULL"
            " AND (extra_tokens <> 0 OR extra_cost IS NOT NULL)"
        )
        assert billed == 2
    finally:
        await conn.close()
    return await extra_values(dsn)


async def extra_values(dsn: str) -> Values:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, extra_tokens, extra_cost FROM tokentrack.report_step_usage"
        )
        return {r["id"]: (r["extra_tokens"], r["extra_cost"]) for r in rows}
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def has_columns(dsn: str) -> bool:
    rows = await fetch(
        dsn,
        "SELECT attname FROM pg_attribute WHERE attrelid = 'tokentrack.report_step_usage'::regclass"
        " AND attname IN ('extra_tokens', 'extra_cost') AND NOT attisdropped",
    )
    return len(rows) == 2


async def archive_schema(dsn: str) -> str | None:
    return (await fetch(dsn, "SELECT to_regnamespace($1)::text AS s", ARCHIVE))[0]["s"]


async def triggers(dsn: str) -> dict[str, str]:
    """``{name: tgenabled}`` of the user triggers of report_step_usage."""
    rows = await fetch(
        dsn,
        "SELECT tgname, tgenabled::text AS mode FROM pg_trigger"
        " WHERE tgrelid = 'tokentrack.report_step_usage'::regclass AND NOT tgisinternal",
    )
    return {r["tgname"]: r["mode"] for r in rows}


async def assert_billed_steps_still_immutable(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.execute(
                "UPDATE tokentrack.report_step_usage SET extra_tokens = extra_tokens + 1"
                " WHERE billed_at IS NOT NULL"
            )
        assert refused.value.sqlstate == "55000"
    finally:
        await conn.close()


def held(values: Values) -> Values:
    return {k: v for k, v in values.items() if v != (0, None)}


# --------------------------------------------------------------------------------------------
# The declaration
# --------------------------------------------------------------------------------------------


def test_the_loader_reads_the_billing_columns_declaration(tmp_path: Path) -> None:
    versions = migrate.load_versions(extra_sql_dir(tmp_path / "one"))
    # The repository's versions keep what they declare (20261203000000 declares the token
    # classes and cost of report_step_usage); the extra version comes last.
    assert [v.billing_columns for v in versions[:-1]] == [
        v.billing_columns for v in migrate.load_versions()
    ]
    (extra,) = versions[-1:]
    assert (extra.version, extra.billing_tables) == (EXTRA, ())
    assert extra.billing_columns == (
        migrate.BillingColumns("report_step_usage", ("extra_tokens", "extra_cost")),
    )
    assert extra.billing_columns[0].archive_table(EXTRA) == f"report_step_usage__{EXTRA}"

    two = extra_sql_dir(
        tmp_path / "two",
        EXTRA_SCHEMA + "ALTER TABLE tokentrack.reports ADD COLUMN IF NOT EXISTS extra_note text;\n",
        EXTRA_ROLLBACK.replace(DECLARATION, f"{DECLARATION}; reports(extra_note)"),
    )
    assert [(g.table, g.columns) for g in migrate.load_versions(two)[-1].billing_columns] == [
        ("report_step_usage", ("extra_tokens", "extra_cost")),
        ("reports", ("extra_note",)),
    ]


COLUMN_MUTATIONS: dict[str, tuple[str, str, str]] = {
    # name: (the declaration line, or the rollback file's line replaced; extra schema SQL;
    #        what the error says)
    "malformed declaration": (
        "-- billing-columns: report_step_usage(extra_tokens extra_cost)",
        "",
        "malformed header line",
    ),
    "no parentheses": ("-- billing-columns: report_step_usage", "", "malformed header line"),
    "two declarations": (
        f"{DECLARATION}\n-- billing-columns: report_step_usage(extra_cost)",
        "",
        "more than one '-- billing-columns:' header line",
    ),
    "a column the schema file does not add": (
        "-- billing-columns: report_step_usage(extra_tokens, total_tokens)",
        "",
        f"billing column report_step_usage.total_tokens is not added by schema/{EXTRA}_",
    ),
    "a column added to another table": (
        "-- billing-columns: reports(extra_tokens)",
        "",
        "billing column reports.extra_tokens is not added by",
    ),
    "a column named twice": (
        "-- billing-columns: report_step_usage(extra_tokens, extra_tokens)",
        "",
        "billing column report_step_usage.extra_tokens is named twice",
    ),
    "a table named twice": (
        "-- billing-columns: report_step_usage(extra_tokens); report_step_usage(extra_cost)",
        "",
        "billing columns of table report_step_usage are named twice",
    ),
    "a table the version creates": (
        "-- billing-tables: extra_prices\n-- billing-columns: extra_prices(price)",
        "CREATE TABLE tokentrack.extra_prices (id int PRIMARY KEY);\n"
        "ALTER TABLE tokentrack.extra_prices ADD COLUMN price bigint;\n",
        f"schema/{EXTRA}_{EXTRA_NAME}.sql creates tokentrack.extra_prices: name it in "
        "'-- billing-tables:'",
    ),
}


@pytest.mark.parametrize("mutation", list(COLUMN_MUTATIONS), ids=list(COLUMN_MUTATIONS))
def test_the_loader_validates_the_billing_columns_declaration(
    mutation: str, tmp_path: Path
) -> None:
    line, schema_sql, message = COLUMN_MUTATIONS[mutation]
    rollback = EXTRA_ROLLBACK.replace(DECLARATION, line)
    if line.startswith("-- billing-tables:"):
        rollback = rollback.replace("-- billing-tables: none\n", "")
    sql_dir = extra_sql_dir(tmp_path, EXTRA_SCHEMA + schema_sql, rollback)
    with pytest.raises(migrate.SqlLayoutError) as refused:
        migrate.load_versions(sql_dir)
    assert f"rollback/{EXTRA}_{EXTRA_NAME}.sql" in str(refused.value)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


async def test_install_refuses_a_declared_column_its_schema_file_did_not_add(
    db_dsn: str, tmp_path: Path
) -> None:
    """The loader sees an ADD COLUMN; the install checks that the column really exists."""
    sql_dir = extra_sql_dir(
        tmp_path,
        "DO $$ BEGIN IF false THEN\n"
        "ALTER TABLE tokentrack.report_step_usage ADD COLUMN extra_tokens int, ADD COLUMN"
        " extra_cost bigint;\nEND IF; END $$;\n",
    )
    before = await migration_rows(db_dsn)
    result = await run_cli("migrate", "install", dsn=db_dsn, sql_dir=sql_dir)
    assert_one_line_error(
        result,
        f"version {EXTRA}_{EXTRA_NAME} declares the billing column(s) extra_tokens, extra_cost"
        " of tokentrack.report_step_usage in its rollback file, but its schema file did not add",
    )
    assert await migration_rows(db_dsn) == before


# --------------------------------------------------------------------------------------------
# The refusal
# --------------------------------------------------------------------------------------------


async def test_rollback_refuses_to_drop_column_data_with_exit_2_and_counts(
    extra_db: str, extra_sql: Path
) -> None:
    values = await record_steps(extra_db)
    versions_before = await migration_rows(extra_db)
    expected = (
        f"version {EXTRA} ({EXTRA_NAME}) would drop the data of {HELD} row(s) in"
        " tokentrack.report_step_usage columns extra_tokens, extra_cost;"
    )

    result = await run_cli("migrate", "rollback", dsn=extra_db, sql_dir=extra_sql)
    line = assert_one_line_error(
        result, expected, "make rollback-sql ARCHIVE=1", "--archive", "(nothing was changed)"
    )
    assert line.startswith("tokentrack: error: refusing to roll back: ")
    assert result.stdout == ""

    with pytest.raises(migrate.RollbackRefused, match=r"would drop the data of 3 row\(s\) in"):
        await migrate.rollback(extra_db, sql_dir=extra_sql)

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(DATABASE_URL=extra_db, TOKENTRACK_SQL_DIR=str(extra_sql))
    proc = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed",
        f"BIN={Path(sys.executable).parent}", "rollback-sql",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 2, out + err
    assert expected in err.decode()

    assert await migration_rows(extra_db) == versions_before
    assert await extra_values(extra_db) == values
    assert await archive_schema(extra_db) is None


async def test_rollback_of_columns_holding_only_their_defaults_needs_no_archive(
    extra_db: str, extra_sql: Path
) -> None:
    conn = await asyncpg.connect(extra_db)
    try:
        account, report = uuid.uuid4(), uuid.uuid4()
        assert (await call(conn, "open_usage_period", account, 1_000_000, None))["success"]
        assert (await call(conn, "try_reserve_tokens", account, report, 5_000))["success"]
        for name in ("outline", "draft"):
            assert (await step(conn, report, account, name, 1_000, 100))["success"]
        # Set explicitly to the defaults: no data of their own.
        await conn.execute(
            "UPDATE tokentrack.report_step_usage SET extra_tokens = 0, extra_cost = NULL"
        )
        assert (await call(conn, "finish_report", report, account, "complete", None))["success"]
    finally:
        await conn.close()
    result = await migrate.rollback(extra_db, sql_dir=extra_sql)
    (undone,) = result.versions
    assert (undone.version, undone.archived) == (EXTRA, ())
    assert not await has_columns(extra_db)
    assert len(await step_ids(extra_db)) == 2
    assert await archive_schema(extra_db) is None


async def step_ids(dsn: str) -> list[asyncpg.Record]:
    """The ids of the step rows, whatever their columns."""
    return await fetch(dsn, "SELECT id FROM tokentrack.report_step_usage")


async def test_a_value_committed_while_the_rollback_waits_for_its_lock_is_counted(
    extra_db: str, extra_sql: Path
) -> None:
    """The check before the transaction finds no data; a step's cost is being written
    (uncommitted) meanwhile. The rollback locks report_step_usage before it counts, so it
    waits for that write, counts it once committed, and refuses: without the lock, its
    ALTER TABLE would have waited just the same and then dropped the value."""
    conn = await asyncpg.connect(extra_db)
    writer = await asyncpg.connect(extra_db)
    try:
        account, report = uuid.uuid4(), uuid.uuid4()
        assert (await call(conn, "open_usage_period", account, 1_000_000, None))["success"]
        assert (await call(conn, "try_reserve_tokens", account, report, 5_000))["success"]
        assert (await step(conn, report, account, "outline", 1_000, 100))["success"]
        pricing = writer.transaction()
        await pricing.start()
        await writer.execute("UPDATE tokentrack.report_step_usage SET extra_cost = 42")
        rollback = asyncio.create_task(migrate.rollback(extra_db, sql_dir=extra_sql))
        waiting = 0
        for _ in range(400):  # until the rollback waits for the table
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND relation = 'tokentrack.report_step_usage'::regclass"
            )
            if waiting or rollback.done():
                break
            await asyncio.sleep(0.025)
        assert waiting, "the rollback never waited for the table lock"
        await pricing.commit()
        with pytest.raises(migrate.RollbackRefused, match=r"the data of 1 row\(s\) in tokentrack"):
            await rollback
        assert await conn.fetchval("SELECT extra_cost FROM tokentrack.report_step_usage") == 42
    finally:
        await writer.close()
        await conn.close()


# --------------------------------------------------------------------------------------------
# --archive, then install again
# --------------------------------------------------------------------------------------------


async def test_archive_then_reinstall_restores_the_values_exactly_also_on_billed_steps(
    extra_db: str, extra_sql: Path
) -> None:
    values = await record_steps(extra_db)
    rolled = await run_cli("migrate", "rollback", "--archive", dsn=extra_db, sql_dir=extra_sql)
    assert rolled.returncode == 0, rolled
    lines = rolled.stdout.splitlines()
    assert lines[0] == (
        f"archived the data of {HELD} row(s) in tokentrack.report_step_usage columns"
        f" extra_tokens, extra_cost in {EXTRA_ARCHIVE}"
    )
    assert lines[1].startswith(f"rolled back {EXTRA} {EXTRA_NAME}")
    assert f"until version(s) {EXTRA} are installed again" in rolled.stdout
    assert not await has_columns(extra_db)
    assert len(await step_ids(extra_db)) == len(values)  # the rows stay

    # The archive: primary key and the two columns of the rows holding data, and nothing more.
    archived = await fetch(
        extra_db,
        f"SELECT archived_version, archived_at <= now() AS past, id, extra_tokens, extra_cost"
        f" FROM {EXTRA_ARCHIVE}",
    )
    assert {r["id"]: (r["extra_tokens"], r["extra_cost"]) for r in archived} == held(values)
    assert all(r["archived_version"] == EXTRA and r["past"] for r in archived)
    comment = await fetch(
        extra_db, "SELECT obj_description($1::regclass, 'pg_class') AS c", EXTRA_ARCHIVE
    )
    assert f"version {EXTRA}_{EXTRA_NAME}" in comment[0]["c"]

    # The restore re-enables exactly the triggers that were enabled, as they were.
    conn = await asyncpg.connect(extra_db)
    try:
        await conn.execute(
            "CREATE FUNCTION public.test_never() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN RAISE EXCEPTION 'the disabled trigger ran'; END$$;"
            "CREATE TRIGGER test_disabled BEFORE UPDATE ON tokentrack.report_step_usage"
            " FOR EACH ROW EXECUTE FUNCTION public.test_never();"
            "ALTER TABLE tokentrack.report_step_usage DISABLE TRIGGER test_disabled;"
            "ALTER TABLE tokentrack.report_step_usage"
            " ENABLE ALWAYS TRIGGER report_step_usage_billed_no_truncate"
        )
    finally:
        await conn.close()
    modes = await triggers(extra_db)
    assert modes == {
        "report_step_usage_billed_immutable": "O",
        "report_step_usage_billed_no_truncate": "A",
        "test_disabled": "D",
    }

    installed = await run_cli("migrate", "install", dsn=extra_db, sql_dir=extra_sql)
    assert installed.returncode == 0, installed
    assert (
        f"restored the data of {HELD} row(s) in tokentrack.report_step_usage columns"
        f" extra_tokens, extra_cost from {EXTRA_ARCHIVE} (version {EXTRA})"
    ) in installed.stdout.splitlines()
    assert await extra_values(extra_db) == values
    assert await triggers(extra_db) == modes
    await assert_billed_steps_still_immutable(extra_db)
    assert await archive_schema(extra_db) is None
    assert (await fetch(extra_db, "SELECT tokentrack.reconcile(NULL)::jsonb ->> 'ok' AS ok"))[0][
        "ok"
    ] == "true"

    # A second round trip starts from an empty archive.
    second = await migrate.rollback(extra_db, sql_dir=extra_sql, archive=True)
    assert [(t.table, t.rows, t.columns) for t in second.versions[0].archived] == [
        ("report_step_usage", HELD, ("extra_tokens", "extra_cost"))
    ]
    again = await migrate.install(extra_db, sql_dir=extra_sql)
    assert [(t.version, t.archive_table, t.rows) for t in again.restored] == [
        (EXTRA, f"report_step_usage__{EXTRA}", HELD)
    ]
    assert await extra_values(extra_db) == values


async def test_rolling_back_to_version_1_with_archive_keeps_the_column_values_too(
    extra_db: str, extra_sql: Path
) -> None:
    """The extra version's values go into their archive first, then version 20260108000000
    archives the step rows themselves; installing everything again puts the rows back, then
    the immutability trigger, then the values on them by primary key."""
    values = await record_steps(extra_db)
    result = await migrate.rollback(extra_db, to=V1, sql_dir=extra_sql, archive=True)
    archived = {v.version: [(t.archive_table, t.rows) for t in v.archived] for v in result.versions}
    assert archived[EXTRA] == [(f"report_step_usage__{EXTRA}", HELD)]
    assert ("report_step_usage", len(values)) in archived[V2]
    installed = await migrate.install(extra_db, sql_dir=extra_sql)
    restored = [(t.version, t.archive_table) for t in installed.restored]
    assert restored[-1] == (EXTRA, f"report_step_usage__{EXTRA}")
    assert (V2, "report_step_usage") in restored
    assert await extra_values(extra_db) == values
    assert await archive_schema(extra_db) is None
    await assert_billed_steps_still_immutable(extra_db)
    reconciled = await fetch(extra_db, "SELECT tokentrack.reconcile(NULL)::jsonb ->> 'ok' AS ok")
    assert reconciled[0]["ok"] == "true"


async def test_a_version_with_billing_tables_and_billing_columns_keeps_both(
    db_dsn: str, tmp_path: Path
) -> None:
    sql_dir = extra_sql_dir(
        tmp_path,
        EXTRA_SCHEMA + "CREATE TABLE tokentrack.extra_prices (id int PRIMARY KEY, price bigint);\n",
        EXTRA_ROLLBACK.replace("-- billing-tables: none", "-- billing-tables: extra_prices")
        + "DROP TABLE tokentrack.extra_prices;\n",
    )
    await migrate.install(db_dsn, sql_dir=sql_dir)
    values = await record_steps(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("INSERT INTO tokentrack.extra_prices VALUES (1, 10), (2, 20)")
        refused = await run_cli("migrate", "rollback", dsn=db_dsn, sql_dir=sql_dir)
        assert_one_line_error(
            refused,
            f"version {EXTRA} ({EXTRA_NAME}) would drop 2 row(s) of tokentrack.extra_prices,"
            f" the data of {HELD} row(s) in tokentrack.report_step_usage columns",
        )
        rolled = await migrate.rollback(db_dsn, sql_dir=sql_dir, archive=True)
        assert [(t.archive_table, t.rows) for t in rolled.versions[0].archived] == [
            ("extra_prices", 2),
            (f"report_step_usage__{EXTRA}", HELD),
        ]
        printed = migrate.render_sql(await migrate.pending_plan(db_dsn, sql_dir=sql_dir))
        assert (
            "-- ----- billing tables: extra_prices; billing columns: report_step_usage("
            "extra_tokens, extra_cost)"
        ) in printed
        installed = await migrate.install(db_dsn, sql_dir=sql_dir)
        assert [t.archive_table for t in installed.restored] == [
            "extra_prices",
            f"report_step_usage__{EXTRA}",
        ]
        prices = await conn.fetch("SELECT id, price FROM tokentrack.extra_prices ORDER BY id")
        assert [tuple(r) for r in prices] == [(1, 10), (2, 20)]
    finally:
        await conn.close()
    assert await extra_values(db_dsn) == values
    assert await archive_schema(db_dsn) is None


async def test_the_printed_sql_restores_the_column_values_too(
    extra_db: str, extra_sql: Path, pg_server: Any
) -> None:
    values = await record_steps(extra_db)
    await migrate.rollback(extra_db, sql_dir=extra_sql, archive=True)
    printed = await run_cli("migrate", "sql", "--pending", dsn=extra_db, sql_dir=extra_sql)
    assert printed.returncode == 0, printed
    assert "-- ----- billing columns: report_step_usage(extra_tokens, extra_cost)" in printed.stdout
    assert "$tokentrack_restore$" in printed.stdout
    code, err = await psql(pg_server, extra_db, printed.stdout)
    assert code == 0, err
    assert await extra_values(extra_db) == values
    assert await archive_schema(extra_db) is None
    assert set((await triggers(extra_db)).values()) == {"O"}
    await assert_billed_steps_still_immutable(extra_db)
    assert [r["version"] for r in await migration_rows(extra_db)][-1] == EXTRA


async def test_archive_never_overwrites_an_earlier_column_archive(
    extra_db: str, extra_sql: Path
) -> None:
    values = await record_steps(extra_db)
    before = await migration_rows(extra_db)
    conn = await asyncpg.connect(extra_db)
    try:
        await conn.execute(
            f"CREATE SCHEMA {ARCHIVE}; CREATE TABLE {EXTRA_ARCHIVE} (x int);"
            f" INSERT INTO {EXTRA_ARCHIVE} VALUES (1)"
        )
    finally:
        await conn.close()
    result = await run_cli("migrate", "rollback", "--archive", dsn=extra_db, sql_dir=extra_sql)
    assert_one_line_error(
        result, f"{EXTRA_ARCHIVE} already exists and holds 1 row(s)", "(nothing was changed)"
    )
    assert await migration_rows(extra_db) == before
    assert await extra_values(extra_db) == values


async def test_install_refuses_to_drop_archived_values_whose_row_is_gone(
    extra_db: str, extra_sql: Path
) -> None:
    """An unbilled step deleted after the rollback: its archived values have nowhere to go,
    and the install says so rather than dropping them with the archive."""
    await record_steps(extra_db)
    await migrate.rollback(extra_db, sql_dir=extra_sql, archive=True)
    conn = await asyncpg.connect(extra_db)
    try:
        deleted = await conn.execute(
            "DELETE FROM tokentrack.report_step_usage AS s USING"
            f" {EXTRA_ARCHIVE} AS a WHERE s.id = a.id AND s.billed_at IS NULL"
        )
        assert deleted == "DELETE 1"
    finally:
        await conn.close()
    before = await migration_rows(extra_db)
    result = await run_cli("migrate", "install", dsn=extra_db, sql_dir=extra_sql)
    assert_one_line_error(
        result,
        f"{EXTRA_ARCHIVE} holds 1 archived row(s) whose primary key is no longer in"
        " tokentrack.report_step_usage",
        f"version {EXTRA} was rolled back",
    )
    assert await migration_rows(extra_db) == before
    assert len(await fetch(extra_db, f"SELECT 1 FROM {EXTRA_ARCHIVE}")) == HELD
    assert set((await triggers(extra_db)).values()) == {"O"}
