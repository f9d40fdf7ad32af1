"""``tokentrack verify``: the post-deploy checks.

Compares the database with what a clean install of the same SQL files gives: the catalog
that ``make catalog`` measured on scratch databases for each version prefix and committed as
``sql/catalog.json`` (see :mod:`tokentrack_client.ops.catalog`; ``--upto V`` expects the
catalog after versions <= V). First the versions and checksums in ``schema_migrations``; then
object by object: tables, columns (types, defaults, NOT NULL), named constraints, row level
security (enabled, forced; and any table with account data must have it), indexes (and their
validity), routines by signature with the md5 of their definition (a function edited by hand
in the database differs), SECURITY DEFINER and ``proconfig`` (and a pinned ``search_path`` on
every SECURITY DEFINER routine), policies, triggers, grants of tables, sequences, routines and
the schema, comments. Owners are left out: they differ between installations. Then it asks
the functions (a reservation for an unknown account is refused with ``account_not_found`` and
writes nothing, inside a transaction that is rolled back anyway) and counts the rows of the
tables of version 20260108000000.

Every check is one :class:`Check`, each problem names the object; the command exits 1 when
one of them failed.
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
from tokentrack_client.connection import pg_error
from tokentrack_client.ops._common import OpsError, connected, fetchrow, render_table
from tokentrack_client.ops.catalog import (
    Catalog,
    CatalogError,
    catalog_path,
    load_catalogs,
    read_catalog,
)

SCHEMA_MIGRATIONS = "schema_migrations"

MONITORING_FUNCTIONS = frozenset(
    {
        "tokentrack.health(integer)",
        "tokentrack.reconcile(uuid)",
        # version 20261213000000: what tokentrack exporter reads besides those two
        "tokentrack.metrics(integer,integer,integer)",
        "tokentrack.billing_totals(bigint,bigint)",
        # version 20261214000000: the incremental reconcile, and the advance of its verified
        # point (which writes only the point's own tables: no billing figure, no billing lock)
        "tokentrack.reconcile_recent(uuid)",
        "tokentrack.advance_reconcile_point()",
    }
)
"""Read-only functions that docs/SECURITY.md lets you grant to a monitoring role: such a grant
is listed (INFO), not a failure; to PUBLIC or to tokentrack_reader it is one."""


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
) -> Check:
    """schema_migrations against the files."""
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
    return _check("versions", problems, f"applied with matching checksums: {labels}")


# --------------------------------------------------------------------------------------------
# Structure: the installed catalog against a clean install's (sql/catalog.json)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expect:
    """What a clean install of the expected versions has, and what any version creates."""

    catalog: Catalog
    known: dict[str, set[str]]  # section -> names that some version's catalog has


def _expectation(catalogs: dict[str, Catalog], upto: str) -> _Expect:
    known: dict[str, set[str]] = {}
    for catalog in catalogs.values():
        for section in ("tables", "indexes", "routines", "policies", "triggers", "sequences"):
            known.setdefault(section, set()).update(catalog[section])
    return _Expect(catalogs[upto], known)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _differences(
    label: str, expected: dict[str, Any], actual: dict[str, Any], *fields: str
) -> list[str]:
    return [
        f"{label}: {name.replace('_', ' ')} is {_show(actual.get(name))}; "
        f"a clean install gives {_show(expected.get(name))}"
        for name in fields
        if expected.get(name) != actual.get(name)
    ]


def _extra(kind: str, label: str, name: str, section: str, expect: _Expect, applied: str) -> str:
    if name in expect.known.get(section, set()):
        return f"{kind} {label} exists but its version is not applied"
    return f"{kind} {label} is not created by any {applied}tokentrack version"


def _table_checks(expect: _Expect, actual: Catalog, bookkeeping: bool) -> list[Check]:
    want, have = expect.catalog["tables"], actual["tables"]
    problems: list[str] = []
    if not bookkeeping:
        problems.append(f"table tokentrack.{SCHEMA_MIGRATIONS} is missing")
    for t in sorted(want.keys() - have.keys()):
        problems.append(f"table tokentrack.{t} is missing")
    for t in sorted(have.keys() - want.keys()):
        problems.append(_extra("table", f"tokentrack.{t}", t, "tables", expect, ""))
    for t in sorted(want.keys() & have.keys()):
        problems += _differences(f"table tokentrack.{t}", want[t], have[t], "kind")
    names = sorted(({SCHEMA_MIGRATIONS} if bookkeeping else set()) | (want.keys() & have.keys()))
    tables = _check("tables", problems, ", ".join(names))

    problems = []
    for t in sorted(want.keys() & have.keys()):
        w, h = want[t], have[t]
        if w["rls"] and not h["rls"]:
            problems.append(f"row level security is disabled on tokentrack.{t}")
        elif h["rls"] and not w["rls"]:
            problems.append(
                f"row level security is enabled on tokentrack.{t}; a clean install's is off"
            )
        if w["rls_forced"] != h["rls_forced"]:
            state = "forced" if h["rls_forced"] else "not forced"
            problems.append(
                f"row level security is {state} on tokentrack.{t}, unlike a clean install"
            )
    for t, h in sorted(have.items()):
        account_data = t == "accounts" or "account_id" in h["columns"]
        if account_data and not h["rls"] and not want.get(t, {}).get("rls"):
            problems.append(f"tokentrack.{t} holds account data but has no row level security")
    enabled = sum(1 for w in want.values() if w["rls"])
    rls = _check("row level security", problems, f"enabled on {enabled} tables")

    problems = []
    columns = 0
    for t in sorted(want.keys() & have.keys()):
        wc, hc = want[t]["columns"], have[t]["columns"]
        columns += len(wc)
        problems += [f"column tokentrack.{t}.{c} is missing" for c in wc if c not in hc]
        problems += [
            f"column tokentrack.{t}.{c} is not created by the SQL" for c in hc if c not in wc
        ]
        for c in wc.keys() & hc.keys():
            problems += _differences(
                f"column tokentrack.{t}.{c}",
                wc[c],
                hc[c],
                "type",
                "not_null",
                "default",
                "identity",
                "generated",
            )
    column_check = _check(
        "columns", sorted(problems), f"{columns} with their types, defaults and NOT NULL"
    )

    problems = []
    constraints = 0
    for t in sorted(want.keys() & have.keys()):
        wk, hk = want[t]["constraints"], have[t]["constraints"]
        constraints += len(wk)
        problems += [f"constraint {k} on tokentrack.{t} is missing" for k in wk if k not in hk]
        problems += [
            f"constraint {k} on tokentrack.{t} is not created by the SQL" for k in hk if k not in wk
        ]
        for k in sorted(wk.keys() & hk.keys()):
            problems += _differences(
                f"constraint {k} on tokentrack.{t}", wk[k], hk[k], "type", "definition"
            )
    constraint_check = _check("constraints", sorted(problems), f"{constraints} named, as defined")
    return [tables, column_check, constraint_check, rls]


async def _index_check(conn: asyncpg.Connection, expect: _Expect, actual: Catalog) -> Check:
    want, have = expect.catalog["indexes"], actual["indexes"]
    invalid = {
        r["relname"]
        for r in await conn.fetch(
            "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " WHERE i.relnamespace = 'tokentrack'::regnamespace AND NOT x.indisvalid"
        )
    }
    problems: list[str] = []
    for index, w in sorted(want.items()):
        h = have.get(index)
        if h is None:
            problems.append(f"index {index} on tokentrack.{w['table']} is missing")
        elif h["table"] != w["table"]:
            problems.append(f"index {index} is on tokentrack.{h['table']}, expected {w['table']}")
        elif h["definition"] != w["definition"]:
            problems.append(
                f"index {index} is `{h['definition']}`; a clean install gives `{w['definition']}`"
            )
        elif index in invalid:
            problems.append(f"index {index} is invalid (a failed CREATE INDEX CONCURRENTLY?)")
    for index in sorted(have.keys() - want.keys()):
        label = f"{index} on tokentrack.{have[index]['table']}"
        problems.append(_extra("index", label, index, "indexes", expect, ""))
    return _check("indexes", problems, f"{len(want)} present and valid")


async def _routine_checks(
    conn: asyncpg.Connection, expect: _Expect, actual: Catalog
) -> list[Check]:
    want, have = expect.catalog["routines"], actual["routines"]
    problems: list[str] = []
    for sig, w in sorted(want.items()):
        h = have.get(sig)
        if h is None:
            problems.append(f"{w['kind']} {sig} is missing")
            continue
        problems += _differences(f"{w['kind']} {sig}", w, h, "kind", "security_definer")
        if h["definition_md5"] != w["definition_md5"]:
            problems.append(
                f"{w['kind']} {sig}: its definition differs from a clean install's "
                "(edited by hand in the database?)"
            )
    for sig in sorted(have.keys() - want.keys()):
        if sig in expect.known["routines"]:
            problems.append(f"{sig} exists but its version is not applied")
        else:
            problems.append(f"{sig} is not created by any applied tokentrack version")
    routines = _check("routines", problems, f"{len(want)} with their signatures and definitions")

    problems = []
    monitoring: list[str] = []
    for sig in sorted(want.keys() & have.keys()):
        w_acl, h_acl = set(want[sig]["acl"]), set(have[sig]["acl"])
        for entry in sorted(h_acl - w_acl):
            role, _, privilege = entry.partition("=")
            if (
                sig in MONITORING_FUNCTIONS
                and privilege == "EXECUTE"
                and role not in ("PUBLIC", "tokentrack_reader")
            ):
                monitoring.append(f"{role} may EXECUTE {sig}")
            elif entry == "PUBLIC=EXECUTE":
                problems.append(f"PUBLIC may EXECUTE {sig}")
            elif privilege == "EXECUTE":
                problems.append(f"{role} may EXECUTE {sig} (not granted by the SQL)")
            else:
                problems.append(f"{role} has {privilege} on {sig} (not granted by the SQL)")
        for entry in sorted(w_acl - h_acl):
            role, _, privilege = entry.partition("=")
            verb = "may not EXECUTE" if privilege == "EXECUTE" else f"lacks {privilege} on"
            problems.append(f"{role} {verb} {sig}")
    executors = sorted({e.partition("=")[0] for w in want.values() for e in w["acl"]} - {"PUBLIC"})
    grants = _check(
        "execute grants",
        problems,
        f"only {', '.join(executors) or 'the owner'}; none to PUBLIC where revoked",
    )

    problems = []
    for row in await conn.fetch(
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args, p.proconfig"
        " FROM pg_proc p WHERE p.pronamespace = 'tokentrack'::regnamespace AND p.prosecdef"
    ):
        if not any(c.startswith("search_path=") for c in row["proconfig"] or []):
            problems.append(
                f"SECURITY DEFINER tokentrack.{row['proname']}({row['args']}) "
                "does not pin search_path"
            )
    for sig in sorted(want.keys() & have.keys()):
        problems += _differences(sig, want[sig], have[sig], "config")
    search_path = _check("search_path", problems, "pinned on every SECURITY DEFINER routine")
    checks = [routines, grants, search_path]
    if monitoring:
        checks.append(Check("monitoring grants", None, "; ".join(monitoring)))
    return checks


def _policy_check(expect: _Expect, actual: Catalog) -> Check:
    want, have = expect.catalog["policies"], actual["policies"]
    problems: list[str] = []
    for key, w in sorted(want.items()):
        h = have.get(key)
        label = f"policy {w['name']} on tokentrack.{w['table']}"
        if h is None:
            problems.append(f"{label} is missing")
            continue
        if (h["command"], h["roles"]) != (w["command"], w["roles"]):
            problems.append(
                f"{label} is FOR {h['command']} TO {', '.join(h['roles'])}; expected FOR "
                f"{w['command']} TO {', '.join(w['roles'])}"
            )
        problems += _differences(label, w, h, "permissive", "using", "with_check")
    for key in sorted(have.keys() - want.keys()):
        h = have[key]
        problems.append(f"policy {h['name']} on tokentrack.{h['table']} is not created by the SQL")
    return _check("policies", problems, f"{len(want)} as installed")


def _trigger_check(expect: _Expect, actual: Catalog) -> Check:
    want, have = expect.catalog["triggers"], actual["triggers"]
    problems: list[str] = []
    for key, w in sorted(want.items()):
        h = have.get(key)
        label = f"trigger {key.split('.', 1)[1]} on tokentrack.{w['table']}"
        if h is None:
            problems.append(f"{label} is missing")
            continue
        problems += _differences(label, w, h, "definition", "enabled")
    for key in sorted(have.keys() - want.keys()):
        label = f"{key.split('.', 1)[1]} on tokentrack.{have[key]['table']}"
        problems.append(_extra("trigger", label, key, "triggers", expect, ""))
    return _check("triggers", problems, f"{len(want)} as installed")


def _monitoring_roles(expect: _Expect, actual: Catalog) -> set[str]:
    """Roles given EXECUTE on a monitoring function beyond a clean install's grants."""
    roles: set[str] = set()
    for sig in MONITORING_FUNCTIONS:
        want = set(expect.catalog["routines"].get(sig, {}).get("acl", []))
        for entry in set(actual["routines"].get(sig, {}).get("acl", [])) - want:
            role, _, privilege = entry.partition("=")
            if privilege == "EXECUTE" and role not in ("PUBLIC", "tokentrack_reader"):
                roles.add(role)
    return roles


