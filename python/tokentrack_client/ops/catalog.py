"""The catalog of the schema ``tokentrack``, read from PostgreSQL's own catalogs.

``tokentrack verify`` compares a database with what a clean install of the same SQL files
gives. That expectation is not parsed out of the SQL text: it is measured. ``make catalog``
(``python -m tokentrack_client.ops.catalog``) installs the versions into scratch databases,
once for each version prefix (versions <= V, so that ``verify --upto V`` has its expectation),
reads each database's catalog with :func:`read_catalog` and writes them to ``sql/catalog.json``
(shipped in the wheel with the SQL). ``tests/ops/test_verify.py`` installs from scratch again
and fails, naming ``make catalog``, when the committed file is not what the files give.

What a catalog holds (JSON, keyed by object name, so that two catalogs compare key by key):
the schema's grants and comment; each table (kind, row level security enabled and forced,
grants, comment) with its columns (type, NOT NULL, default, identity, generated, comment) and
its named constraints (type and definition; not the NOT NULL constraints that PostgreSQL 18
lists in pg_constraint as contype 'n', named by the server, not by the SQL: NOT NULL is the
column's, read from attnotnull on every major); indexes (table and definition); sequences
(grants); policies (command, permissive, roles, USING and WITH CHECK); triggers (definition,
enabled); routines by signature (kind, md5 of ``pg_get_functiondef``, SECURITY DEFINER,
``proconfig``, grants, comment). Grants are ``aclexplode`` entries with role names, ``PUBLIC``
for the pseudo-role; the owner's own entries are left out, as are owner names everywhere:
owners differ between installations.

The migrator's bookkeeping (:data:`INSTALLER_TABLES`, created by its bootstrap, not by a
version) is left out: ``verify``'s versions check reads it itself, and a migrator that keeps
more bookkeeping must not make every installed catalog differ. Add a new bookkeeping table of
the migrator to :data:`INSTALLER_TABLES`.

Expressions are printed with ``search_path = pg_catalog, pg_temp`` and fixed output settings
(``DateStyle``, ``IntervalStyle``, ``TimeZone``, ``extra_float_digits``), so that a catalog
does not depend on the session that reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tokentrack_client import migrate

FORMAT: Final = "tokentrack-catalog/1"
CATALOG_FILE: Final = "catalog.json"
REGENERATE: Final = "make catalog"
"""The command that rewrites ``sql/catalog.json`` (``python -m tokentrack_client.ops.catalog``)."""

INSTALLER_TABLES: Final = frozenset({"schema_migrations", "schema_functions"})
"""Tables of schema tokentrack that the migrator's bootstrap creates: not in the catalog."""

Catalog = dict[str, Any]

_SETTINGS: Final = (
    "SET LOCAL search_path = pg_catalog, pg_temp;"
    " SET LOCAL DateStyle = 'ISO, YMD';"
    " SET LOCAL IntervalStyle = 'postgres';"
    " SET LOCAL TimeZone = 'UTC';"
    " SET LOCAL extra_float_digits = 1"
)

# aclexplode of an ACL (NULL: the default one for the owner) as sorted "role=PRIVILEGE"
# entries, without the owner's own entries. %s is the ACL column, the kind and the owner.
_ACL: Final = """
ARRAY(
    SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
           || '=' || a.privilege_type || CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION'
                                              ELSE '' END
    FROM aclexplode(COALESCE({acl}, acldefault('{kind}', {owner}))) AS a
    WHERE a.grantee <> {owner}
    ORDER BY 1
)"""

_SCHEMA_SQL: Final = f"""
SELECT {_ACL.format(acl="n.nspacl", kind="n", owner="n.nspowner")} AS acl,
       obj_description(n.oid, 'pg_namespace') IS NOT NULL AS comment
FROM pg_namespace AS n WHERE n.nspname = 'tokentrack'
"""

