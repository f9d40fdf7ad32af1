"""Repeatable function files: applied when changed, restored byte for byte on rollback."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import asyncpg
from test_install import (
    NEWEST,
    NEWEST_NAME,
    REPO_SQL,
    VERSIONS,
    SchemaDump,
    copy_sql,
    function_rows,
    introduced_by,
    migration_rows,
    run_cli,
    tokentrack_objects,
)

from tokentrack_client import migrate

# Two versions newer than any in the repository, added to a copy of it by the tests below.
V3, V4 = "20990101000000", "20990201000000"


async def definitions(dsn: str) -> dict[str, tuple[int, str, str]]:
    """regprocedure -> (oid, pg_get_functiondef, acl) of every routine in tokentrack."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS sig, p.oid::int AS oid,"
            " pg_get_functiondef(p.oid) AS def, coalesce(p.proacl::text, '') AS acl"
            " FROM pg_proc p WHERE p.pronamespace = 'tokentrack'::regnamespace"
        )
        return {r["sig"]: (r["oid"], r["def"], r["acl"]) for r in rows}
    finally:
        await conn.close()


def function_table(stdout: str) -> dict[str, str]:
    """FUNCTION FILE -> STATUS from ``migrate list`` (empty when nothing differs)."""
    parts = stdout.split("\n\n")
    if len(parts) < 2:
        return {}
    return dict(line.split()[:2] for line in parts[1].splitlines()[1:])


def edit_increment_usage(sql_dir: Path) -> str:
    """Change increment_usage's body (a comment inside it); return the new file text."""
    path = sql_dir / "functions" / "increment_usage.sql"
    text = path.read_text()
    marker = "AS $function$\n"
    assert marker in text
    # The dollar-quote delimiter of the printed SQL must not end the text early.
    text = text.replace(marker, marker + "-- changed body; mentions $tokentrack_source$\n", 1)
    path.write_text(text)
    return text


