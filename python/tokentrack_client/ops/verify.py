"""``tokentrack verify``: the post-deploy checks.

Compares the database with what the applied versions' SQL files create (see
:mod:`tokentrack_client.ops.catalog`): versions and checksums in ``schema_migrations``,
tables, indexes, routines with their argument types, row level security flags, policies,
table and EXECUTE grants (none to PUBLIC where the SQL revokes it), pinned ``search_path``
of SECURITY DEFINER routines; then asks the functions (a reservation for an unknown account
is refused with ``account_not_found`` and writes nothing, inside a transaction that is rolled
back anyway) and counts the rows of the tables of version 20260108000000.

Every check is one :class:`Check`; the command exits 1 when one of them failed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tokentrack_client import migrate
from tokentrack_client.ops._common import OpsError, connected, fetchrow, pg_error, render_table
from tokentrack_client.ops.catalog import Catalog, catalog_of

SCHEMA_MIGRATIONS = "schema_migrations"


@dataclass
class Check:
    """One line of the verify table. ``ok`` None means informational (never fails)."""

    name: str
    ok: bool | None
    detail: str
    problems: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        """PASS, FAIL or INFO."""
        return "INFO" if self.ok is None else ("PASS" if self.ok else "FAIL")


@dataclass
class VerifyReport:
    """Every check of one verify run."""

    checks: list[Check]

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(c.ok is not False for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "ok": self.ok,
            "checks": [{**asdict(c), "result": c.result} for c in self.checks],
        }

    def render(self) -> str:
        """The human table, with the problems of failed checks listed under it."""
        out = [
            render_table(
                ("CHECK", "RESULT", "DETAIL"), [(c.name, c.result, c.detail) for c in self.checks]
            )
        ]
        for check in self.checks:
            for problem in check.problems:
                out.append(f"  {check.name}: {problem}")
        out.append("verify: " + ("all checks passed" if self.ok else "FAILED"))
        return "\n".join(out)


def _check(name: str, problems: list[str], ok_detail: str) -> Check:
    if problems:
        detail = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        return Check(name, False, detail, problems)
    return Check(name, True, ok_detail)


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------


async def _check_versions(
    conn: asyncpg.Connection, versions: Sequence[migrate.MigrationVersion], upto: str | None
) -> tuple[Check, list[migrate.MigrationVersion], list[migrate.MigrationVersion]]:
    """schema_migrations against the files; returns the check, expected and unexpected versions."""
    expected = [v for v in versions if upto is None or v.version <= upto]
    absent = [v for v in versions if upto is not None and v.version > upto]
    rows: dict[str, asyncpg.Record] = {}
    if await conn.fetchval("SELECT to_regclass('tokentrack.schema_migrations') IS NOT NULL"):
        for r in await conn.fetch(
            "SELECT version, name, checksum, files::text AS files FROM tokentrack.schema_migrations"
        ):
            rows[r["version"]] = r
    problems: list[str] = []
    on_disk = {v.version for v in versions}
    for v in expected:
        row = rows.get(v.version)
        if row is None:
            problems.append(f"version {v.label} is not applied")
            continue
        if row["checksum"] != v.checksum:
            problems.append(
                f"version {v.label}: recorded checksum {row['checksum'][:12]}... differs from "
                f"the files' {v.checksum[:12]}..."
            )
        recorded: dict[str, str] = json.loads(row["files"])
        changed = sorted(
            {p for p, d in v.file_checksums.items() if recorded.get(p) != d}
            | {p for p in recorded if p not in v.file_checksums}
        )
        if changed:
            problems.append(f"version {v.label}: files changed since applied: {', '.join(changed)}")
    for v in absent:
        if v.version in rows:
            problems.append(
                f"version {v.label} is applied but --upto {upto} expects it rolled back"
            )
    for version in sorted(set(rows) - on_disk):
        problems.append(
            f"version {version}_{rows[version]['name']} is applied but not in the SQL files"
        )
    labels = ", ".join(v.version for v in expected) or "none"
    return (
        _check("versions", problems, f"applied with matching checksums: {labels}"),
        expected,
        absent,
    )


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


async def _tables(conn: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relowner,
               EXISTS (SELECT FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attname = 'account_id'
                         AND NOT a.attisdropped) AS has_account_id
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'tokentrack' AND c.relkind IN ('r', 'p')
        """
    )
    return {r["relname"]: r for r in rows}