_RELATIONS_SQL: Final = f"""
SELECT c.oid, c.relname, c.relkind::text AS kind, c.relrowsecurity, c.relforcerowsecurity,
       {_ACL.format(acl="c.relacl", kind="r", owner="c.relowner")} AS table_acl,
       {_ACL.format(acl="c.relacl", kind="s", owner="c.relowner")} AS sequence_acl,
       obj_description(c.oid, 'pg_class') IS NOT NULL AS comment
FROM pg_class AS c
WHERE c.relnamespace = 'tokentrack'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
ORDER BY c.relname
"""

_COLUMNS_SQL: Final = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid) AS default, a.attidentity::text AS identity,
       a.attgenerated::text AS generated,
       col_description(a.attrelid, a.attnum) IS NOT NULL AS comment
FROM pg_attribute AS a
JOIN pg_class AS c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = 'tokentrack'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY c.relname, a.attnum
"""

_CONSTRAINTS_SQL: Final = """
SELECT c.relname, k.conname, k.contype::text AS type, pg_get_constraintdef(k.oid) AS definition,
       obj_description(k.oid, 'pg_constraint') IS NOT NULL AS comment
FROM pg_constraint AS k JOIN pg_class AS c ON c.oid = k.conrelid
WHERE c.relnamespace = 'tokentrack'::regnamespace
  AND k.contype <> 'n'
ORDER BY c.relname, k.conname
"""

_INDEXES_SQL: Final = """
SELECT i.relname AS index, t.relname AS table, pg_get_indexdef(x.indexrelid) AS definition,
       obj_description(i.oid, 'pg_class') IS NOT NULL AS comment
FROM pg_index AS x
JOIN pg_class AS i ON i.oid = x.indexrelid
JOIN pg_class AS t ON t.oid = x.indrelid
WHERE t.relnamespace = 'tokentrack'::regnamespace
ORDER BY i.relname
"""

_POLICIES_SQL: Final = """
SELECT p.tablename, p.policyname, p.permissive, p.cmd, p.roles::text[] AS roles, p.qual,
       p.with_check
FROM pg_policies AS p WHERE p.schemaname = 'tokentrack'
ORDER BY p.tablename, p.policyname
"""

_TRIGGERS_SQL: Final = """
SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) AS definition, t.tgenabled::text AS enabled,
       obj_description(t.oid, 'pg_trigger') IS NOT NULL AS comment
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'tokentrack'::regnamespace AND NOT t.tgisinternal
ORDER BY c.relname, t.tgname
"""

_ROUTINES_SQL: Final = f"""
SELECT p.proname, oidvectortypes(p.proargtypes) AS args, p.prokind::text AS kind,
       md5(pg_get_functiondef(p.oid)) AS definition_md5, p.prosecdef,
       COALESCE(p.proconfig, '{{}}') AS config,
       {_ACL.format(acl="p.proacl", kind="f", owner="p.proowner")} AS acl,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS comment
