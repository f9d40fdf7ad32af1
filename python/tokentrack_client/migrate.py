"""The tokentrack migrator: applies, rolls back and prints the versioned SQL.

SQL layout (see ``docs/INSTALL.md``)::

    sql/schema/<VERSION>_<name>.sql     one per version, VERSION is 14 digits (a UTC timestamp)
    sql/rollback/<VERSION>_<name>.sql   exactly one per version, same file name, undoes it
    sql/functions/<function>.sql        one function per file; a header line
                                        ``-- version: <VERSION>`` names the version that adds it

The SQL directory is ``$TOKENTRACK_SQL_DIR`` when set, else the ``_sql`` directory shipped
inside the installed wheel, else the ``sql`` directory of the source checkout.

Applied versions are recorded in ``tokentrack.schema_migrations`` together with the sha256
of every applied file, so that an applied file edited later is refused loudly. The
version checksum is the sha256 of the version's files listed in ``sha256sum`` format
(``"<sha256 of file>  <relative path>\\n"`` for the schema file, then the function files in
file-name order), so ``cd sql && sha256sum schema/V_name.sql functions/a.sql ... | sha256sum``
reproduces it.

Concurrent installers are serialised by a session-level advisory lock on the constant key
:data:`ADVISORY_LOCK_KEY` = ``8390042714203517547`` (``int.from_bytes(b"tokentrk", "big")``).
Advisory locks are per database, so installs into different databases never wait for each
other. A DBA can see a running install with::

    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND classid = 1953459045 AND objid = 1701147243;

(the key's high and low 32 bits). The SQL printed by ``tokentrack migrate sql`` takes the same
key with ``pg_advisory_xact_lock`` so it cannot interleave with the migrator either.

Each version is applied in one transaction: its schema file, its function files in file-name
order, then its ``schema_migrations`` row. A failure rolls that transaction back whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import asyncpg

__all__ = [
    "ADVISORY_LOCK_KEY",
    "BOOTSTRAP_SQL",
    "ApplyError",
    "ConnectionFailed",
    "DriftError",
    "MigrationError",
    "MigrationOrderError",
    "MigrationVersion",
    "SqlFile",
    "SqlLayoutError",
    "VersionStatus",
    "default_sql_dir",
    "install",
    "load_versions",
    "pending_versions",
    "render_sql",
    "rollback",
    "status",
]

ADVISORY_LOCK_KEY: Final = 8390042714203517547
"""Key of the advisory lock that serialises installers: ``int.from_bytes(b"tokentrk", "big")``."""

SCHEMA: Final = "tokentrack"
CONNECT_TIMEOUT: Final = 10.0

BOOTSTRAP_SQL: Final = """\
CREATE SCHEMA IF NOT EXISTS tokentrack;
CREATE TABLE IF NOT EXISTS tokentrack.schema_migrations (
    version text PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    files jsonb NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT current_user
);
COMMENT ON TABLE tokentrack.schema_migrations IS
    'Applied tokentrack schema versions, written by the tokentrack migrator in the same '
    'transaction as the version itself. files maps each applied file (path relative to the '
    'sql directory) to its sha256; checksum is the sha256 of those files in sha256sum format.';
