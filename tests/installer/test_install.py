"""The migrator and the ``tokentrack migrate`` CLI against a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tokentrack_client import migrate
from tokentrack_client.cli import main

V1, V1_NAME = "20251219000000", "add_usage_tracking"
V2, V2_NAME = "20260108000000", "antifragile_token_tracking"
V1_TABLES = {"accounts", "usage_periods", "reports"}
V1_FUNCTIONS = {"increment_usage"}
V2_TABLES = {"report_step_usage", "report_reservations"}
BOOKKEEPING = {"schema_migrations", "schema_functions"}
V2_FUNCTIONS = {
    "try_reserve_tokens",
    "persist_step_usage",
    "finalize_report_usage",
    "finish_report",
    "cleanup_expired_reservations",
    "reconcile",
}
REPO_SQL = migrate.default_sql_dir()
# Every version of the repository, oldest first: tests meaning "every version" or "the newest"
# use these, so that adding a version does not change what they assert. V1 and V2 above are
# the first two versions, which tests about their tables and functions name explicitly.
VERSIONS = migrate.load_versions(REPO_SQL)
ALL = [v.version for v in VERSIONS]
NEWEST, NEWEST_NAME = VERSIONS[-1].version, VERSIONS[-1].name
CLI_TIMEOUT = 120

SchemaDump = Callable[[str], str]
DatabaseFactory = Callable[..., Awaitable[str]]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    """Exit status and output of one ``python -m tokentrack_client`` run."""

    returncode: int
    stdout: str
    stderr: str


async def run_cli(*args: str, dsn: str | None = None, sql_dir: Path | None = None) -> CliResult:
    """Run the CLI as a subprocess, with DATABASE_URL (and TOKENTRACK_SQL_DIR) as given."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TOKENTRACK_SQL_DIR")}
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    if sql_dir is not None:
        env["TOKENTRACK_SQL_DIR"] = str(sql_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokentrack_client",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(CLI_TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


def assert_one_line_error(result: CliResult, *fragments: str) -> str:
    """Exit 2, one stderr line ``tokentrack: error: ...`` holding every fragment, no traceback."""
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tokentrack: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def applied_versions(stdout: str) -> list[str]:
    """The ``applied <VERSION> <name>`` lines of ``migrate install``, in order."""
    return [line for line in stdout.splitlines() if re.fullmatch(r"applied \d{14} \w+", line)]


async def migration_rows(dsn: str) -> list[dict[str, Any]]:
    """Rows of tokentrack.schema_migrations (empty when the table does not exist)."""
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval(
            "SELECT to_regclass('tokentrack.schema_migrations') IS NOT NULL"
        ):
            return []
        rows = await conn.fetch(
            "SELECT version, name, checksum, files, applied_at, applied_by "
            "FROM tokentrack.schema_migrations ORDER BY version"
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


async def tokentrack_objects(dsn: str) -> tuple[set[str], set[str]]:
    """(tables, functions and procedures) in the tokentrack schema."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'tokentrack' AND c.relkind IN ('r', 'p', 'v', 'm')"
        )
        functions = await conn.fetch(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'tokentrack'"
        )
        return {r["relname"] for r in tables}, {r["proname"] for r in functions}
    finally:
        await conn.close()


async def schema_exists(dsn: str) -> bool:
    """Whether the tokentrack schema exists at all."""
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT to_regnamespace('tokentrack') IS NOT NULL"))
    finally:
        await conn.close()


def copy_sql(tmp_path: Path) -> Path:
    """A private copy of the repository's SQL directory, to edit freely."""
    target = tmp_path / "sql"
    shutil.copytree(REPO_SQL, target)
    return target


def with_user(dsn: str, user: str) -> str:
    """``dsn`` with another user name (trust auth: no password)."""
    parts = urlsplit(dsn)
    netloc = f"{user}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def expected_files(sql_dir: Path, version: str) -> dict[str, str]:
    """{relative path: sha256} of a version's schema file, computed from disk independently."""
    return {
        f"schema/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((sql_dir / "schema").glob(f"{version}_*.sql"))
    }


def expected_checksum(files: dict[str, str]) -> str:
    """sha256 of the files in sha256sum format (one line per file, in path order)."""
    listing = "".join(f"{files[p]}  {p}\n" for p in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


async def function_rows(dsn: str) -> list[dict[str, Any]]:
    """Rows of tokentrack.schema_functions without id and applied_at, oldest first."""
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('tokentrack.schema_functions') IS NOT NULL"):
            return []
        rows = await conn.fetch(
            "SELECT path, sha256, source, version, signatures::text AS signatures"
            " FROM tokentrack.schema_functions ORDER BY id"
        )
        return [{**dict(r), "signatures": json.loads(r["signatures"])} for r in rows]
    finally:
        await conn.close()


@pytest.fixture
async def limited_role(empty_db_dsn: str, pg_server: Any) -> AsyncIterator[str]:
    """A LOGIN role without CREATE on ``empty_db_dsn``; dropped (with its grants) after."""
    role = f"tt_limited_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server.dsn(pg_server.maintenance_dbname))
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    finally:
        await admin.close()
    try:
        yield role
    finally:
        conn = await asyncpg.connect(empty_db_dsn)
        try:
            await conn.execute(f'DROP OWNED BY "{role}"')
        finally:
            await conn.close()
        admin = await asyncpg.connect(pg_server.dsn(pg_server.maintenance_dbname))
        try:
            await admin.execute(f'DROP ROLE "{role}"')
        finally:
            await admin.close()


# --------------------------------------------------------------------------------------------
# install
# --------------------------------------------------------------------------------------------


async def test_install_applies_every_version_then_does_nothing(
    empty_db_dsn: str, schema_dump: SchemaDump
) -> None:
    first = await run_cli("migrate", "install", dsn=empty_db_dsn)
    assert first.returncode == 0, first
    # oldest first
    assert applied_versions(first.stdout) == [f"applied {v.version} {v.name}" for v in VERSIONS]

    rows = await migration_rows(empty_db_dsn)
    assert [(r["version"], r["name"]) for r in rows] == [(v.version, v.name) for v in VERSIONS]
    for row in rows:
        files = expected_files(REPO_SQL, row["version"])
        assert len(files) == 1  # the schema file alone: function files are repeatable
        assert json.loads(row["files"]) == files
        assert row["checksum"] == expected_checksum(files)
        assert row["applied_by"] == "postgres"
    # One history row per function file, with the version its header names, its full text
    # and the md5 of what PostgreSQL holds for each signature it defines; a file that a
    # version reworked has first a row for each earlier text (sql/history/<V>/), oldest first,
    # the next one owned by the version after V, so that its rollback restores the text of V.
    recorded = await function_rows(empty_db_dsn)
    expected: list[tuple[str, str, str]] = []  # (path, owning version, text)
    for fn in migrate.load_functions(REPO_SQL):
        owner = fn.version
        for until, old in fn.history:
            expected.append((fn.relpath, owner, old.text))
            owner = min(v.version for v in VERSIONS if v.version > until)
        expected.append((fn.relpath, owner, fn.file.text))
    assert [(r["path"], r["version"], r["source"]) for r in recorded] == expected
    newest = {r["path"]: r for r in recorded}
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        for row in recorded:
            assert row["sha256"] == hashlib.sha256(row["source"].encode()).hexdigest()
            assert row["signatures"], row["path"]
        for path, row in newest.items():
            assert (REPO_SQL / path).read_text() == row["source"]
            for signature, digest in row["signatures"].items():
                assert signature.startswith(f"tokentrack.{Path(path).stem}("), signature
                assert digest == await conn.fetchval(
                    "SELECT md5(pg_get_functiondef($1::regprocedure))", signature
                )
    finally:
        await conn.close()
    tables, functions = await tokentrack_objects(empty_db_dsn)
    assert tables >= V1_TABLES | V2_TABLES | BOOKKEEPING
    assert functions >= V1_FUNCTIONS | V2_FUNCTIONS

    dump_before = schema_dump(empty_db_dsn)
    second = await run_cli("migrate", "install", dsn=empty_db_dsn)
    assert second.returncode == 0, second
    assert f"up to date at version {NEWEST}" in second.stdout
    assert "nothing was done" in second.stdout
    assert "applied " not in second.stdout
    assert await migration_rows(empty_db_dsn) == rows
    assert await function_rows(empty_db_dsn) == recorded
    assert schema_dump(empty_db_dsn) == dump_before


async def test_template_database_is_built_by_the_migrator(conn: asyncpg.Connection) -> None:
    versions = await conn.fetch("SELECT version FROM tokentrack.schema_migrations ORDER BY 1")
    assert [r["version"] for r in versions] == ALL


async def test_concurrent_installers_apply_each_version_once(empty_db_dsn: str) -> None:
    # Hold the installers' lock so that all six are provably waiting before any can start.
    holder = await asyncpg.connect(empty_db_dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", migrate.ADVISORY_LOCK_KEY)
        runs = [
            asyncio.create_task(run_cli("migrate", "install", dsn=empty_db_dsn)) for _ in range(6)
        ]
        deadline = time.monotonic() + 60
        waiting = 0
        while waiting < 6:
            assert time.monotonic() < deadline, f"only {waiting} installers waiting"
            assert not any(r.done() for r in runs), [r.result() for r in runs if r.done()]
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            await asyncio.sleep(0.05)
        await holder.execute("SELECT pg_advisory_unlock($1)", migrate.ADVISORY_LOCK_KEY)
        results = await asyncio.gather(*runs)
    finally:
        await holder.close()

    assert all(r.returncode == 0 for r in results), results
    assert all("waiting for another tokentrack installer" in r.stderr for r in results)
    output = "".join(r.stdout for r in results)
    for version in VERSIONS:
        assert output.count(f"applied {version.version} {version.name}") == 1, version.version
    assert output.count("nothing was done") == 5
    rows = await migration_rows(empty_db_dsn)
    assert [r["version"] for r in rows] == ALL


async def test_drifted_applied_file_is_refused_and_nothing_changes(
    empty_db_dsn: str, tmp_path: Path, schema_dump: SchemaDump
) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    # Down to V1: every later version pending.
    await migrate.rollback(empty_db_dsn, steps=len(VERSIONS) - 1, sql_dir=sql_dir)
    rows_before, dump_before = await migration_rows(empty_db_dsn), schema_dump(empty_db_dsn)
    functions_before = await function_rows(empty_db_dsn)

    # An applied schema file is drift; a function file is not (it is applied again), but
    # nothing at all is applied while the schema file is refused.
    for edited in ("functions/increment_usage.sql", f"schema/{V1}_{V1_NAME}.sql"):
        with (sql_dir / edited).open("a") as f:
            f.write("\n-- an innocent-looking edit\n")

    result = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    line = assert_one_line_error(result, f"schema/{V1}_{V1_NAME}.sql", "changed")
    assert "increment_usage" not in line
    assert await migration_rows(empty_db_dsn) == rows_before
    assert await function_rows(empty_db_dsn) == functions_before
    assert schema_dump(empty_db_dsn) == dump_before

    listing = await run_cli("migrate", "list", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert listing.returncode == 0, listing
    v1_line = next(line for line in listing.stdout.splitlines() if line.startswith(V1))
    assert "drifted" in v1_line
    assert f"schema/{V1}_{V1_NAME}.sql" in v1_line
    functions = dict(line.split()[:2] for line in listing.stdout.split("\n\n")[1].splitlines()[1:])
    later = {f.relpath for v in VERSIONS[1:] for f in v.functions}  # rolled back with them
    assert "functions/reconcile.sql" in later  # V2's
    assert functions == {"functions/increment_usage.sql": "changed"} | dict.fromkeys(later, "new")
    assert "functions/open_usage_period.sql" not in functions  # V1's, unchanged


async def test_applied_version_missing_on_disk_is_refused(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    v2 = next(v for v in migrate.load_versions(sql_dir) if v.version == V2)
    for sql_file in (v2.schema, v2.rollback, *v2.functions):
        (sql_dir / sql_file.relpath).unlink()
        for old in (sql_dir / "history").glob(f"*/{Path(sql_file.relpath).name}"):
            old.unlink()  # the earlier texts of its function files go with them

    result = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert_one_line_error(result, f"{V2}_{V2_NAME}", "not found")
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL


async def test_pending_version_older_than_applied_is_refused(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    (sql_dir / "schema" / "20250101000000_backfill.sql").write_text(
        "CREATE TABLE tokentrack.backfill_marker (id int);\n"
    )
    (sql_dir / "rollback" / "20250101000000_backfill.sql").write_text(
        "-- billing-tables: backfill_marker\nDROP TABLE tokentrack.backfill_marker;\n"
    )
    result = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert_one_line_error(result, "20250101000000_backfill", "older")
    tables, _ = await tokentrack_objects(empty_db_dsn)
    assert "backfill_marker" not in tables
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL


async def test_new_version_on_top_is_applied_alone(empty_db_dsn: str, tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    (sql_dir / "schema" / "20990101000000_later.sql").write_text(
        "CREATE TABLE tokentrack.later_marker (id int);\n"
    )
    (sql_dir / "rollback" / "20990101000000_later.sql").write_text(
        "-- billing-tables: later_marker\nDROP TABLE tokentrack.later_marker;\n"
    )
    result = await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    assert [v.version for v in result.versions] == ["20990101000000"]
    assert result.functions == ()  # no function file changed
    assert result.lines()[0] == "applied 20990101000000 later"
    assert "later_marker" in (await tokentrack_objects(empty_db_dsn))[0]


async def test_failing_version_is_rolled_back_whole(empty_db_dsn: str, tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    (sql_dir / "schema" / "20990101000000_broken.sql").write_text(
        "CREATE TABLE tokentrack.broken_marker (id int);\nSELECT 1/0;\n"
    )
    (sql_dir / "rollback" / "20990101000000_broken.sql").write_text(
        "-- billing-tables: broken_marker\nSELECT 1;\n"
    )
    result = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert_one_line_error(
        result, "20990101000000_broken", "schema/20990101000000_broken.sql", "22012"
    )
    assert f"applied {NEWEST} {NEWEST_NAME}" in result.stdout  # the versions before it stay
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL
    assert "broken_marker" not in (await tokentrack_objects(empty_db_dsn))[0]


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


def _drop_header(sql_dir: Path) -> str:
    path = sql_dir / "functions" / "reconcile.sql"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith("-- version:")))
    return "functions/reconcile.sql"


def _unknown_header(sql_dir: Path) -> str:
    path = sql_dir / "functions" / "reconcile.sql"
    path.write_text(path.read_text().replace(f"-- version: {V2}", "-- version: 20991231000000"))
    return "functions/reconcile.sql"


def _malformed_header(sql_dir: Path) -> str:
    path = sql_dir / "functions" / "reconcile.sql"
    path.write_text(path.read_text().replace(f"-- version: {V2}", "-- version: 2026-01-08"))
    return "functions/reconcile.sql"


def _missing_rollback(sql_dir: Path) -> str:
    (sql_dir / "rollback" / f"{V2}_{V2_NAME}.sql").unlink()
    return f"schema/{V2}_{V2_NAME}.sql"


def _missing_schema(sql_dir: Path) -> str:
    (sql_dir / "schema" / f"{V2}_{V2_NAME}.sql").unlink()
    return f"rollback/{V2}_{V2_NAME}.sql"


def _renamed_rollback(sql_dir: Path) -> str:
    rollback = sql_dir / "rollback"
    (rollback / f"{V2}_{V2_NAME}.sql").rename(rollback / f"{V2}_other_name.sql")
    return f"schema/{V2}_{V2_NAME}.sql"


def _duplicate_version(sql_dir: Path) -> str:
    for kind in ("schema", "rollback"):
        (sql_dir / kind / f"{V1}_again.sql").write_text("SELECT 1;\n")
    return f"{V1}_again.sql"


def _bad_schema_name(sql_dir: Path) -> str:
    (sql_dir / "schema" / "2025_12_19_bad.sql").write_text("SELECT 1;\n")
    return "schema/2025_12_19_bad.sql"


def _bad_function_name(sql_dir: Path) -> str:
    (sql_dir / "functions" / "Bad-Name.sql").write_text(f"-- version: {V1}\nSELECT 1;\n")
    return "functions/Bad-Name.sql"


LOADER_MUTATIONS: dict[str, Callable[[Path], str]] = {
    "function without version header": _drop_header,
    "function naming an unknown version": _unknown_header,
    "function with a malformed header": _malformed_header,
    "schema without rollback": _missing_rollback,
    "rollback without schema": _missing_schema,
    "rollback with another name": _renamed_rollback,
    "duplicate version": _duplicate_version,
    "bad schema file name": _bad_schema_name,
    "bad function file name": _bad_function_name,
}


def test_repository_sql_loads() -> None:
    versions = migrate.load_versions(REPO_SQL)
    on_disk = sorted(p.stem.split("_", 1) for p in (REPO_SQL / "schema").glob("*.sql"))
    assert [[v.version, v.name] for v in versions] == on_disk  # every schema file, oldest first
    assert [(v.version, v.name) for v in versions[:2]] == [(V1, V1_NAME), (V2, V2_NAME)]
    names = {Path(f.relpath).stem for v in versions for f in v.functions}
    assert names == {p.stem for p in (REPO_SQL / "functions").glob("*.sql")}
    assert names >= V1_FUNCTIONS | V2_FUNCTIONS


@pytest.mark.parametrize("mutation", list(LOADER_MUTATIONS), ids=list(LOADER_MUTATIONS))
def test_loader_refuses(mutation: str, tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    migrate.load_versions(sql_dir)  # the untouched copy loads
    culprit = LOADER_MUTATIONS[mutation](sql_dir)
    with pytest.raises(migrate.SqlLayoutError) as refused:
        migrate.load_versions(sql_dir)
    assert culprit in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("mutation", ["schema without rollback", "function without version header"])
async def test_cli_refuses_bad_layout_before_touching_the_database(
    mutation: str, empty_db_dsn: str, tmp_path: Path
) -> None:
    sql_dir = copy_sql(tmp_path)
    culprit = LOADER_MUTATIONS[mutation](sql_dir)
    result = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert_one_line_error(result, culprit)
    assert not await schema_exists(empty_db_dsn)


# --------------------------------------------------------------------------------------------
# rollback
# --------------------------------------------------------------------------------------------


def introduced_by(versions: list[migrate.MigrationVersion]) -> set[str]:
    """Names of the functions whose files name one of ``versions`` in their header."""
    return {Path(f.relpath).stem for v in versions for f in v.functions}


async def test_rollback_removes_exactly_the_newest_version(empty_db_dsn: str) -> None:
    await migrate.install(empty_db_dsn)
    rows_before = await migration_rows(empty_db_dsn)
    recorded_before = await function_rows(empty_db_dsn)
    tables_before, functions_before = await tokentrack_objects(empty_db_dsn)

    one = await run_cli("migrate", "rollback", dsn=empty_db_dsn)
    assert one.returncode == 0, one
    rolled = [line for line in one.stdout.splitlines() if line.startswith("rolled back")]
    assert len(rolled) == 1, one.stdout
    assert rolled[0].startswith(f"rolled back {NEWEST} {NEWEST_NAME} "), rolled
    # The older versions keep their rows (applied_at included) and their function history.
    assert await migration_rows(empty_db_dsn) == rows_before[:-1]
    assert await function_rows(empty_db_dsn) == [
        r for r in recorded_before if r["version"] != NEWEST
    ]
    tables, functions = await tokentrack_objects(empty_db_dsn)
    assert introduced_by(VERSIONS[-1:]) <= functions_before - functions
    assert functions >= introduced_by(VERSIONS[:-1])
    assert tables <= tables_before
    assert tables >= V1_TABLES | V2_TABLES | BOOKKEEPING

    again = await run_cli("migrate", "install", dsn=empty_db_dsn)
    assert again.returncode == 0, again
    assert applied_versions(again.stdout) == [f"applied {NEWEST} {NEWEST_NAME}"]
    assert await tokentrack_objects(empty_db_dsn) == (tables_before, functions_before)

    # Down to V1: exactly V1's tables and functions remain.
    to_v1 = await run_cli("migrate", "rollback", "--steps", str(len(ALL) - 1), dsn=empty_db_dsn)
    assert to_v1.returncode == 0, to_v1
    assert f"rolled back {V2} {V2_NAME}" in to_v1.stdout
    assert f"rolled back {V1}" not in to_v1.stdout
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == [V1]
    tables, functions = await tokentrack_objects(empty_db_dsn)
    assert not tables & V2_TABLES
    assert not functions & V2_FUNCTIONS
    assert not functions & introduced_by(VERSIONS[1:])
    assert tables >= V1_TABLES
    assert functions >= V1_FUNCTIONS
    assert functions >= introduced_by(VERSIONS[:1])

    up = await run_cli("migrate", "install", dsn=empty_db_dsn)
    assert up.returncode == 0, up
    assert applied_versions(up.stdout) == [f"applied {v.version} {v.name}" for v in VERSIONS[1:]]
    assert await tokentrack_objects(empty_db_dsn) == (tables_before, functions_before)

    every = await run_cli("migrate", "rollback", "--steps", str(len(ALL)), dsn=empty_db_dsn)
    assert every.returncode == 0, every
    rolled = [line.split()[2] for line in every.stdout.splitlines() if line.startswith("rolled")]
    assert rolled == ALL[::-1]  # newest first
    assert await migration_rows(empty_db_dsn) == []
    tables, functions = await tokentrack_objects(empty_db_dsn)
    assert tables == BOOKKEEPING
    assert functions == set()

    nothing = await run_cli("migrate", "rollback", dsn=empty_db_dsn)
    assert nothing.returncode == 0, nothing
    assert "nothing to roll back" in nothing.stdout


async def test_rollback_on_a_database_without_tokentrack_changes_nothing(
    empty_db_dsn: str,
) -> None:
    result = await run_cli("migrate", "rollback", dsn=empty_db_dsn)
    assert result.returncode == 0, result
    assert "nothing to roll back" in result.stdout
    assert not await schema_exists(empty_db_dsn)


async def test_rollback_refuses_zero_steps(empty_db_dsn: str) -> None:
    await migrate.install(empty_db_dsn)
    result = await run_cli("migrate", "rollback", "--steps", "0", dsn=empty_db_dsn)
    assert_one_line_error(result, "--steps")
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL


async def test_rollback_to_a_version_keeps_it_and_undoes_every_later_one(
    empty_db_dsn: str,
) -> None:
    await migrate.install(empty_db_dsn)
    result = await run_cli("migrate", "rollback", "--to", V1, dsn=empty_db_dsn)
    assert result.returncode == 0, result.stderr
    undone = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("rolled")]
    assert undone == list(reversed(ALL[1:]))  # newest first, down to V1, which stays
    assert f"tokentrack schema is now at version {V1} ({V1_NAME})" in result.stdout
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == [V1]
    again = await run_cli("migrate", "rollback", "--to", V1, dsn=empty_db_dsn)
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.strip()
        == f"nothing to roll back: tokentrack schema is at version {V1} ({V1_NAME})"
    )


async def test_rollback_to_a_version_that_is_not_applied_is_refused(empty_db_dsn: str) -> None:
    await migrate.install(empty_db_dsn)
    result = await run_cli("migrate", "rollback", "--to", "20990101000000", dsn=empty_db_dsn)
    assert_one_line_error(result, "--to 20990101000000: not an applied version")
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL
    both = await run_cli("migrate", "rollback", "--to", V1, "--steps", "2", dsn=empty_db_dsn)
    assert both.returncode == 2  # argparse: --to and --steps exclude each other
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL


async def test_up_down_up_gives_the_same_schema(empty_db_dsn: str, schema_dump: SchemaDump) -> None:
    await migrate.install(empty_db_dsn)
    first_rows = await migration_rows(empty_db_dsn)
    first_functions = await function_rows(empty_db_dsn)
    first = schema_dump(empty_db_dsn)
    assert "CREATE TABLE tokentrack.report_reservations" in first

    await migrate.rollback(empty_db_dsn, steps=len(VERSIONS))
    tables, functions = await tokentrack_objects(empty_db_dsn)
    assert (tables, functions) == (BOOKKEEPING, set())

    assert await function_rows(empty_db_dsn) == []

    await migrate.install(empty_db_dsn)
    assert schema_dump(empty_db_dsn) == first
    again_rows = await migration_rows(empty_db_dsn)
    keep = ("version", "name", "checksum", "files")
    assert [{k: r[k] for k in keep} for r in again_rows] == [
        {k: r[k] for k in keep} for r in first_rows
    ]
    assert await function_rows(empty_db_dsn) == first_functions


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing half-applied
# --------------------------------------------------------------------------------------------


async def test_missing_database_url() -> None:
    result = await run_cli("migrate", "install")
    assert_one_line_error(result, "DATABASE_URL")


async def test_bad_database_url() -> None:
    result = await run_cli("migrate", "install", dsn="notaurl")
    assert_one_line_error(result, "invalid DATABASE_URL")


async def test_database_url_flag_wins_over_environment(empty_db_dsn: str) -> None:
    result = await run_cli("migrate", "install", "--database-url", empty_db_dsn, dsn="notaurl")
    assert result.returncode == 0, result
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL


async def test_unreachable_server() -> None:
    result = await run_cli(
        "migrate", "install", dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    )
    line = assert_one_line_error(result, "cannot connect", "127.0.0.1")
    assert "postgres@127.0.0.1" in line


async def test_unknown_role_is_an_authentication_error(empty_db_dsn: str) -> None:
    result = await run_cli("migrate", "install", dsn=with_user(empty_db_dsn, "no_such_role"))
    assert_one_line_error(result, "cannot connect", "SQLSTATE 28000")
    assert not await schema_exists(empty_db_dsn)


async def test_password_is_not_echoed(pg_server: Any) -> None:
    dsn = f"postgresql://someone:s3cr3t-pw@127.0.0.1:{free_port()}/db"
    result = await run_cli("migrate", "install", dsn=dsn)
    line = assert_one_line_error(result, "cannot connect")
    assert "s3cr3t-pw" not in line


async def test_role_without_create_on_database(empty_db_dsn: str, limited_role: str) -> None:
    result = await run_cli("migrate", "install", dsn=with_user(empty_db_dsn, limited_role))
    assert_one_line_error(result, "42501", "CREATE on the database")
    assert not await schema_exists(empty_db_dsn)


async def test_missing_privilege_while_applying_rolls_the_version_back(
    empty_db_dsn: str, limited_role: str
) -> None:
    admin = await asyncpg.connect(empty_db_dsn)
    try:
        await admin.execute(migrate.BOOTSTRAP_SQL)
        await admin.execute(f'GRANT USAGE ON SCHEMA tokentrack TO "{limited_role}"')
        bookkeeping = "tokentrack.schema_migrations, tokentrack.schema_functions"
        await admin.execute(f'GRANT SELECT ON {bookkeeping} TO "{limited_role}"')
    finally:
        await admin.close()

    result = await run_cli("migrate", "install", dsn=with_user(empty_db_dsn, limited_role))
    assert_one_line_error(result, f"{V1}_{V1_NAME}", "SQLSTATE 42501", "rolled back")
    assert await migration_rows(empty_db_dsn) == []
    tables, functions = await tokentrack_objects(empty_db_dsn)
    assert (tables, functions) == (BOOKKEEPING, set())


# --------------------------------------------------------------------------------------------
# list and sql
# --------------------------------------------------------------------------------------------


def _status_of(stdout: str) -> dict[str, str]:
    """VERSION -> STATUS from the first table of ``migrate list`` (up to the blank line)."""
    versions = stdout.split("\n\n")[0].splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in versions}


async def test_list_shows_applied_and_pending(empty_db_dsn: str) -> None:
    before = await run_cli("migrate", "list", dsn=empty_db_dsn)
    assert before.returncode == 0, before
    assert _status_of(before.stdout) == dict.fromkeys(ALL, "pending")
    assert not await schema_exists(empty_db_dsn)  # list is read-only

    await migrate.install(empty_db_dsn)
    await migrate.rollback(empty_db_dsn, steps=1)
    after = await run_cli("migrate", "list", dsn=empty_db_dsn)
    assert after.returncode == 0, after
    assert _status_of(after.stdout) == dict.fromkeys(ALL[:-1], "applied") | {NEWEST: "pending"}
    applied_at = (await migration_rows(empty_db_dsn))[0]["applied_at"]
    assert applied_at.isoformat(timespec="seconds") in after.stdout


async def test_sql_output_applied_with_psql_equals_the_migrator(
    make_database: DatabaseFactory, schema_dump: SchemaDump, pg_server: Any
) -> None:
    by_psql, by_migrator = await make_database(), await make_database()
    printed = await run_cli("migrate", "sql")
    assert printed.returncode == 0, printed
    lines = printed.stdout.splitlines()
    # The bootstrap, then one transaction per version (function files ride in the last one).
    assert lines.count("BEGIN;") == lines.count("COMMIT;") == 1 + len(VERSIONS)

    psql = await asyncio.create_subprocess_exec(
        pg_server.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", by_psql, "-f", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=pg_server.client_env(),
    )  # fmt: skip
    _, err = await psql.communicate(printed.stdout.encode())
    assert psql.returncode == 0, err.decode()

    await migrate.install(by_migrator)
    assert schema_dump(by_psql) == schema_dump(by_migrator)
    keep = ("version", "name", "checksum", "files")
    rows_psql = [{k: r[k] for k in keep} for r in await migration_rows(by_psql)]
    rows_migrator = [{k: r[k] for k in keep} for r in await migration_rows(by_migrator)]
    assert rows_psql == rows_migrator
    assert await function_rows(by_psql) == await function_rows(by_migrator)
    # One row per function file, and one more per earlier text of a reworked one.
    texts = sum(1 + len(f.history) for f in migrate.load_functions(REPO_SQL))
    assert len(await function_rows(by_psql)) == texts

    # The migrator accepts what psql recorded: same files, same checksums.
    check = await run_cli("migrate", "install", dsn=by_psql)
    assert check.returncode == 0, check
    assert "nothing was done" in check.stdout

    # Running the script twice stops at the first version, which is already applied.
    rerun = await asyncio.create_subprocess_exec(
        pg_server.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", by_psql, "-f", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=pg_server.client_env(),
    )  # fmt: skip
    _, err = await rerun.communicate(printed.stdout.encode())
    assert rerun.returncode != 0
    assert f"tokentrack version {V1} is already applied" in err.decode()
    assert [{k: r[k] for k in keep} for r in await migration_rows(by_psql)] == rows_psql


async def test_sql_pending_prints_only_what_is_missing(
    empty_db_dsn: str, db_dsn: str, schema_dump: SchemaDump, pg_server: Any
) -> None:
    await migrate.install(empty_db_dsn)
    await migrate.rollback(empty_db_dsn, steps=len(VERSIONS) - 1)  # only V1 stays applied

    printed = await run_cli("migrate", "sql", "--pending", dsn=empty_db_dsn)
    assert printed.returncode == 0, printed
    for version in VERSIONS[1:]:
        assert f"version {version.version}_{version.name}" in printed.stdout
    assert f"version {V1}_{V1_NAME}" not in printed.stdout

    psql = await asyncio.create_subprocess_exec(
        pg_server.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", empty_db_dsn, "-f", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=pg_server.client_env(),
    )  # fmt: skip
    _, err = await psql.communicate(printed.stdout.encode())
    assert psql.returncode == 0, err.decode()
    assert [r["version"] for r in await migration_rows(empty_db_dsn)] == ALL
    assert schema_dump(empty_db_dsn) == schema_dump(db_dsn)


async def test_sql_pending_needs_a_database() -> None:
    result = await run_cli("migrate", "sql", "--pending")
    assert_one_line_error(result, "DATABASE_URL")


# --------------------------------------------------------------------------------------------
# The command line itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["migrate"],
        ["migrate", "install"],
        ["migrate", "rollback"],
        ["migrate", "list"],
        ["migrate", "sql"],
        ["demo"],
    ],
    ids=lambda argv: " ".join(argv) or "tokentrack",
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokentrack")
    assert " ".join(["tokentrack", *argv]) in out.splitlines()[0]


async def test_demo_is_a_cli_command() -> None:
    # The demo itself runs end to end in tests/client/test_demo.py.
    result = await run_cli("demo", "--help")
    assert result.returncode == 0
    assert "throwaway PostgreSQL" in result.stdout


def test_advisory_lock_key_is_documented() -> None:
    assert int.from_bytes(b"tokentrk", "big") == migrate.ADVISORY_LOCK_KEY
    install_doc = Path(__file__).resolve().parents[2] / "docs" / "INSTALL.md"
    assert str(migrate.ADVISORY_LOCK_KEY) in install_doc.read_text()