FROM pg_proc AS p WHERE p.pronamespace = 'tokentrack'::regnamespace
ORDER BY p.proname, 2
"""

ROUTINE_KINDS: Final = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window"}


def routine_signature(name: str, args: str) -> str:
    """``tokentrack.name(type, type)``: how catalogs and messages name a routine."""
    return f"tokentrack.{name}({args})"


async def read_catalog(conn: asyncpg.Connection) -> Catalog:
    """The catalog of the schema tokentrack behind ``conn`` (empty when there is none)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_SETTINGS)
        schema = await conn.fetchrow(_SCHEMA_SQL)
        catalog: Catalog = {
            "schema": None,
            "tables": {},
            "indexes": {},
            "sequences": {},
            "policies": {},
            "triggers": {},
            "routines": {},
        }
        if schema is None:
            return catalog
        catalog["schema"] = {"acl": list(schema["acl"]), "comment": schema["comment"]}
        for r in await conn.fetch(_RELATIONS_SQL):
            if r["relname"] in INSTALLER_TABLES:
                continue
            if r["kind"] == "S":
                catalog["sequences"][r["relname"]] = {
                    "acl": list(r["sequence_acl"]),
                    "comment": r["comment"],
                }
                continue
            catalog["tables"][r["relname"]] = {
                "kind": r["kind"],
                "rls": r["relrowsecurity"],
                "rls_forced": r["relforcerowsecurity"],
                "acl": list(r["table_acl"]),
                "comment": r["comment"],
                "columns": {},
                "constraints": {},
            }
        tables = catalog["tables"]
        for r in await conn.fetch(_COLUMNS_SQL):
            if r["relname"] in tables:
                tables[r["relname"]]["columns"][r["attname"]] = {
                    "type": r["type"],
                    "not_null": r["attnotnull"],
                    "default": r["default"],
                    "identity": r["identity"] or None,
                    "generated": r["generated"] or None,
                    "comment": r["comment"],
                }
        for r in await conn.fetch(_CONSTRAINTS_SQL):
            if r["relname"] in tables:
                tables[r["relname"]]["constraints"][r["conname"]] = {
                    "type": r["type"],
                    "definition": r["definition"],
                    "comment": r["comment"],
                }
        for r in await conn.fetch(_INDEXES_SQL):
            if r["table"] not in INSTALLER_TABLES:
                catalog["indexes"][r["index"]] = {
                    "table": r["table"],
                    "definition": r["definition"],
                    "comment": r["comment"],
                }
        for r in await conn.fetch(_POLICIES_SQL):
            catalog["policies"][f"{r['tablename']}.{r['policyname']}"] = {
                "table": r["tablename"],
                "name": r["policyname"],
                "permissive": r["permissive"],
                "command": r["cmd"],
                "roles": sorted(r["roles"]),
                "using": r["qual"],
                "with_check": r["with_check"],
            }
        for r in await conn.fetch(_TRIGGERS_SQL):
            if r["relname"] not in INSTALLER_TABLES:
                catalog["triggers"][f"{r['relname']}.{r['tgname']}"] = {
                    "table": r["relname"],
                    "definition": r["definition"],
                    "enabled": r["enabled"],
                    "comment": r["comment"],
                }
        for r in await conn.fetch(_ROUTINES_SQL):
            catalog["routines"][routine_signature(r["proname"], r["args"])] = {
                "name": r["proname"],
                "kind": ROUTINE_KINDS.get(r["kind"], r["kind"]),
                "definition_md5": r["definition_md5"],
                "security_definer": r["prosecdef"],
                "config": list(r["config"]),
                "acl": list(r["acl"]),
                "comment": r["comment"],
            }
    return catalog


# --------------------------------------------------------------------------------------------
# The committed catalogs: one per version prefix
# --------------------------------------------------------------------------------------------


class CatalogError(Exception):
    """The catalog file is missing, unreadable or does not belong to the SQL files."""


def catalog_path(sql_dir: Path | None = None) -> Path:
    """``<sql dir>/catalog.json``."""
    return (sql_dir or migrate.default_sql_dir()) / CATALOG_FILE