"""
"""Idempotent SQL that creates the ``tokentrack`` schema and the version table."""

_INSERT_VERSION_SQL: Final = (
    "INSERT INTO tokentrack.schema_migrations (version, name, checksum, files) "
    "VALUES ($1, $2, $3, $4::jsonb)"
)

_VERSION_FILE_RE: Final = re.compile(r"^(?P<version>[0-9]{14})_(?P<name>[a-z][a-z0-9_]*)\.sql$")
_FUNCTION_FILE_RE: Final = re.compile(r"^[a-z_][a-z0-9_]*\.sql$")
_HEADER_RE: Final = re.compile(r"^--\s*version\s*:", re.IGNORECASE)
_EXACT_HEADER_RE: Final = re.compile(r"^-- version: (?P<version>[0-9]{14})$")


class MigrationError(Exception):
    """Base class of every error the migrator reports; its message is one line for the CLI."""


class SqlLayoutError(MigrationError):
    """The SQL directory is not laid out as the loader requires (names, halves, headers)."""


class ConnectionFailed(MigrationError):
    """The database URL is invalid, or the server cannot be reached or refuses the login."""


class DriftError(MigrationError):
    """An applied file was edited after it was applied, or an applied version left the disk."""


class MigrationOrderError(MigrationError):
    """A pending version is older than the newest applied version."""


class ApplyError(MigrationError):
    """A statement failed while bootstrapping, applying or rolling back (e.g. SQLSTATE 42501)."""


@dataclass(frozen=True)
class SqlFile:
    """One SQL file: its path relative to the SQL directory, its text and its sha256."""

    relpath: str
    text: str
    sha256: str

    @classmethod
    def read(cls, sql_dir: Path, path: Path) -> SqlFile:
        """Read ``path`` (inside ``sql_dir``) as UTF-8 and hash its bytes."""
        relpath = path.relative_to(sql_dir).as_posix()
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SqlLayoutError(f"{path}: not valid UTF-8 ({exc.reason})") from exc
        return cls(relpath=relpath, text=text, sha256=hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class MigrationVersion:
    """One schema version as found on disk."""

    version: str
    name: str
    schema: SqlFile
    rollback: SqlFile
    functions: tuple[SqlFile, ...] = ()

    @property
    def applied_files(self) -> tuple[SqlFile, ...]:
        """The files applied for this version, in order: the schema file, then the functions."""
        return (self.schema, *self.functions)

    @property
    def file_checksums(self) -> dict[str, str]:
        """``{relative path: sha256}`` of the applied files, as stored in ``files``."""
        return {f.relpath: f.sha256 for f in self.applied_files}

    @property
    def checksum(self) -> str:
        """sha256 of the applied files listed in ``sha256sum`` format, in apply order."""
        listing = "".join(f"{f.sha256}  {f.relpath}\n" for f in self.applied_files)
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        """``VERSION_name`` as in the file names."""
        return f"{self.version}_{self.name}"


@dataclass(frozen=True)
class AppliedRow:
    """One row of ``tokentrack.schema_migrations``."""

    version: str
    name: str
    checksum: str
    files: Mapping[str, str]
    applied_at: datetime
    applied_by: str


@dataclass(frozen=True)
class VersionStatus:
    """Status of one version for ``tokentrack migrate list``.

    ``status`` is ``applied``, ``pending``, ``drifted`` (applied, but files changed on disk
    since) or ``missing`` (applied, but no longer on disk).
    """

    version: str
    name: str
    status: str
    applied_at: datetime | None = None
    changed_files: tuple[str, ...] = field(default_factory=tuple)


Echo = Callable[[str], None]


def _stdout(line: str) -> None:
    print(line, flush=True)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Loading the SQL directory
# --------------------------------------------------------------------------------------------


def default_sql_dir() -> Path:
    """Return the SQL directory: ``$TOKENTRACK_SQL_DIR``, the packaged ``_sql``, or ``./sql``."""
    env = os.environ.get("TOKENTRACK_SQL_DIR")
    if env:
        return Path(env)
    packaged = Path(__file__).resolve().parent / "_sql"
    if (packaged / "schema").is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def _list_sql_files(directory: Path) -> list[Path]:
    """All entries of ``directory`` except dot files; anything that is not a file is refused."""
    if not directory.is_dir():
        return []
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if not entry.is_file():
            raise SqlLayoutError(f"{entry}: unexpected entry, only .sql files belong here")
    return entries


def _parse_version_files(directory: Path, kind: str) -> dict[str, tuple[str, Path]]:
    """Map version -> (name, path) for ``directory``; refuse bad names and duplicates."""
    found: dict[str, tuple[str, Path]] = {}
    for path in _list_sql_files(directory):
        match = _VERSION_FILE_RE.match(path.name)
        if match is None:
            raise SqlLayoutError(
                f"{path}: bad {kind} file name, expected <14-digit VERSION>_<name>.sql "
                "with name in lower case letters, digits and underscores"
            )
        version, name = match["version"], match["name"]
        if version in found:
            raise SqlLayoutError(
                f"{path}: duplicate version {version}, also used by {found[version][1]}"
            )
        found[version] = (name, path)
    return found


def _function_version(path: Path, text: str) -> str:
    """Return the version named by the ``-- version: <VERSION>`` line of the header comment.

    The header is the block of comment and blank lines at the top of the file.
    """
    versions: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("--"):
            break
        if _HEADER_RE.match(line):
            exact = _EXACT_HEADER_RE.match(line)
            if exact is None:
                raise SqlLayoutError(
                    f"{path}: malformed header line {line!r}, expected '-- version: <VERSION>' "
                    "with a 14-digit VERSION"
                )
            versions.append(exact["version"])
    if not versions:
        raise SqlLayoutError(
            f"{path}: no '-- version: <VERSION>' line in the header comment at the top of the "
            "file; every function file must say which version introduced it"
        )
    if len(versions) > 1:
        raise SqlLayoutError(f"{path}: more than one '-- version:' header line")
    return versions[0]


def load_versions(sql_dir: Path | None = None) -> list[MigrationVersion]:
    """Load and validate every version under ``sql_dir``, oldest first.

    Raises :class:`SqlLayoutError`, naming the offending file, for a schema file without its
    rollback or the reverse, a duplicate version, a bad file name, or a function file whose
    header does not name exactly one known version.
    """
    root = (sql_dir or default_sql_dir()).resolve()
    schema_dir, rollback_dir, functions_dir = root / "schema", root / "rollback", root / "functions"
    if not schema_dir.is_dir():
        raise SqlLayoutError(f"{schema_dir}: SQL schema directory not found (TOKENTRACK_SQL_DIR?)")

    schemas = _parse_version_files(schema_dir, "schema")
    rollbacks = _parse_version_files(rollback_dir, "rollback")
    if not schemas:
        raise SqlLayoutError(f"{schema_dir}: no schema versions found")

    for version, (name, path) in schemas.items():
        expected = rollback_dir / path.name
        if version not in rollbacks or rollbacks[version][0] != name:
            raise SqlLayoutError(f"{path}: schema file has no rollback file, expected {expected}")
    for version, (name, path) in rollbacks.items():
        if version not in schemas or schemas[version][0] != name:
            raise SqlLayoutError(
                f"{path}: rollback file has no schema file, expected {schema_dir / path.name}"
            )

    functions: dict[str, list[SqlFile]] = {version: [] for version in schemas}
    for path in _list_sql_files(functions_dir):
        if _FUNCTION_FILE_RE.match(path.name) is None:
            raise SqlLayoutError(
                f"{path}: bad function file name, expected <function_name>.sql in lower case"
            )
        sql_file = SqlFile.read(root, path)
        version = _function_version(path, sql_file.text)
        if version not in functions:
            raise SqlLayoutError(
                f"{path}: header names version {version}, which has no schema file in {schema_dir}"
            )
        functions[version].append(sql_file)

    return [
        MigrationVersion(
            version=version,
            name=schemas[version][0],
            schema=SqlFile.read(root, schemas[version][1]),
            rollback=SqlFile.read(root, rollbacks[version][1]),
            functions=tuple(sorted(functions[version], key=lambda f: f.relpath)),
        )
        for version in sorted(schemas)
    ]


# --------------------------------------------------------------------------------------------
# Database helpers
# --------------------------------------------------------------------------------------------


def describe_target(dsn: str) -> str:
    """``user@host:port/db`` for messages; never the password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        user = f"{parts.username}@" if parts.username else ""
        db = parts.path.lstrip("/") or "(default database)"
    except ValueError:
        return "the database"
    return f"{user}{host}:{port}/{db}"