def _structure_checks(
    present: Catalog, absent: Catalog, tables: dict[str, asyncpg.Record]
) -> list[Check]:
    problems: list[str] = []
    expected_tables = present.tables | {SCHEMA_MIGRATIONS, "schema_functions"}
    for t in sorted(expected_tables - tables.keys()):
        problems.append(f"table tokentrack.{t} is missing")
    for t in sorted((absent.tables - present.tables) & tables.keys()):
        problems.append(f"table tokentrack.{t} exists but its version is not applied")
    for t in sorted(tables.keys() - expected_tables - absent.tables):
        problems.append(f"table tokentrack.{t} is not created by any tokentrack version")
    tables_check = _check("tables", problems, ", ".join(sorted(expected_tables & tables.keys())))

    problems = []
    for t in sorted(present.rls_tables & tables.keys()):
        if not tables[t]["relrowsecurity"]:
            problems.append(f"row level security is disabled on tokentrack.{t}")
    for t, row in sorted(tables.items()):
        account_data = t == "accounts" or row["has_account_id"]
        if account_data and t not in present.rls_tables and not row["relrowsecurity"]:
            problems.append(f"tokentrack.{t} holds account data but has no row level security")
    rls_check = _check(
        "row level security", problems, f"enabled on {len(present.rls_tables)} tables"
    )
    return [tables_check, rls_check]


async def _index_check(conn: asyncpg.Connection, present: Catalog) -> Check:
    rows = await conn.fetch(
        """
        SELECT i.relname AS index, t.relname AS table, x.indisvalid
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = 'tokentrack'
        """
    )
    found = {r["index"]: r for r in rows}
    problems: list[str] = []
    for index, table in sorted(present.indexes.items()):
        row = found.get(index)
        if row is None:
            problems.append(f"index {index} on tokentrack.{table} is missing")
        elif row["table"] != table:
            problems.append(f"index {index} is on tokentrack.{row['table']}, expected {table}")
        elif not row["indisvalid"]:
            problems.append(f"index {index} is invalid (a failed CREATE INDEX CONCURRENTLY?)")
    return _check("indexes", problems, f"{len(present.indexes)} present and valid")


async def _routine_checks(
    conn: asyncpg.Connection, present: Catalog, absent: Catalog
) -> list[Check]:
    rows = await conn.fetch(
        """
        SELECT p.oid, p.proname, p.prokind, p.prosecdef, p.proconfig,
               pg_get_function_identity_arguments(p.oid) AS args,
               ARRAY(
                   SELECT CASE WHEN a.grantee = 0 THEN 'public'
                               ELSE pg_get_userbyid(a.grantee) END
                   FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) AS a
                   WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
               ) AS executors
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'tokentrack'
        """
    )
    by_oid = {r["oid"]: r for r in rows}
    matched: set[int] = set()
    missing: list[str] = []
    grant_problems: list[str] = []
    for name, routine in sorted(present.routines.items()):
        if routine.args is not None:
            oid = await conn.fetchval("SELECT to_regprocedure($1)::oid", routine.signature)
            candidates = [by_oid[oid]] if oid in by_oid else []
        else:
            candidates = [r for r in rows if r["proname"] == name]
        if not candidates:
            missing.append(f"{routine.kind} {routine.signature} is missing")
            continue
        for row in candidates:
            matched.add(row["oid"])
            expected = set(present.execute_grants.get(name, set()))
            if name not in present.public_revoked:
                expected.add("public")
            actual = set(row["executors"])
            if "public" in actual and name in present.public_revoked:
                grant_problems.append(f"PUBLIC may EXECUTE {routine.signature}")
            for role in sorted(actual - expected - {"public"}):
                grant_problems.append(
                    f"{role} may EXECUTE {routine.signature} (not granted by the SQL)"
                )
            for role in sorted(expected - actual - {"public"}):
                grant_problems.append(f"{role} may not EXECUTE {routine.signature}")
    for row in rows:
        if row["oid"] in matched:
            continue
        label = f"tokentrack.{row['proname']}({row['args']})"
        if row["proname"] in absent.routines and row["proname"] not in present.routines:
            missing.append(f"{label} exists but its version is not applied")
        else:
            missing.append(f"{label} is not created by any applied tokentrack version")
    definer: list[str] = []
    for row in rows:
        config = row["proconfig"] or []
        if row["prosecdef"] and not any(c.startswith("search_path=") for c in config):
            definer.append(
                f"SECURITY DEFINER tokentrack.{row['proname']}({row['args']}) "
                "does not pin search_path"
            )
    executable = sorted(
        {role for name in present.routines for role in present.execute_grants.get(name, set())}
    )
    return [
        _check("routines", missing, f"{len(present.routines)} with their signatures"),
        _check(
            "execute grants",
            grant_problems,
            f"only {', '.join(executable) or 'the owner'}; none to PUBLIC where revoked",
        ),
        _check("search_path", definer, "pinned on every SECURITY DEFINER routine"),
    ]


