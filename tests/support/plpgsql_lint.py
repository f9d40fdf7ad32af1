"""plpgsql_check over every PL/pgSQL function of tokentrack: no errors and no warnings.

Run by ``make lint`` as ``python tests/support/plpgsql_lint.py``: it starts a throwaway PostgreSQL
server (``tokentrack_client.testing.PostgresServer``), installs every tokentrack version
with the migrator into a fresh database, ``CREATE EXTENSION plpgsql_check`` and checks each
PL/pgSQL function and procedure of the schema ``tokentrack`` with every warning class on
(``all_warnings``: other, extra, performance, security and compatibility warnings). Trigger
functions are checked against each table whose triggers call them. Any finding fails the
run.

When the extension (Debian: ``postgresql-15-plpgsql-check``) or the server binaries are
missing it says so and exits 0, except under CI (``CI=true``), where it fails: CI installs
the package (.ci/run) and must always run the check. ``--dsn URL`` checks an existing
database that already has tokentrack installed instead (the extension is created there).

The test suite runs the same check (tests/security/test_plpgsql_check.py) through
:func:`check_functions`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass

import asyncpg

from tokentrack_client.testing import PostgresServer, PostgresServerError, find_bindir

EXTENSION = "plpgsql_check"
PACKAGE = "postgresql-15-plpgsql-check"

# Every PL/pgSQL routine of the schema, with the tables whose triggers call it (a trigger
# function can only be checked against a relation).
_ROUTINES_SQL = """
SELECT p.oid::regprocedure::text AS routine,
       p.oid,
       p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype AS is_trigger,
       COALESCE(
           (SELECT pg_catalog.array_agg(DISTINCT t.tgrelid::regclass::text)
            FROM pg_catalog.pg_trigger AS t WHERE t.tgfoid = p.oid),
           '{}'::text[]
       ) AS trigger_tables
FROM pg_catalog.pg_proc AS p
JOIN pg_catalog.pg_language AS l ON l.oid = p.prolang
WHERE p.pronamespace = 'tokentrack'::pg_catalog.regnamespace AND l.lanname = 'plpgsql'
ORDER BY 1
"""

_CHECK_SQL = """
SELECT lineno, statement, sqlstate, message, detail, hint, level, query
FROM public.plpgsql_check_function_tb(
    $1::pg_catalog.oid::pg_catalog.regprocedure,
    COALESCE($2::text::pg_catalog.regclass, 0::pg_catalog.oid::pg_catalog.regclass),
    all_warnings => true
)
"""


@dataclass(frozen=True)
class Finding:
    """One plpgsql_check message."""

    routine: str
    relation: str | None
    lineno: int | None
    level: str
    sqlstate: str
    message: str
    detail: str | None

    def __str__(self) -> str:
        where = self.routine + (f" (trigger on {self.relation})" if self.relation else "")
        line = f":{self.lineno}" if self.lineno is not None else ""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{where}{line}: {self.level} {self.sqlstate}: {self.message}{extra}"


async def extension_available(conn: asyncpg.Connection) -> bool:
    """Whether the server has the plpgsql_check extension installed (its files)."""
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_available_extensions WHERE name = $1)",
        EXTENSION,
    )
    return bool(found)


async def check_functions(conn: asyncpg.Connection) -> tuple[list[str], list[Finding]]:
    """Check every PL/pgSQL routine of ``tokentrack``; return (routines checked, findings).

    The connection must be allowed to ``CREATE EXTENSION plpgsql_check`` (a superuser).
    """
    await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION} WITH SCHEMA public")
    checked: list[str] = []
    findings: list[Finding] = []
    for row in await conn.fetch(_ROUTINES_SQL):
        relations: list[str | None] = list(row["trigger_tables"]) if row["is_trigger"] else [None]
        if row["is_trigger"] and not relations:
            findings.append(
                Finding(row["routine"], None, None, "error", "-", "trigger function unused", None)
            )
            continue
        for relation in relations:
            for hit in await conn.fetch(_CHECK_SQL, row["oid"], relation):
                findings.append(
                    Finding(
                        routine=row["routine"],
                        relation=relation,
                        lineno=hit["lineno"],
                        level=hit["level"],
                        sqlstate=hit["sqlstate"],
                        message=hit["message"],
                        detail=hit["detail"],
                    )
                )
        checked.append(row["routine"])
    return checked, findings


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> int:
    if _in_ci():
        print(f"plpgsql_check: FAILED: {reason} (CI must run this check)", file=sys.stderr)
        return 1
    print(f"plpgsql_check: skipped: {reason}", file=sys.stderr)
    return 0


async def _check_dsn(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        if not await extension_available(conn):
            return _unavailable(f"the {EXTENSION} extension is not installed ({PACKAGE})")
        checked, findings = await check_functions(conn)
    finally:
        await conn.close()
    for finding in findings:
        print(f"plpgsql_check: {finding}", file=sys.stderr)
    if not checked:
        print("plpgsql_check: FAILED: no PL/pgSQL function found in tokentrack", file=sys.stderr)
        return 1
    if findings:
        print(f"plpgsql_check: FAILED: {len(findings)} finding(s)", file=sys.stderr)
        return 1
    print(f"plpgsql_check: {len(checked)} PL/pgSQL routines, no errors, no warnings")
    return 0


async def _install_and_check(server: PostgresServer) -> int:
    from tokentrack_client import migrate

    conn = await asyncpg.connect(server.dsn())
    try:
        if not await extension_available(conn):
            return _unavailable(f"the {EXTENSION} extension is not installed ({PACKAGE})")
    finally:
        await conn.close()
    database_dsn = await server.create_database("tokentrack_lint")
    await migrate.install(database_dsn)
    return await _check_dsn(database_dsn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="check this database (tokentrack already installed)")
    args = parser.parse_args(argv)
    if args.dsn:
        return asyncio.run(_check_dsn(args.dsn))

    try:
        bindir = find_bindir()
    except PostgresServerError as exc:
        return _unavailable(str(exc))
    with PostgresServer(bindir=bindir) as server:
        return asyncio.run(_install_and_check(server))


if __name__ == "__main__":
    sys.exit(main())
