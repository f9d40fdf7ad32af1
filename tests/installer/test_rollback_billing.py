"""Rollback safety: a rollback never loses recorded usage silently (CONTRACT.md, "Rollback safety").

The story of issue #11: a database with one completed report and one report still running (an
active reservation holding 2234 recorded, unbilled tokens). A plain rollback of version
20260108000000 is refused (exit 2, counted, nothing changed); ``--archive`` bills the running
report as the sweep would, keeps the dropped rows in ``tokentrack_archive``, and the next
install restores them so that ``reconcile()`` and ``verify`` pass, every token billed once.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest
from test_functions import psql
from test_install import (
    BOOKKEEPING,
    V1,
    V2,
    VERSIONS,
    assert_one_line_error,
    copy_sql,
    migration_rows,
    run_cli,
    tokentrack_objects,
)

from sqlkit import call, step
from tokentrack_client import migrate
from tokentrack_client.ops import verify

ARCHIVE = migrate.ARCHIVE_SCHEMA

# The newest version whose billing data includes reservations (its tables or its columns): an
# archive rollback bills the reservations in flight there, before anything of theirs goes.
SWEEPER = max(
    v.version
    for v in VERSIONS
    if "report_reservations" in v.billing_tables
    or any(c.table == "report_reservations" for c in v.billing_columns)
)
V2_TABLES = ("report_reservations", "report_step_usage")
V1_TABLES = ("accounts", "usage_periods", "reports", "usage_ledger")
ROOT = Path(__file__).resolve().parents[2]
UNBILLED = 2234  # the figure: (1000 + 200) + (800 + 234)


@dataclass(frozen=True)
class Story:
    """The issue's database: one completed report, one still running with unbilled steps."""

    account: uuid.UUID
    completed: uuid.UUID
    running: uuid.UUID
    completed_tokens: int


async def tell_the_story(dsn: str) -> Story:
    conn = await asyncpg.connect(dsn)
    try:
        account = uuid.uuid4()
        assert (await call(conn, "open_usage_period", account, 1_000_000, None))["success"]
        await call(conn, "increment_usage", account, 700, True, False)  # legacy usage
        completed, running = uuid.uuid4(), uuid.uuid4()
        assert (await call(conn, "try_reserve_tokens", account, completed, 20_000))["success"]
        for name, tokens in (("outline", 4_000), ("draft", 7_000)):
            await step(conn, completed, account, name, tokens, 375)
        assert (await call(conn, "finish_report", completed, account, "complete", None))["success"]
        assert (await call(conn, "try_reserve_tokens", account, running, 20_000))["success"]
        await step(conn, running, account, "outline", 1_000, 200)
        await step(conn, running, account, "draft", 800, 234)
        return Story(account, completed, running, 4_375 + 7_375)
    finally:
        await conn.close()