def sources(version: migrate.MigrationVersion) -> str:
    """sha256 of every file a version's catalog comes from: its schema file and the function
    files it introduced (``sha256sum`` format), so that editing either makes the committed
    catalog stale, not a function "edited by hand in the database"."""
    listing = "".join(f"{f.sha256}  {f.relpath}\n" for f in version.applied_files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def load_catalogs(versions: Sequence[migrate.MigrationVersion], path: Path) -> dict[str, Catalog]:
    """The committed catalog after each version, checked against the versions' files."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(
            f"cannot read {path} ({exc.strerror or exc}): generate it with `{REGENERATE}`"
        ) from exc
    except ValueError as exc:
        raise CatalogError(f"{path} is not valid JSON ({exc}): run `{REGENERATE}`") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CatalogError(f"{path} is not a {FORMAT} file: run `{REGENERATE}`")
    recorded: dict[str, Any] = data.get("versions", {})
    stale = [
        v.version
        for v in versions
        if v.version not in recorded or recorded[v.version].get("sources") != sources(v)
    ]
    stale += [v for v in recorded if v not in {m.version for m in versions}]
    if stale:
        raise CatalogError(
            f"{path} was not generated from these SQL files (version(s) {', '.join(stale)}"
            f" differ): run `{REGENERATE}`"
        )
    return {version: entry["catalog"] for version, entry in recorded.items()}


def _database_dsn(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def _prefix_dir(
    versions: Sequence[migrate.MigrationVersion],
    functions: Sequence[migrate.FunctionFile],
    target: Path,
) -> Path:
    """A SQL directory with exactly ``versions``' files, for a clean install of that prefix:
    each function file as it was while the last of them was the newest version (its
    ``sql/history/`` text when a later version reworked it)."""
    newest = versions[-1].version
    introduced = {v.version for v in versions}
    files = [(f.relpath, f.text) for v in versions for f in (v.schema, v.rollback)]
    files += [(f.relpath, f.text_at(newest).text) for f in functions if f.version in introduced]
    for relpath, text in files:
        path = target / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


async def generate(admin_dsn: str, sql_dir: Path | None = None) -> dict[str, Any]:
    """Install each version prefix into a scratch database of ``admin_dsn``'s server (which
    needs CREATEDB) and return the catalog file's content; the databases are dropped."""
    root = (sql_dir or migrate.default_sql_dir()).resolve()
    versions = migrate.load_versions(root)
    functions = migrate.load_functions(root)
    out: dict[str, Any] = {
        "format": FORMAT,
        "regenerate": REGENERATE,
        "note": "The catalog of a clean install of versions <= each version; "
        "see tokentrack_client/ops/catalog.py.",
        "versions": {},
    }
    admin = await asyncpg.connect(admin_dsn)
    try:
        for index, version in enumerate(versions):
            name = f"tokentrack_catalog_{uuid.uuid4().hex[:12]}"
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
            scratch = Path(tempfile.mkdtemp(prefix="tokentrack-catalog-"))
            try:
                prefix = _prefix_dir(versions[: index + 1], functions, scratch)
                dsn = _database_dsn(admin_dsn, name)
                await migrate.install(dsn, sql_dir=prefix)
                conn = await asyncpg.connect(dsn)
                try:
                    catalog = await read_catalog(conn)
                finally:
                    await conn.close()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            out["versions"][version.version] = {
                "checksum": version.checksum,
                "sources": sources(version),
                "catalog": catalog,
            }
    finally:
        await admin.close()
    return out


def render(content: dict[str, Any]) -> str:
    """The catalog file's text: stable key order, one value per line."""
    return json.dumps(content, indent=1, sort_keys=True) + "\n"


def digest(text: str) -> str:
    """sha256 of a catalog file's text (shown by ``make catalog``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokentrack_client.ops.catalog [--database-url URL] [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tokentrack_client.ops.catalog",
        description="Install each version prefix into scratch databases and write the "
        "catalog that tokentrack verify expects (sql/catalog.json).",
    )
    parser.add_argument(
        "--database-url",
        help="a server to create the scratch databases on (a role with CREATEDB, connected "
        "to a maintenance database); default: a throwaway server of its own",
    )
    parser.add_argument("--sql-dir", type=Path, default=None, help="default: the SQL directory")
    parser.add_argument("--out", type=Path, default=None, help="default: <sql dir>/catalog.json")
    args = parser.parse_args(argv)
    out = args.out or catalog_path(args.sql_dir)

    async def run(dsn: str) -> str:
        return render(await generate(dsn, args.sql_dir))

    if args.database_url:
        text = asyncio.run(run(args.database_url))
    else:
        from tokentrack_client.testing import PostgresServer

        with PostgresServer(prefix="tokentrack-catalog-") as server:
            text = asyncio.run(run(server.dsn()))
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} (sha256 {digest(text)[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