async def _policy_check(conn: asyncpg.Connection, present: Catalog) -> Check:
    rows = await conn.fetch(
        "SELECT tablename, policyname, cmd, roles::text[] AS roles FROM pg_policies "
        "WHERE schemaname = 'tokentrack'"
    )
    found = {f"{r['tablename']}.{r['policyname']}": r for r in rows}
    problems: list[str] = []
    for key, policy in sorted(present.policies.items()):
        row = found.get(key)
        if row is None:
            problems.append(f"policy {policy.name} on tokentrack.{policy.table} is missing")
            continue
        if row["cmd"] != policy.command or sorted(row["roles"]) != sorted(policy.roles):
            problems.append(
                f"policy {policy.name} on tokentrack.{policy.table} is FOR {row['cmd']} TO "
                f"{', '.join(row['roles'])}; expected FOR {policy.command} "
                f"TO {', '.join(policy.roles)}"
            )
    for key in sorted(found.keys() - present.policies.keys()):
        row = found[key]
        problems.append(
            f"policy {row['policyname']} on tokentrack.{row['tablename']} is not created by the SQL"
        )
    return _check("policies", problems, f"{len(present.policies)} as installed")


async def _table_grant_check(conn: asyncpg.Connection, present: Catalog) -> Check:
    rows = await conn.fetch(
        """
        SELECT c.relname AS table,
               CASE WHEN a.grantee = 0 THEN 'public' ELSE pg_get_userbyid(a.grantee) END AS role,
               a.privilege_type AS privilege
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL aclexplode(COALESCE(c.relacl, acldefault('r', c.relowner))) AS a
        WHERE n.nspname = 'tokentrack' AND c.relkind IN ('r', 'p') AND a.grantee <> c.relowner
        """
    )
    actual = {(r["table"], r["role"], r["privilege"]) for r in rows if r["table"] in present.tables}
    problems = [
        f"{role} has {priv} on tokentrack.{table} (not granted by the SQL)"
        for table, role, priv in sorted(actual - present.table_grants)
    ]
    problems += [
        f"{role} lacks {priv} on tokentrack.{table}"
        for table, role, priv in sorted(present.table_grants - actual)
    ]
    roles = sorted({role for _, role, _ in present.table_grants})
    return _check("table grants", problems, f"SELECT only, to {', '.join(roles) or 'nobody'}")


# --------------------------------------------------------------------------------------------
# Answers and row counts
# --------------------------------------------------------------------------------------------


class _Rollback(Exception):
    """Raised to roll the answers' transaction back."""


async def _answer(conn: asyncpg.Connection, sql: str, *args: Any) -> dict[str, Any]:
    raw = await conn.fetchval(sql, *args)
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise OpsError(f"unexpected answer {raw!r}")
    return answer