async def rows_of(dsn: str, schema: str, tables: tuple[str, ...]) -> dict[str, list[str]]:
    """Every row of ``schema.table`` as text, sorted (tables that do not exist are left out)."""
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, list[str]] = {}
        for table in tables:
            if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.{table}") is None:
                continue
            rows = await conn.fetch(f"SELECT t::text FROM {schema}.{table} AS t ORDER BY 1")
            out[table] = [r[0] for r in rows]
        return out
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def reconcile(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return await call(conn, "reconcile", None)
    finally:
        await conn.close()


async def tokens_used(dsn: str, account: uuid.UUID) -> int:
    (row,) = await fetch(
        dsn, "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
    )
    return int(row["tokens_used"])


async def report_ledger(dsn: str, report: uuid.UUID) -> list[tuple[str, int]]:
    rows = await fetch(
        dsn,
        "SELECT kind, tokens FROM tokentrack.usage_ledger WHERE report_id = $1 ORDER BY id",
        report,
    )
    return [(r["kind"], r["tokens"]) for r in rows]


# --------------------------------------------------------------------------------------------
# The refusal
# --------------------------------------------------------------------------------------------


async def test_rollback_refuses_to_drop_unbilled_usage_with_exit_2_and_counts(
    db_dsn: str,
) -> None:
    """Issue #11, point 2: `make rollback-sql` printed `rolled back` and exited 0 while 2,234
    recorded tokens were not billed yet; now it is refused, counted, and nothing changes."""
    await tell_the_story(db_dsn)
    everything = (*V1_TABLES, *V2_TABLES)
    before = await rows_of(db_dsn, "tokentrack", everything)
    versions_before = await migration_rows(db_dsn)

    result = await run_cli("migrate", "rollback", "--to", V1, dsn=db_dsn)
    line = assert_one_line_error(
        result,
        f"version {V2} (antifragile_token_tracking) would drop",
        "2 row(s) of tokentrack.report_reservations",
        "4 row(s) of tokentrack.report_step_usage",
        f"(2 recorded step(s), {UNBILLED} tokens, not billed yet)",
        "make rollback-sql ARCHIVE=1",
        "--archive",
        "(nothing was changed)",
    )
    assert line.startswith("tokentrack: error: refusing to roll back: ")
    assert result.stdout == ""  # not even version 20261201000000 (health) was rolled back
    assert await migration_rows(db_dsn) == versions_before
    assert await rows_of(db_dsn, "tokentrack", everything) == before
    assert (await fetch(db_dsn, "SELECT to_regnamespace($1) AS s", ARCHIVE))[0]["s"] is None

    # Down to nothing: version 1's tables are counted as well, in one line.
    every = await run_cli("migrate", "rollback", "--steps", str(len(VERSIONS)), dsn=db_dsn)
    assert_one_line_error(
        every,
        f"version {V1} (add_usage_tracking) would drop 1 row(s) of tokentrack.accounts,"
        " 1 row(s) of tokentrack.usage_periods, 2 row(s) of tokentrack.reports,"
        " 2 row(s) of tokentrack.usage_ledger;",
    )
    assert await migration_rows(db_dsn) == versions_before


async def test_rollback_of_empty_billing_tables_needs_no_archive(empty_db_dsn: str) -> None:
    await migrate.install(empty_db_dsn)
    result = await migrate.rollback(empty_db_dsn, steps=len(VERSIONS))
    assert [v.version for v in result.versions] == [v.version for v in reversed(VERSIONS)]
    assert all(v.archived == () and v.billed is None for v in result.versions)
    assert (await fetch(empty_db_dsn, "SELECT to_regnamespace($1) AS s", ARCHIVE))[0]["s"] is None


async def test_make_rollback_sql_refuses_and_archive_1_archives(
    db_dsn: str, tmp_path: Path
) -> None:
    """The Makefile target: refused by default (exit 2), ARCHIVE=1 passes --archive."""
    await tell_the_story(db_dsn)
    root = ROOT

    async def make(*args: str) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TOKENTRACK_SQL_DIR"}
        env["DATABASE_URL"] = db_dsn
        proc = await asyncio.create_subprocess_exec(
            "make", "--no-print-directory", "-C", str(root), "-o", ".venv/.installed",
            f"BIN={Path(sys.executable).parent}", "rollback-sql", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await make(f"TO={V1}")
    assert code == 2, out + err
    assert "refusing to roll back" in err
    code, out, err = await make(f"TO={V1}", "ARCHIVE=yes")
    assert code == 2
    assert "ARCHIVE must be 1" in err
    code, out, err = await make(f"TO={V1}", "ARCHIVE=1")
    assert code == 0, out + err
    assert f"billed 1 active reservation(s) of version {SWEEPER} as the sweep does" in out
    assert f"archived 4 row(s) of tokentrack.report_step_usage in {ARCHIVE}" in out


# --------------------------------------------------------------------------------------------
# --archive, then install again
# --------------------------------------------------------------------------------------------


async def test_archive_bills_once_and_reinstall_passes_reconcile_and_verify(db_dsn: str) -> None:
    """Issue #11, points 1 and 2: after rolling back version 20260108000000 and installing it
    again, reconcile() found `expected 11750, actual 0` (the ledger's billing rows pointed at
    step rows that were gone) and verify failed; the running report's steps were lost."""
    story = await tell_the_story(db_dsn)
    used_before = await tokens_used(db_dsn, story.account)
    steps_before = await rows_of(db_dsn, "tokentrack", ("report_step_usage",))

    rolled = await run_cli("migrate", "rollback", "--to", V1, "--archive", dsn=db_dsn)
    assert rolled.returncode == 0, rolled
    lines = rolled.stdout.splitlines()
    # The newest version whose billing data includes reservations bills the one in flight,
    # with its own functions; version 2's rollback then finds nothing left to bill.
    assert (
        f"billed 1 active reservation(s) of version {SWEEPER} as the sweep does:"
        f" 2 recorded step(s), {UNBILLED} tokens"
    ) in lines
    # Version 2's lines, in order (the later versions come first).
    at = lines.index(
        f"billed 0 active reservation(s) of version {V2} as the sweep does: 0 recorded step(s),"
        " 0 tokens"
    )
    assert f"archived 2 row(s) of tokentrack.report_reservations in {ARCHIVE}." in lines[at + 1]
    assert f"archived 4 row(s) of tokentrack.report_step_usage in {ARCHIVE}." in lines[at + 2]
    assert lines[at + 3].startswith(f"rolled back {V2} antifragile_token_tracking")
    assert f"until version(s) {V2} are installed again" in rolled.stdout
    # Billed before the tables went: into the period and the ledger, exactly once.
    assert await tokens_used(db_dsn, story.account) == used_before + UNBILLED
    assert await report_ledger(db_dsn, story.running) == [("report_expired", UNBILLED)]
    assert (await tokentrack_objects(db_dsn))[0] & set(V2_TABLES) == set()

    installed = await run_cli("migrate", "install", dsn=db_dsn)
    assert installed.returncode == 0, installed
    for table, rows in (("report_reservations", 2), ("report_step_usage", 4)):
        assert f"restored {rows} row(s) of tokentrack.{table} from {ARCHIVE}.{table}" in (
            installed.stdout
        )
    assert (await reconcile(db_dsn))["ok"] is True
    report = await verify.verify(db_dsn)
    assert report.ok, [c for c in report.checks if not c.ok]
    # The step rows are back as they were, the running ones now billed; billed exactly once.
    restored = await rows_of(db_dsn, "tokentrack", ("report_step_usage",))
    assert len(restored["report_step_usage"]) == len(steps_before["report_step_usage"])
    unbilled = await fetch(
        db_dsn, "SELECT count(*) AS n FROM tokentrack.report_step_usage WHERE billed_at IS NULL"
    )
    assert unbilled[0]["n"] == 0
    assert await tokens_used(db_dsn, story.account) == used_before + UNBILLED
    assert await report_ledger(db_dsn, story.running) == [("report_expired", UNBILLED)]
    assert await report_ledger(db_dsn, story.completed) == [
        ("report_billed", story.completed_tokens)
    ]
    (reservation,) = await fetch(
        db_dsn,
        "SELECT status, billed_tokens FROM tokentrack.report_reservations WHERE report_id = $1",
        story.running,
    )
    assert (reservation["status"], reservation["billed_tokens"]) == ("expired", UNBILLED)
    # The archive was emptied by the restore, and dropped with its schema.
    assert (await fetch(db_dsn, "SELECT to_regnamespace($1) AS s", ARCHIVE))[0]["s"] is None

    # The application carries on: a late step of the running report is billed at once, and
    # the finalize of the completed one answers what it billed the first time.
    conn = await asyncpg.connect(db_dsn)
    try:
        late = await step(conn, story.running, story.account, "appendix", 10, 5)
        assert (late["success"], late["late"]) == (True, True), late
        again = await call(conn, "finalize_report_usage", story.completed, story.account)
        assert again["already_finalized"] is True, again
        assert (await call(conn, "reconcile", None))["ok"] is True
    finally:
        await conn.close()

    # A second round trip works the same way (the archive starts empty again).
    second = await migrate.rollback(db_dsn, to=V1, archive=True)
    (undone_v2,) = [v for v in second.versions if v.version == V2]
    assert [t.rows for t in undone_v2.archived] == [2, 5]
    assert undone_v2.billed == migrate.RollbackSweep(0, 0, 0)
    await migrate.install(db_dsn)
    assert (await reconcile(db_dsn))["ok"] is True


async def test_the_archive_is_readable_by_the_operator_and_nobody_else(db_dsn: str) -> None:
    story = await tell_the_story(db_dsn)
    steps = await rows_of(db_dsn, "tokentrack", ("report_step_usage",))
    await migrate.rollback(db_dsn, to=V1, archive=True)
    # The owner (the operator's role) reads the rows as they were, with when and by what.
    rows = await fetch(
        db_dsn,
        f"SELECT archived_version, archived_at <= now() AS past, report_id, step_name,"
        f" total_tokens, billed_at IS NOT NULL AS billed FROM {ARCHIVE}.report_step_usage"
        " ORDER BY report_id, step_name",
    )
    assert len(rows) == len(steps["report_step_usage"]) == 4
    assert {r["archived_version"] for r in rows} == {V2}
    assert all(r["past"] and r["billed"] for r in rows)
    assert sum(r["total_tokens"] for r in rows if r["report_id"] == story.running) == UNBILLED
    (reservation,) = await fetch(
        db_dsn,
        f"SELECT status, billed_tokens FROM {ARCHIVE}.report_reservations WHERE report_id = $1",
        story.running,
    )
    assert (reservation["status"], reservation["billed_tokens"]) == ("expired", UNBILLED)
    comments = await fetch(
        db_dsn,
        "SELECT obj_description(to_regnamespace($1), 'pg_namespace') AS schema,"
        " obj_description(to_regclass($1 || '.report_step_usage'), 'pg_class') AS tab",
        ARCHIVE,
    )
    assert "rollback --archive" in comments[0]["schema"]
    assert f"version {V2}_antifragile_token_tracking" in comments[0]["tab"]
    # Billing data of every account: not for the application's roles.
    privileges = await fetch(
        db_dsn,
        "SELECT r AS role, has_schema_privilege(r, $1, 'USAGE') AS usage"
        " FROM unnest(ARRAY['tokentrack_service', 'tokentrack_reader', 'public']) AS r",
        ARCHIVE,
    )
    assert [p["usage"] for p in privileges] == [False, False, False]


async def test_rolling_back_everything_with_archive_keeps_version_1_data(db_dsn: str) -> None:
    story = await tell_the_story(db_dsn)
    used = await tokens_used(db_dsn, story.account)
    result = await migrate.rollback(db_dsn, steps=len(VERSIONS), archive=True)
    assert [(t.table, t.rows) for t in result.versions[-1].archived] == [
        ("accounts", 1),
        ("usage_periods", 1),
        ("reports", 2),
        ("usage_ledger", 3),  # the legacy increment, the completed report, the sweep's billing
    ]
    assert (await tokentrack_objects(db_dsn))[0] == BOOKKEEPING
    assert f"archived 3 row(s) of tokentrack.usage_ledger in {ARCHIVE}" in "\n".join(result.lines())
    v1_archive = await rows_of(db_dsn, ARCHIVE, V1_TABLES)
    assert set(v1_archive) == set(V1_TABLES)

    installed = await migrate.install(db_dsn)
    assert [(t.version, t.table) for t in installed.restored] == [
        *((V1, t) for t in V1_TABLES),
        *((V2, t) for t in V2_TABLES),
    ]
    assert "restored 3 row(s) of tokentrack.usage_ledger" in "\n".join(installed.lines())
    assert await tokens_used(db_dsn, story.account) == used + UNBILLED
    assert (await reconcile(db_dsn))["ok"] is True
    report = await verify.verify(db_dsn)
    assert report.ok, [c for c in report.checks if not c.ok]
    # The ledger's identity continues after the restored rows.
    conn = await asyncpg.connect(db_dsn)
    try:
        top = await conn.fetchval("SELECT max(id) FROM tokentrack.usage_ledger")
        await call(conn, "increment_usage", story.account, 5, False, True)
        assert await conn.fetchval("SELECT max(id) FROM tokentrack.usage_ledger") == top + 1
        assert (await call(conn, "reconcile", None))["ok"] is True
    finally:
        await conn.close()


async def test_the_printed_sql_restores_the_archive_too(
    db_dsn: str, pg_server: Any, tmp_path: Path
) -> None:
    """Teams applying `tokentrack migrate sql --pending` with psql get the same restore."""
    story = await tell_the_story(db_dsn)
    await migrate.rollback(db_dsn, to=V1, archive=True)
    printed = await run_cli("migrate", "sql", "--pending", dsn=db_dsn)
    assert printed.returncode == 0, printed
    assert "$tokentrack_restore$" in printed.stdout
    code, err = await psql(pg_server, db_dsn, printed.stdout)
    assert code == 0, err
    assert (await reconcile(db_dsn))["ok"] is True
    assert await report_ledger(db_dsn, story.running) == [("report_expired", UNBILLED)]
    assert (await fetch(db_dsn, "SELECT to_regnamespace($1) AS s", ARCHIVE))[0]["s"] is None


async def test_archive_never_overwrites_another_archive_or_writes_into_a_foreign_schema(
    db_dsn: str,
) -> None:
    await tell_the_story(db_dsn)
    versions_before = await migration_rows(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            f"CREATE SCHEMA {ARCHIVE}; CREATE TABLE {ARCHIVE}.report_step_usage (x int);"
            f" INSERT INTO {ARCHIVE}.report_step_usage VALUES (1)"
        )
        stale = await run_cli("migrate", "rollback", "--to", V1, "--archive", dsn=db_dsn)
        assert_one_line_error(
            stale,
            f"{ARCHIVE}.report_step_usage already exists and holds 1 row(s)",
            "(nothing was changed)",
        )
        await conn.execute(
            f"DROP SCHEMA {ARCHIVE} CASCADE; CREATE ROLE tt_squatter;"
            f" CREATE SCHEMA {ARCHIVE} AUTHORIZATION tt_squatter"
        )
        try:
            foreign = await run_cli("migrate", "rollback", "--to", V1, "--archive", dsn=db_dsn)
            assert_one_line_error(foreign, f"schema {ARCHIVE} belongs to role tt_squatter")
        finally:
            await conn.execute(f"DROP SCHEMA {ARCHIVE}; DROP ROLE tt_squatter")
    finally:
        await conn.close()
    assert await migration_rows(db_dsn) == versions_before


async def test_install_refuses_an_archive_view_of_another_role_and_never_runs_its_function(
    empty_db_dsn: str,
) -> None:
    """A role with CREATE on the database plants tokentrack_archive.report_reservations as a
    view over its own function: install refuses from the catalog, the function never runs."""
    await migrate.install(empty_db_dsn)
    await migrate.rollback(empty_db_dsn, to=V1)
    squatter = f"tt_squatter_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f"CREATE ROLE {squatter}; GRANT CREATE ON DATABASE {database} TO {squatter};"
            f" SET ROLE {squatter}; CREATE SCHEMA {ARCHIVE}; CREATE TABLE {ARCHIVE}.marker (x int);"
            f" CREATE FUNCTION {ARCHIVE}.planted() RETURNS SETOF int LANGUAGE plpgsql AS"
            f" $$BEGIN INSERT INTO {ARCHIVE}.marker VALUES (1); RETURN; END$$;"
            f" CREATE VIEW {ARCHIVE}.report_reservations AS SELECT * FROM {ARCHIVE}.planted() AS x;"
            f" GRANT USAGE ON SCHEMA {ARCHIVE} TO PUBLIC; GRANT ALL ON {ARCHIVE}.marker TO PUBLIC;"
            " RESET ROLE"
        )
        try:
            refused = await run_cli("migrate", "install", dsn=empty_db_dsn)
            assert await conn.fetchval(f"SELECT count(*) FROM {ARCHIVE}.marker") == 0
            assert_one_line_error(
                refused,
                f"schema {ARCHIVE} belongs to role {squatter}, not to postgres",
                "nothing was changed",
            )
            assert [r["version"] for r in await migration_rows(empty_db_dsn)] == [V1]
        finally:
            await conn.execute(f"DROP SCHEMA {ARCHIVE} CASCADE; DROP OWNED BY {squatter}")
            await conn.execute(f"DROP ROLE {squatter}")
    finally:
        await conn.close()


async def test_install_refuses_an_archive_table_another_role_owns(
    empty_db_dsn: str, pg_server: Any
) -> None:
    """The schema is the owner's, one archive table is not: install and the printed SQL refuse."""
    await migrate.install(empty_db_dsn)
    other = f"tt_other_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute(
            f"CREATE ROLE {other}; CREATE SCHEMA {ARCHIVE};"
            f" CREATE TABLE {ARCHIVE}.report_step_usage (archived_at timestamptz NOT NULL,"
            " archived_version text NOT NULL,"
            f" LIKE tokentrack.report_step_usage); ALTER TABLE {ARCHIVE}.report_step_usage"
            f" OWNER TO {other}"
        )
        try:
            await migrate.rollback(empty_db_dsn, to=V1)
            refused = await run_cli("migrate", "install", dsn=empty_db_dsn)
            expected = (
                f"{ARCHIVE}.report_step_usage is a relation of kind 'r' owned by role {other},"
                " not an ordinary table (kind 'r') owned by postgres"
            )
            assert_one_line_error(refused, expected, "nothing was changed")
            printed = await run_cli("migrate", "sql", "--pending", dsn=empty_db_dsn)
            assert printed.returncode == 0, printed
            code, err = await psql(pg_server, empty_db_dsn, printed.stdout)
            assert code != 0, err
            assert expected in err, err
            assert [r["version"] for r in await migration_rows(empty_db_dsn)] == [V1]
            assert await conn.fetchval(f"SELECT to_regclass('{ARCHIVE}.report_step_usage')")
        finally:
            await conn.execute(f"DROP SCHEMA IF EXISTS {ARCHIVE} CASCADE; DROP ROLE {other}")
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# The declaration: `-- billing-tables:` in each rollback file
# --------------------------------------------------------------------------------------------