def _grant_checks(expect: _Expect, actual: Catalog) -> list[Check]:
    problems: list[str] = []
    roles: set[str] = set()
    privileges: set[str] = set()
    for section in ("tables", "sequences"):
        want, have = expect.catalog[section], actual[section]
        for name in sorted(want.keys() & have.keys()):
            w_acl, h_acl = set(want[name]["acl"]), set(have[name]["acl"])
            for entry in want[name]["acl"]:
                role, _, privilege = entry.partition("=")
                roles.add(role)
                privileges.add(privilege)
            for entry in sorted(h_acl - w_acl):
                role, _, privilege = entry.partition("=")
                problems.append(
                    f"{role} has {privilege} on tokentrack.{name} (not granted by the SQL)"
                )
            for entry in sorted(w_acl - h_acl):
                role, _, privilege = entry.partition("=")
                problems.append(f"{role} lacks {privilege} on tokentrack.{name}")
    only = "SELECT only" if privileges <= {"SELECT"} else ", ".join(sorted(privileges))
    tables = _check("table grants", problems, f"{only}, to {', '.join(sorted(roles)) or 'nobody'}")

    problems = []
    w_acl, h_acl = set(expect.catalog["schema"]["acl"]), set(actual["schema"]["acl"])
    monitors = _monitoring_roles(expect, actual)
    for entry in sorted(h_acl - w_acl):
        role, _, privilege = entry.partition("=")
        if privilege == "USAGE" and role in monitors:
            continue  # docs/SECURITY.md, "Monitoring role"
        problems.append(f"{role} has {privilege} on schema tokentrack (not granted by the SQL)")
    for entry in sorted(w_acl - h_acl):
        role, _, privilege = entry.partition("=")
        problems.append(f"{role} lacks {privilege} on schema tokentrack")
    schema = _check("schema", problems, f"tokentrack: {_show(sorted(w_acl))}")
    return [tables, schema]