def pg_error(exc: asyncpg.PostgresError) -> str:
    """One line: the SQLSTATE and the server's message."""
    message = " ".join(str(exc).split())
    return f"SQLSTATE {exc.sqlstate}: {message}"


async def _connect(dsn: str) -> asyncpg.Connection:
    """Connect, turning every failure into :class:`ConnectionFailed` with a one-line message."""
    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise ConnectionFailed(
            "invalid DATABASE_URL: expected a URL like postgresql://user:password@host:5432/dbname"
        )
    target = describe_target(dsn)
    try:
        return await asyncpg.connect(
            dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": "tokentrack migrate"},
        )
    except asyncpg.PostgresError as exc:
        raise ConnectionFailed(f"cannot connect to {target}: {pg_error(exc)}") from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConnectionFailed(f"cannot connect to {target}: {detail}") from exc


async def _close(conn: asyncpg.Connection) -> None:
    """Close politely, or drop the socket when the connection is already broken."""
    try:
        await asyncio.wait_for(conn.close(), timeout=5)
    except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
        conn.terminate()


async def _acquire_lock(conn: asyncpg.Connection, wait_notice: Echo) -> None:
    got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY)
    if not got:
        wait_notice(
            f"waiting for another tokentrack installer (advisory lock {ADVISORY_LOCK_KEY})..."
        )
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)