async def test_every_table_a_version_creates_is_one_of_its_billing_tables(
    make_database: Any, tmp_path: Path
) -> None:
    """Each version's declaration names exactly the tables its install creates."""
    assert [v.billing_tables for v in VERSIONS[:2]] == [V1_TABLES, V2_TABLES]
    dsn = await make_database()
    seen = set(BOOKKEEPING)
    for n, version in enumerate(VERSIONS):
        prefix = tmp_path / f"upto_{n}"
        for v in VERSIONS[: n + 1]:
            for sql_file in (v.schema, v.rollback, *v.functions):
                target = prefix / sql_file.relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(sql_file.text)
        await migrate.install(dsn, sql_dir=prefix)
        tables = (await tokentrack_objects(dsn))[0]
        # Views hold no rows: not billing tables (version 20261213000000's refusal_counters).
        assert tables - seen - VIEWS == set(version.billing_tables), version.label
        seen = tables


VIEWS: Final = frozenset({"refusal_counters"})


def _edit_v2_rollback(sql_dir: Path, old: str, new: str) -> None:
    path = next((sql_dir / "rollback").glob(f"{V2}_*.sql"))
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BILLING_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "no declaration": (
        "-- billing-tables: report_reservations, report_step_usage\n",
        "",
        "no '-- billing-tables: ...' line",
    ),
    "malformed declaration": (
        "-- billing-tables: report_reservations, report_step_usage",
        "-- billing-tables: report_reservations report_step_usage",
        "malformed header line",
    ),
    "two declarations": (
        "-- billing-tables: report_reservations, report_step_usage\n",
        "-- billing-tables: report_reservations\n-- billing-tables: report_step_usage\n",
        "more than one '-- billing-tables:' header line",
    ),
    "a table named twice": (
        "-- billing-tables: report_reservations, report_step_usage",
        "-- billing-tables: report_reservations, report_reservations",
        "billing table report_reservations is named twice",
    ),
    "a table of another version": (
        "-- billing-tables: report_reservations, report_step_usage",
        "-- billing-tables: report_reservations, usage_ledger",
        "billing table usage_ledger is not created by schema/20260108000000",
    ),
    "a created table left out": (
        "-- billing-tables: report_reservations, report_step_usage",
        "-- billing-tables: report_reservations",
        "creates tokentrack.report_step_usage, which its '-- billing-tables:' line does not",
    ),
    "none while creating tables": (
        "-- billing-tables: report_reservations, report_step_usage",
        "-- billing-tables: none",
        "creates tokentrack.report_reservations, tokentrack.report_step_usage, which",
    ),
}