def _comment_check(expect: _Expect, actual: Catalog) -> Check:
    """COMMENT ON: present exactly where a clean install has one (objects present in both)."""
    pairs: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("schema tokentrack", expect.catalog["schema"], actual["schema"])
    ]
    want_tables, have_tables = expect.catalog["tables"], actual["tables"]
    for t in sorted(want_tables.keys() & have_tables.keys()):
        w, h = want_tables[t], have_tables[t]
        pairs.append((f"table tokentrack.{t}", w, h))
        for c in sorted(w["columns"].keys() & h["columns"].keys()):
            pairs.append((f"column tokentrack.{t}.{c}", w["columns"][c], h["columns"][c]))
        for k in sorted(w["constraints"].keys() & h["constraints"].keys()):
            pairs.append(
                (f"constraint {k} on tokentrack.{t}", w["constraints"][k], h["constraints"][k])
            )
    for section, kind in (("indexes", "index"), ("sequences", "sequence"), ("triggers", "trigger")):
        want, have = expect.catalog[section], actual[section]
        for name in sorted(want.keys() & have.keys()):
            pairs.append((f"{kind} {name}", want[name], have[name]))
    want, have = expect.catalog["routines"], actual["routines"]
    for sig in sorted(want.keys() & have.keys()):
        pairs.append((f"{want[sig]['kind']} {sig}", want[sig], have[sig]))
    problems = [
        f"{label} has no comment"
        if w["comment"]
        else f"{label} has a comment that a clean install has not"
        for label, w, h in pairs
        if w["comment"] != h["comment"]
    ]
    commented = sum(1 for _, w, _ in pairs if w["comment"])
    return _check("comments", problems, f"{commented} objects with COMMENT ON")


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