async def _release_lock(conn: asyncpg.Connection) -> None:
    if not conn.is_closed():
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)


async def _table_exists(conn: asyncpg.Connection) -> bool:
    found = await conn.fetchval("SELECT to_regclass('tokentrack.schema_migrations') IS NOT NULL")
    return bool(found)


async def _bootstrap(conn: asyncpg.Connection) -> None:
    """Create the schema and the version table unless they exist (needs CREATE on the db)."""
    if await _table_exists(conn):
        return
    try:
        async with conn.transaction():
            await conn.execute(BOOTSTRAP_SQL)
    except asyncpg.PostgresError as exc:
        hint = ""
        if exc.sqlstate == "42501":
            hint = "; the installing role needs CREATE on the database (see docs/INSTALL.md)"
        raise ApplyError(
            f"cannot create tokentrack.schema_migrations: {pg_error(exc)}{hint}"
        ) from exc


async def _applied_rows(conn: asyncpg.Connection) -> list[AppliedRow]:
    if not await _table_exists(conn):
        return []
    try:
        records = await conn.fetch(
            "SELECT version, name, checksum, files::text AS files, applied_at, applied_by "
            "FROM tokentrack.schema_migrations ORDER BY version"
        )
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"cannot read tokentrack.schema_migrations: {pg_error(exc)}") from exc
    return [
        AppliedRow(
            version=r["version"],
            name=r["name"],
            checksum=r["checksum"],
            files=json.loads(r["files"]),
            applied_at=r["applied_at"],
            applied_by=r["applied_by"],
        )
        for r in records
    ]


def _changed_files(row: AppliedRow, on_disk: MigrationVersion) -> list[str]:
    """Files of an applied version that differ from what was applied (edited, added, removed)."""
    disk = on_disk.file_checksums
    changed = [path for path, digest in disk.items() if row.files.get(path) != digest]
    changed += [path for path in row.files if path not in disk]
    if row.name != on_disk.name:
        changed.append(on_disk.schema.relpath)
    return sorted(set(changed))


def _check_applied(
    versions: Sequence[MigrationVersion], applied: Sequence[AppliedRow], sql_dir: Path
) -> list[MigrationVersion]:
    """Refuse drift, vanished versions and out-of-order pending ones; return the pending."""
    by_version = {v.version: v for v in versions}
    missing = [row for row in applied if row.version not in by_version]
    if missing:
        names = ", ".join(f"{row.version}_{row.name}" for row in missing)
        raise DriftError(
            f"applied version(s) {names} not found in {sql_dir}; refusing to install from a "
            "SQL directory that does not contain what the database has"
        )
    edited: list[str] = []
    for row in applied:
        edited += _changed_files(row, by_version[row.version])
    if edited:
        raise DriftError(
            "applied file(s) changed since they were applied: "
            + ", ".join(edited)
            + "; restore them or add a new version (nothing was changed)"
        )
    applied_versions = {row.version for row in applied}
    pending = [v for v in versions if v.version not in applied_versions]
    if applied and pending:
        newest = max(applied_versions)
        older = [v.label for v in pending if v.version < newest]
        if older:
            raise MigrationOrderError(
                f"pending version(s) {', '.join(older)} are older than the newest applied "
                f"version {newest}; versions must be applied in order (nothing was changed)"
            )
    return pending


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