async def test_a_changed_function_is_applied_alone_and_rolled_back_byte_for_byte(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    before = await definitions(empty_db_dsn)
    rows_before = await function_rows(empty_db_dsn)
    listed = await run_cli("migrate", "list", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert function_table(listed.stdout) == {}

    new_text = edit_increment_usage(sql_dir)
    listed = await run_cli("migrate", "list", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert listed.returncode == 0, listed
    assert function_table(listed.stdout) == {"functions/increment_usage.sql": "changed"}

    installed = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert installed.returncode == 0, installed
    assert installed.stdout.splitlines() == [
        "applied changed function file functions/increment_usage.sql",
        f"tokentrack schema stays at version {NEWEST} ({NEWEST_NAME})",
    ]
    after = await definitions(empty_db_dsn)
    changed = {sig for sig in before if before[sig] != after.get(sig)}
    signature = "tokentrack.increment_usage(uuid,integer,boolean,boolean)"
    assert changed == {signature}
    assert after.keys() == before.keys()
    assert after[signature][0] == before[signature][0]  # same OID: CREATE OR REPLACE
    assert after[signature][2] == before[signature][2]  # same grants
    assert "-- changed body" in after[signature][1]
    rows = await function_rows(empty_db_dsn)
    assert rows[: len(rows_before)] == rows_before
    assert len(rows) == len(rows_before) + 1
    assert rows[-1]["path"] == "functions/increment_usage.sql"
    assert rows[-1]["source"] == new_text
    assert rows[-1]["version"] == NEWEST  # undone by rolling back the newest version
    listed = await run_cli("migrate", "list", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert function_table(listed.stdout) == {}

    again = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert "nothing was done" in again.stdout

    # Rolling back the newest version restores the body increment_usage had before, recorded
    # in the database: the SQL directory given holds only the new text.
    result = await migrate.rollback(empty_db_dsn, sql_dir=sql_dir)
    assert [v.version for v in result.versions] == [NEWEST]
    # With it, the files the newest version changed get back their text of the version before
    # (sql/history/), which the fresh install recorded first.
    reworked = reworked_by_newest()
    assert result.versions[0].restored == tuple(
        sorted({"functions/increment_usage.sql", *reworked})
    )
    restored = await definitions(empty_db_dsn)
    assert restored[signature] == before[signature]  # byte for byte, same OID and grants
    newest_functions = introduced_by(VERSIONS[-1:])
    assert {sig for sig in restored if sig.split("(")[0][11:] in newest_functions} == set()
    kept = {k: v for k, v in before.items() if k in restored and _file_of(k) not in reworked}
    assert {k: v for k, v in restored.items() if _file_of(k) not in reworked} == kept
    assert await function_rows(empty_db_dsn) == [r for r in rows_before if r["version"] != NEWEST]

    # Up again: the newest version and the changed increment_usage come back in its
    # transaction.
    up = await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    assert [v.version for v in up.versions] == [NEWEST]
    assert "functions/increment_usage.sql" in {f.path for f in up.functions if f.kind == "changed"}
    assert (await definitions(empty_db_dsn))[signature][1] == after[signature][1]


def reworked_by_newest() -> set[str]:
    """The function files that the newest version changed: those with a history text of the
    version before it (sql/history/<that version>/)."""
    previous = VERSIONS[-2].version
    return {
        f.relpath
        for f in migrate.load_functions()
        if any(until == previous for until, _ in f.history)
    }


def _file_of(signature: str) -> str:
    """``functions/<name>.sql`` of ``tokentrack.<name>(...)``."""
    return f"functions/{signature.split('(')[0].removeprefix('tokentrack.')}.sql"


def add_version(sql_dir: Path, version: str, name: str, schema: str, rollback: str) -> None:
    """A version of its own; its rollback file declares the tables its schema file creates."""
    (sql_dir / "schema" / f"{version}_{name}.sql").write_text(schema)
    tables = ", ".join(migrate._CREATED_TABLE_RE.findall(schema)) or "none"
    (sql_dir / "rollback" / f"{version}_{name}.sql").write_text(
        f"-- billing-tables: {tables}\n{rollback}"
    )


PROBE_V3 = f"""\
-- version: {V3}
--
-- A probe whose signature and result depend on version {V3}'s table.
CREATE OR REPLACE FUNCTION tokentrack.later_probe(p_limit integer)
RETURNS SETOF tokentrack.later_marker
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $function$
    SELECT * FROM tokentrack.later_marker ORDER BY id LIMIT p_limit
$function$;

REVOKE ALL ON FUNCTION tokentrack.later_probe(integer) FROM PUBLIC;
"""

PROBE_V4 = f"""\
-- version: {V3}
CREATE OR REPLACE FUNCTION tokentrack.later_probe(p_limit integer, p_offset integer)
RETURNS SETOF tokentrack.later_marker
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $function$
    SELECT * FROM tokentrack.later_marker ORDER BY id LIMIT p_limit OFFSET p_offset
$function$;

REVOKE ALL ON FUNCTION tokentrack.later_probe(integer, integer) FROM PUBLIC;
"""


async def test_a_new_version_function_and_a_changed_argument_list(
    empty_db_dsn: str, tmp_path: Path, schema_dump: SchemaDump
) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    at_v2, defs_v2 = schema_dump(empty_db_dsn), await definitions(empty_db_dsn)

    add_version(
        sql_dir,
        V3,
        "later",
        "CREATE TABLE tokentrack.later_marker (id int PRIMARY KEY);\n",
        "DROP TABLE tokentrack.later_marker;\n",
    )
    (sql_dir / "functions" / "later_probe.sql").write_text(PROBE_V3)
    v3 = await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    assert [v.version for v in v3.versions] == [V3]
    assert [(f.path, f.kind, f.version) for f in v3.functions] == [
        ("functions/later_probe.sql", "new", V3)
    ]
    assert v3.functions[0].signatures == ("tokentrack.later_probe(integer)",)
    defs_v3 = await definitions(empty_db_dsn)
    assert defs_v3.keys() - defs_v2.keys() == {"tokentrack.later_probe(integer)"}

    # V4 changes the probe's argument list: the old signature is dropped, the change belongs
    # to V4 (the version applied with it).
    add_version(
        sql_dir,
        V4,
        "later_data",
        "INSERT INTO tokentrack.later_marker VALUES (1), (2), (3);\n",
        "DELETE FROM tokentrack.later_marker;\n",
    )
    (sql_dir / "functions" / "later_probe.sql").write_text(PROBE_V4)
    v4 = await run_cli("migrate", "install", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert v4.returncode == 0, v4
    assert v4.stdout.splitlines() == [
        f"applied {V4} later_data",
        "applied changed function file functions/later_probe.sql",
        "dropped tokentrack.later_probe(integer): no longer defined by functions/later_probe.sql",
        f"tokentrack schema is now at version {V4} (later_data)",
    ]
    defs_v4 = await definitions(empty_db_dsn)
    assert defs_v4.keys() - defs_v2.keys() == {"tokentrack.later_probe(integer,integer)"}
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tokentrack.later_probe(5, 1)") == 2
    finally:
        await conn.close()

    # Rolling back V4 brings the one-argument probe back, byte for byte; V3 drops it (its
    # result type is V3's table: dropped before the table).
    down = await run_cli("migrate", "rollback", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert down.returncode == 0, down
    assert f"rolled back {V4} later_data" in down.stdout
    # Same text and grants (a new OID: that signature had been dropped).
    assert {k: v[1:] for k, v in (await definitions(empty_db_dsn)).items()} == {
        k: v[1:] for k, v in defs_v3.items()
    }
    await migrate.rollback(empty_db_dsn, sql_dir=sql_dir)
    assert await definitions(empty_db_dsn) == defs_v2
    assert "later_marker" not in (await tokentrack_objects(empty_db_dsn))[0]
    assert schema_dump(empty_db_dsn) == at_v2
    assert "functions/later_probe.sql" not in {r["path"] for r in await function_rows(empty_db_dsn)}


async def test_a_removed_function_file_is_dropped_and_its_rollback_restores_it(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    sql_dir = copy_sql(tmp_path)
    await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    before = await definitions(empty_db_dsn)
    # reconcile is called by no other function: removing its file is a clean removal.
    (sql_dir / "functions" / "reconcile.sql").unlink()
    for old in (sql_dir / "history").glob("*/reconcile.sql"):
        old.unlink()  # its earlier texts go with it
    listed = await run_cli("migrate", "list", dsn=empty_db_dsn, sql_dir=sql_dir)
    assert function_table(listed.stdout) == {"functions/reconcile.sql": "removed"}

    result = await migrate.install(empty_db_dsn, sql_dir=sql_dir)
    assert [(f.path, f.kind, f.dropped) for f in result.functions] == [
        ("functions/reconcile.sql", "removed", ("tokentrack.reconcile(uuid)",))
    ]
    assert "tokentrack.reconcile(uuid)" not in await definitions(empty_db_dsn)
    await migrate.rollback(empty_db_dsn, sql_dir=sql_dir)
    await migrate.install(empty_db_dsn, sql_dir=REPO_SQL)
    assert await definitions(empty_db_dsn) != before  # reconcile is back, with a new OID...
    assert {k: v[1:] for k, v in (await definitions(empty_db_dsn)).items()} == {
        k: v[1:] for k, v in before.items()
    }  # ...and the same definition and grants


# --------------------------------------------------------------------------------------------
# A database installed by the older installer (function files checksummed per version)
# --------------------------------------------------------------------------------------------


def legacy_text(text: str) -> str:
    """A function file as the older layout had it: CREATE, not CREATE OR REPLACE."""
    return text.replace("CREATE OR REPLACE FUNCTION ", "CREATE FUNCTION ").replace(
        "CREATE OR REPLACE PROCEDURE ", "CREATE PROCEDURE "
    )


async def install_the_old_way(dsn: str, sql_dir: Path) -> None:
    """Do what the older installer did: per version, its schema file and its function files
    (old layout) in one transaction, and a row whose files and checksum cover all of them."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(migrate.BOOTSTRAP_SQL)
        await conn.execute("DROP TABLE tokentrack.schema_functions")
        for version in migrate.load_versions(sql_dir):
            files = [(version.schema.relpath, version.schema.text)] + [
                (f.relpath, legacy_text(f.text)) for f in version.functions
            ]
            digests = {p: hashlib.sha256(t.encode()).hexdigest() for p, t in files}
            listing = "".join(f"{digests[p]}  {p}\n" for p, _ in files)
            async with conn.transaction():
                for _, text in files:
                    await conn.execute(text)
                await conn.execute(
                    "INSERT INTO tokentrack.schema_migrations (version, name, checksum, files)"
                    " VALUES ($1, $2, $3, $4::jsonb)",
                    version.version,
                    version.name,
                    hashlib.sha256(listing.encode()).hexdigest(),
                    json.dumps(digests),
                )
    finally:
        await conn.close()


async def test_an_older_installation_is_upgraded_in_place(
    make_database: Any, schema_dump: SchemaDump, tmp_path: Path
) -> None:
    legacy, fresh = await make_database(), await make_database()
    await install_the_old_way(legacy, REPO_SQL)
    await migrate.install(fresh)
    defs = await definitions(legacy)

    upgraded = await run_cli("migrate", "install", dsn=legacy)
    assert upgraded.returncode == 0, upgraded
    count = len(list((REPO_SQL / "functions").glob("*.sql")))
    assert upgraded.stdout.splitlines() == [
        f"recorded {count} function file(s) applied by an older tokentrack installer in "
        "tokentrack.schema_functions",
        f"tokentrack schema stays at version {NEWEST} ({NEWEST_NAME})",
    ]
    assert await definitions(legacy) == defs  # no function was touched
    assert schema_dump(legacy) == schema_dump(fresh)
    keep = ("version", "name", "checksum", "files")
    assert [{k: r[k] for k in keep} for r in await migration_rows(legacy)] == [
        {k: r[k] for k in keep} for r in await migration_rows(fresh)
    ]
    by_path = sorted(await function_rows(legacy), key=lambda r: str(r["path"]))
    # The fresh install records them by path; it also records first the earlier texts of the
    # files a version reworked (sql/history/), which an older installer never applied: the
    # newest row of each path is the same, and owned by the same version where nothing was
    # reworked.
    newest_fresh = {r["path"]: r for r in await function_rows(fresh)}
    reworked = {f.relpath for f in migrate.load_functions() if f.history}
    same = ("path", "sha256", "source", "signatures")
    assert [{k: r[k] for k in same} for r in by_path] == [
        {k: r[k] for k in same} for r in newest_fresh.values()
    ]
    assert [r for r in by_path if r["path"] not in reworked] == [
        r for r in newest_fresh.values() if r["path"] not in reworked
    ]
    again = await run_cli("migrate", "install", dsn=legacy)
    assert "nothing was done" in again.stdout

    # And it rolls back like any other.
    await migrate.rollback(legacy, steps=len(VERSIONS))
    assert await definitions(legacy) == {}


OLD_HELPER = """\
-- version: 20260108000000
CREATE FUNCTION tokentrack.old_helper(p_n integer)
RETURNS integer
LANGUAGE sql
AS $function$ SELECT p_n + 1 $function$;
COMMENT ON FUNCTION tokentrack.old_helper(integer) IS 'a helper the next release removed';
REVOKE ALL ON FUNCTION tokentrack.old_helper(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.old_helper(integer) TO tokentrack_service;
"""


async def comments(dsn: str) -> dict[str, str | None]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS sig, obj_description(p.oid, 'pg_proc') AS c"
            " FROM pg_proc p WHERE p.pronamespace = 'tokentrack'::regnamespace"
        )
        return {r["sig"]: r["c"] for r in rows}
    finally:
        await conn.close()


async def test_an_older_release_is_upgraded_and_its_rollback_restores_that_release(
    make_database: Any, tmp_path: Path
) -> None:
    """A database installed by the older installer from an older release, whose function
    files differ from this release's (one edited, one removed since), as every real upgrade
    does: the install applies the edited file and drops the removed routine, and rolling back
    brings back the older release's routines exactly (definition, grants, comment), from what
    the database held, since no file of that release is on disk."""
    old_release = copy_sql(tmp_path)
    reconcile = old_release / "functions" / "reconcile.sql"
    marker = "AS $function$\n"
    assert marker in reconcile.read_text()
    reconcile.write_text(reconcile.read_text().replace(marker, marker + "-- older release\n", 1))
    (old_release / "functions" / "old_helper.sql").write_text(OLD_HELPER)
    legacy, fresh = await make_database(), await make_database()
    await install_the_old_way(legacy, old_release)
    await migrate.install(fresh)
    old_defs, old_comments = await definitions(legacy), await comments(legacy)
    assert "tokentrack.old_helper(integer)" in old_defs

    upgraded = await run_cli("migrate", "install", dsn=legacy)
    assert upgraded.returncode == 0, upgraded
    assert "applied changed function file functions/reconcile.sql" in upgraded.stdout
    assert "removed function file functions/old_helper.sql" in upgraded.stdout
    now = await definitions(legacy)
    assert {sig: (d, acl) for sig, (_, d, acl) in now.items()} == {
        sig: (d, acl) for sig, (_, d, acl) in (await definitions(fresh)).items()
    }
    assert (await run_cli("migrate", "list", dsn=legacy)).stdout.count("\n\n") == 0

    # The changes belong to the newest version: rolling it back restores the older release.
    await migrate.rollback(legacy, steps=1)
    restored = await definitions(legacy)
    for sig in ("tokentrack.reconcile(uuid)", "tokentrack.old_helper(integer)"):
        assert restored[sig][1:] == old_defs[sig][1:], sig  # definition and grants
    assert (await comments(legacy))["tokentrack.old_helper(integer)"] == old_comments[
        "tokentrack.old_helper(integer)"
    ]


# --------------------------------------------------------------------------------------------
# The printed SQL does the same bookkeeping
# --------------------------------------------------------------------------------------------


async def psql(pg_server: Any, dsn: str, script: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        pg_server.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=pg_server.client_env(),
    )  # fmt: skip
    _, err = await proc.communicate(script.encode())
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_sql_pending_applies_a_changed_function_like_the_migrator(
    make_database: Any, schema_dump: SchemaDump, pg_server: Any, tmp_path: Path
) -> None:
    sql_dir = copy_sql(tmp_path)
    by_psql, by_migrator = await make_database(), await make_database()
    for dsn in (by_psql, by_migrator):
        await migrate.install(dsn, sql_dir=sql_dir)
    edit_increment_usage(sql_dir)

    printed = await run_cli("migrate", "sql", "--pending", dsn=by_psql, sql_dir=sql_dir)
    assert printed.returncode == 0, printed
    assert "-- ===== function files =====" in printed.stdout
    assert "$tokentrack_source_1$" in printed.stdout  # the text holds $tokentrack_source$
    code, err = await psql(pg_server, by_psql, printed.stdout)
    assert code == 0, err
    await migrate.install(by_migrator, sql_dir=sql_dir)
    assert schema_dump(by_psql) == schema_dump(by_migrator)
    defs_psql = {k: v[1:] for k, v in (await definitions(by_psql)).items()}
    assert defs_psql == {k: v[1:] for k, v in (await definitions(by_migrator)).items()}
    assert await function_rows(by_psql) == await function_rows(by_migrator)
    check = await run_cli("migrate", "install", dsn=by_psql, sql_dir=sql_dir)
    assert "nothing was done" in check.stdout

    # The same script again is refused: that change is already recorded.
    code, err = await psql(pg_server, by_psql, printed.stdout)
    assert code != 0
    assert "functions/increment_usage.sql is already recorded" in err

    # The database keeps what a rollback needs: back to the body of before, byte for byte.
    await migrate.rollback(by_psql, sql_dir=sql_dir)
    original = (REPO_SQL / "functions" / "increment_usage.sql").read_text()
    rows = await function_rows(by_psql)
    assert [r["source"] for r in rows if r["path"] == "functions/increment_usage.sql"] == [original]