async def _answers_check(conn: asyncpg.Connection, routines: set[str]) -> Check:
    """Ask the functions, in a transaction that is rolled back whatever happens."""
    problems: list[str] = []
    asked: list[str] = []
    account, report = uuid.uuid4(), uuid.uuid4()
    try:
        async with conn.transaction():
            if "try_reserve_tokens" in routines:
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
            if "increment_usage" in routines:
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
            if "reconcile" in routines:
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


async def _row_counts(conn: asyncpg.Connection, tables: set[str]) -> list[Check]:
    checks: list[Check] = []
    if "report_reservations" in tables:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM tokentrack.report_reservations"
            " GROUP BY status ORDER BY status"
        )
        by_status = ", ".join(f"{r['status']} {r['n']}" for r in rows) or "none"
        total = sum(r["n"] for r in rows)
        checks.append(Check("rows: report_reservations", None, f"{total} ({by_status})"))
    if "report_step_usage" in tables:
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
    root = sql_dir or migrate.default_sql_dir()
    versions = migrate.load_versions(root)
    if upto is not None and upto not in {v.version for v in versions}:
        known = ", ".join(v.version for v in versions)
        raise OpsError(f"--upto {upto}: no such version (known: {known})")
    try:
        catalogs = load_catalogs(versions, catalog_path(root))
    except CatalogError as exc:
        raise OpsError(str(exc)) from exc
    async with connected(dsn, "tokentrack verify") as conn:
        version_check = await _check_versions(conn, versions, upto)
        checks = [version_check]
        if not await conn.fetchval("SELECT to_regnamespace('tokentrack') IS NOT NULL"):
            checks.append(Check("schema", False, "schema tokentrack does not exist"))
            return VerifyReport(checks)
        target = upto or versions[-1].version
        expect = _expectation(catalogs, target)
        actual = await read_catalog(conn)
        bookkeeping = bool(
            await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"tokentrack.{SCHEMA_MIGRATIONS}"
            )
        )
        checks += _table_checks(expect, actual, bookkeeping)
        checks.append(await _index_check(conn, expect, actual))
        checks += await _routine_checks(conn, expect, actual)
        checks.append(_policy_check(expect, actual))
        checks.append(_trigger_check(expect, actual))
        checks += _grant_checks(expect, actual)
        checks.append(_comment_check(expect, actual))
        tables = set(expect.catalog["tables"])
        if tables <= actual["tables"].keys():
            routines = {r["name"] for r in expect.catalog["routines"].values()}
            checks.append(await _answers_check(conn, routines))
            checks += await _row_counts(conn, tables)
        return VerifyReport(checks)