async def install(
    dsn: str,
    *,
    sql_dir: Path | None = None,
    echo: Echo = _stdout,
    wait_notice: Echo = _stderr,
) -> list[MigrationVersion]:
    """Apply every pending version, each in its own transaction; return those applied.

    Takes the advisory lock :data:`ADVISORY_LOCK_KEY`, bootstraps ``schema_migrations``,
    refuses drift (naming every edited file), applied versions missing on disk and pending
    versions older than the newest applied one, then applies the pending versions in order.
    Prints one line per applied version, or that the schema is up to date.
    """
    root = (sql_dir or default_sql_dir()).resolve()
    versions = load_versions(root)
    conn = await _connect(dsn)
    try:
        await _acquire_lock(conn, wait_notice)
        try:
            await _bootstrap(conn)
            applied = await _applied_rows(conn)
            pending = _check_applied(versions, applied, root)
            if not pending:
                newest = applied[-1]
                echo(
                    f"tokentrack schema is up to date at version {newest.version} "
                    f"({newest.name}); nothing was done"
                )
                return []
            done: list[MigrationVersion] = []
            for version in pending:
                await _apply_version(conn, version, done)
                done.append(version)
                echo(
                    f"applied {version.version} {version.name} "
                    f"({len(version.functions)} function file(s))"
                )
            echo(f"tokentrack schema is now at version {done[-1].version} ({done[-1].name})")
            return done
        finally:
            await _release_lock(conn)
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"{describe_target(dsn)}: {pg_error(exc)}") from exc
    except (asyncpg.InterfaceError, OSError) as exc:
        raise ApplyError(f"lost the connection to {describe_target(dsn)}: {exc}") from exc
    finally:
        await _close(conn)


async def _apply_version(
    conn: asyncpg.Connection, version: MigrationVersion, done: Sequence[MigrationVersion]
) -> None:
    current = version.schema.relpath
    try:
        async with conn.transaction():
            for sql_file in version.applied_files:
                current = sql_file.relpath
                await conn.execute(sql_file.text)
            current = "tokentrack.schema_migrations"
            await conn.execute(
                _INSERT_VERSION_SQL,
                version.version,
                version.name,
                version.checksum,
                json.dumps(version.file_checksums, sort_keys=True),
            )
    except asyncpg.PostgresError as exc:
        kept = (
            f"; already applied in this run: {', '.join(v.version for v in done)}" if done else ""
        )
        raise ApplyError(
            f"applying version {version.label} failed in {current}: {pg_error(exc)}; "
            f"version {version.version} was rolled back{kept}"
        ) from exc


async def rollback(
    dsn: str,
    *,
    steps: int = 1,
    sql_dir: Path | None = None,
    echo: Echo = _stdout,
    wait_notice: Echo = _stderr,
) -> list[str]:
    """Roll back the newest ``steps`` applied versions, newest first; return their versions.

    Each version's rollback file runs in one transaction together with the deletion of its
    ``schema_migrations`` row. With nothing applied it says so and does nothing.
    """
    if steps < 1:
        raise MigrationError(f"--steps must be at least 1, got {steps}")
    root = (sql_dir or default_sql_dir()).resolve()
    versions = {v.version: v for v in load_versions(root)}
    conn = await _connect(dsn)
    try:
        await _acquire_lock(conn, wait_notice)
        try:
            applied = await _applied_rows(conn)
            if not applied:
                echo("nothing to roll back: no tokentrack version is applied")
                return []
            targets = list(reversed(applied))[:steps]
            missing = [
                f"{row.version}_{row.name}" for row in targets if row.version not in versions
            ]
            if missing:
                raise DriftError(
                    f"no rollback file for applied version(s) {', '.join(missing)} in "
                    f"{root / 'rollback'} (nothing was changed)"
                )
            done: list[str] = []
            for row in targets:
                version = versions[row.version]
                try:
                    async with conn.transaction():
                        await conn.execute(version.rollback.text)
                        await conn.execute(
                            "DELETE FROM tokentrack.schema_migrations WHERE version = $1",
                            row.version,
                        )
                except asyncpg.PostgresError as exc:
                    kept = f"; already rolled back: {', '.join(done)}" if done else ""
                    raise ApplyError(
                        f"rolling back version {version.label} failed in "
                        f"{version.rollback.relpath}: {pg_error(exc)}; "
                        f"version {row.version} stays applied{kept}"
                    ) from exc
                done.append(row.version)
                echo(f"rolled back {row.version} {row.name}")
            remaining = applied[: len(applied) - len(done)]
            if remaining:
                echo(
                    f"tokentrack schema is now at version {remaining[-1].version} "
                    f"({remaining[-1].name})"
                )
            else:
                echo("no tokentrack version is applied any more")
            return done
        finally:
            await _release_lock(conn)
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"{describe_target(dsn)}: {pg_error(exc)}") from exc
    except (asyncpg.InterfaceError, OSError) as exc:
        raise ApplyError(f"lost the connection to {describe_target(dsn)}: {exc}") from exc
    finally:
        await _close(conn)