@pytest.mark.parametrize("mutation", list(BILLING_MUTATIONS), ids=list(BILLING_MUTATIONS))
def test_the_loader_validates_the_billing_tables_declaration(mutation: str, tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    old, new, message = BILLING_MUTATIONS[mutation]
    _edit_v2_rollback(sql_dir, old, new)
    with pytest.raises(migrate.SqlLayoutError) as refused:
        migrate.load_versions(sql_dir)
    assert f"rollback/{V2}_antifragile_token_tracking.sql" in str(refused.value)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


async def test_install_refuses_a_declared_billing_table_it_did_not_create(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    """The loader sees a CREATE TABLE; the install checks that the table really exists."""
    sql_dir = copy_sql(tmp_path)
    (sql_dir / "schema" / "20990101000000_ghost.sql").write_text(
        "DO $$ BEGIN IF false THEN\nCREATE TABLE tokentrack.ghost (id int);\nEND IF; END $$;\n"
    )
    (sql_dir / "rollback" / "20990101000000_ghost.sql").write_text(
        "-- billing-tables: ghost\nDROP TABLE IF EXISTS tokentrack.ghost;\n"
    )
    result = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert_one_line_error(
        result,
        "version 20990101000000_ghost declares the billing table tokentrack.ghost",
        "its schema file did not create it",
    )
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == [
        v.version for v in VERSIONS
    ]


async def test_a_reservation_committed_while_the_rollback_waits_for_its_lock_is_counted(
    db_dsn: str,
) -> None:
    """Sessions of this database default to REPEATABLE READ. A reservation is being taken
    (uncommitted) when the rollback of version 20260108000000 starts; the rollback waits for
    its table lock, the reservation commits. The rollback must count it, under the lock, and
    refuse: with a snapshot taken before the lock it counted 0 rows and dropped the table."""
    admin = await asyncpg.connect(db_dsn)
    try:
        dbname = await admin.fetchval("SELECT current_database()")
        await admin.execute(
            f"ALTER DATABASE \"{dbname}\" SET default_transaction_isolation = 'repeatable read'"
        )
    finally:
        await admin.close()
    writer = await asyncpg.connect(db_dsn)
    watcher = await asyncpg.connect(db_dsn)
    try:
        account = uuid.uuid4()
        reserve = writer.transaction(isolation="read_committed")
        await reserve.start()
        await writer.fetchval("SELECT tokentrack.open_usage_period($1, 1000, NULL)", account)
        await writer.fetchval(
            "SELECT tokentrack.try_reserve_tokens($1, $2, 10)", account, uuid.uuid4()
        )
        rollback = asyncio.create_task(migrate.rollback(db_dsn, to=V1))
        waiting = 0
        for _ in range(400):  # until the rollback waits for a table the reservation holds
            # (report_reservations; since version 20261210000000 the first wait is for the
            # budgets table, which the reservation locked in ROW SHARE while finding none)
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation"
                " WHERE NOT l.granted AND c.relnamespace = 'tokentrack'::regnamespace"
            )
            if waiting or rollback.done():
                break
            await asyncio.sleep(0.025)
        assert waiting, "the rollback never waited for the table lock"
        await reserve.commit()
        with pytest.raises(migrate.RollbackRefused, match=r"1 row\(s\) of tokentrack\.report_"):
            await rollback
        count = await watcher.fetchval("SELECT count(*) FROM tokentrack.report_reservations")
        assert count == 1
    finally:
        await writer.close()
        await watcher.close()