async def _answers_check(conn: asyncpg.Connection, present: Catalog) -> Check:
    """Ask the functions, in a transaction that is rolled back whatever happens."""
    problems: list[str] = []
    asked: list[str] = []
    account, report = uuid.uuid4(), uuid.uuid4()
    try:
        async with conn.transaction():
            if "try_reserve_tokens" in present.routines:
                asked.append("try_reserve_tokens")
                answer = await _answer(
                    conn, "SELECT tokentrack.try_reserve_tokens($1, $2, 1)", account, report
                )
                if answer.get("success") is not False or answer.get("error") != "account_not_found":
                    problems.append(
                        f"try_reserve_tokens for unknown uuids answered {json.dumps(answer)}; "
                        "expected account_not_found"
                    )
                wrote = await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM tokentrack.reports WHERE id = $1)"
                    " OR EXISTS (SELECT FROM tokentrack.report_reservations WHERE report_id = $1)"
                    " OR EXISTS (SELECT FROM tokentrack.accounts WHERE id = $2)",
                    report,
                    account,
                )
                if wrote:
                    problems.append("a refused try_reserve_tokens wrote rows")
            if "increment_usage" in present.routines:
                asked.append("increment_usage")
                answer = await _answer(
                    conn, "SELECT tokentrack.increment_usage($1, 1, false, false)", account
                )
                if answer.get("success") is not False or answer.get("error") != "account_not_found":
                    problems.append(
                        f"increment_usage for an unknown account answered {json.dumps(answer)}; "
                        "expected account_not_found"
                    )
                wrote = await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM tokentrack.usage_ledger WHERE account_id = $1)",
                    account,
                )
                if wrote:
                    problems.append("a refused increment_usage wrote a ledger row")
            if "reconcile" in present.routines:
                asked.append("reconcile")
                answer = await _answer(conn, "SELECT tokentrack.reconcile(NULL)")
                if answer.get("ok") is not True:
                    found = answer.get("discrepancies") or []
                    problems.append(
                        f"reconcile() is not ok: {len(found)} discrepancies "
                        "(run tokentrack monitor for the details)"
                    )
            raise _Rollback
    except _Rollback:
        pass
    except asyncpg.PostgresError as exc:
        hint = ""
        if exc.sqlstate == "42501":
            hint = (
                " (run verify as the owner of the tokentrack objects"
                " or a member of tokentrack_service)"
            )
        problems.append(f"calling the functions failed: {pg_error(exc)}{hint}")
    detail = f"{', '.join(asked)} answer as specified; nothing written" if asked else "no functions"
    return _check("function answers", problems, detail)


async def _row_counts(conn: asyncpg.Connection, present: Catalog) -> list[Check]:
    checks: list[Check] = []
    if "report_reservations" in present.tables:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM tokentrack.report_reservations"
            " GROUP BY status ORDER BY status"
        )
        by_status = ", ".join(f"{r['status']} {r['n']}" for r in rows) or "none"
        total = sum(r["n"] for r in rows)
        checks.append(Check("rows: report_reservations", None, f"{total} ({by_status})"))
    if "report_step_usage" in present.tables:
        row = await fetchrow(
            conn,
            "SELECT count(*) AS n, count(*) FILTER (WHERE billed_at IS NULL) AS unbilled"
            " FROM tokentrack.report_step_usage",
        )
        checks.append(
            Check("rows: report_step_usage", None, f"{row['n']} ({row['unbilled']} not billed yet)")
        )
    return checks


async def verify(dsn: str, *, upto: str | None = None, sql_dir: Path | None = None) -> VerifyReport:
    """Run every structural check and the answers check against ``dsn``."""
    versions = migrate.load_versions(sql_dir)
    if upto is not None and upto not in {v.version for v in versions}:
        known = ", ".join(v.version for v in versions)
        raise OpsError(f"--upto {upto}: no such version (known: {known})")
    async with connected(dsn, "tokentrack verify") as conn:
        version_check, expected, unexpected = await _check_versions(conn, versions, upto)
        present, absent = catalog_of(expected), catalog_of(unexpected)
        checks = [version_check]
        if not await conn.fetchval("SELECT to_regnamespace('tokentrack') IS NOT NULL"):
            checks.append(Check("schema", False, "schema tokentrack does not exist"))
            return VerifyReport(checks)
        tables = await _tables(conn)
        checks += _structure_checks(present, absent, tables)
        checks.append(await _index_check(conn, present))
        checks += await _routine_checks(conn, present, absent)
        checks.append(await _policy_check(conn, present))
        checks.append(await _table_grant_check(conn, present))
        if present.tables <= tables.keys():
            checks.append(await _answers_check(conn, present))
            checks += await _row_counts(conn, present)
        return VerifyReport(checks)