async def status(dsn: str, *, sql_dir: Path | None = None) -> list[VersionStatus]:
    """Status of every version on disk or in the database, oldest first (read-only)."""
    root = (sql_dir or default_sql_dir()).resolve()
    versions = {v.version: v for v in load_versions(root)}
    conn = await _connect(dsn)
    try:
        applied = {row.version: row for row in await _applied_rows(conn)}
    finally:
        await _close(conn)
    result: list[VersionStatus] = []
    for key in sorted(versions.keys() | applied.keys()):
        row, disk = applied.get(key), versions.get(key)
        if row is None and disk is not None:
            result.append(VersionStatus(key, disk.name, "pending"))
        elif row is not None and disk is None:
            result.append(VersionStatus(key, row.name, "missing", row.applied_at))
        elif row is not None and disk is not None:
            changed = tuple(_changed_files(row, disk))
            state = "drifted" if changed else "applied"
            result.append(VersionStatus(key, disk.name, state, row.applied_at, changed))
    return result


async def pending_versions(dsn: str, *, sql_dir: Path | None = None) -> list[MigrationVersion]:
    """Versions not yet applied to the database at ``dsn`` (read-only; refuses drift)."""
    root = (sql_dir or default_sql_dir()).resolve()
    versions = load_versions(root)
    conn = await _connect(dsn)
    try:
        applied = await _applied_rows(conn)
    finally:
        await _close(conn)
    return _check_applied(versions, applied, root)


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _terminated(text: str) -> str:
    """``text`` without trailing blank lines, ending its last statement with ``;`` for psql."""
    lines = text.rstrip().splitlines()
    code = [line for line in lines if line.strip() and not line.strip().startswith("--")]
    if code and not code[-1].rstrip().endswith(";"):
        lines.append(";")
    return "\n".join(lines)


def render_sql(versions: Sequence[MigrationVersion]) -> str:
    """The SQL that applies ``versions`` with psql, for teams with their own migration tool.

    Output: the bootstrap in its own transaction, then one ``BEGIN; ... COMMIT;`` block per
    version holding the schema file, the function files and the ``schema_migrations`` row.
    Each block first takes the installer's advisory lock and refuses a version that is
    already applied. Run it with ``psql -v ON_ERROR_STOP=1 -f FILE``.
    """
    from tokentrack_client import __version__

    out: list[str] = [
        f"-- tokentrack {__version__}: SQL of version(s) "
        + (", ".join(v.label for v in versions) or "(none)"),
        "-- Generated by `tokentrack migrate sql`. Apply with: psql -v ON_ERROR_STOP=1 -f FILE",
        "",
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});",
        BOOTSTRAP_SQL.rstrip("\n"),
        "COMMIT;",
    ]
    for version in versions:
        out += [
            "",
            f"-- ===== version {version.label} =====",
            "BEGIN;",
            f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});",
            "DO $tokentrack_guard$",
            "BEGIN",
            "    IF EXISTS (SELECT 1 FROM tokentrack.schema_migrations",
            f"               WHERE version = {_quote_literal(version.version)}) THEN",
            "        RAISE EXCEPTION USING ERRCODE = 'unique_violation',",
            f"            MESSAGE = 'tokentrack version {version.version} is already applied';",
            "    END IF;",
            "END",
            "$tokentrack_guard$;",
        ]
        for sql_file in version.applied_files:
            out += [
                "",
                f"-- ----- {sql_file.relpath} (sha256 {sql_file.sha256})",
                _terminated(sql_file.text),
            ]
        files_json = json.dumps(version.file_checksums, sort_keys=True)
        out += [
            "",
            "INSERT INTO tokentrack.schema_migrations (version, name, checksum, files)",
            f"VALUES ({_quote_literal(version.version)}, {_quote_literal(version.name)}, "
            f"{_quote_literal(version.checksum)}, {_quote_literal(files_json)}::jsonb);",
            "COMMIT;",
        ]
    return "\n".join(out) + "\n"
