"""The tokentrack migrator: applies, rolls back and prints the versioned SQL.

SQL layout (see ``docs/INSTALL.md``)::

    sql/schema/<VERSION>_<name>.sql     one per version, VERSION is 14 digits (a UTC timestamp):
                                        tables, roles, policies, data changes; applied once
    sql/rollback/<VERSION>_<name>.sql   exactly one per version, same file name, undoes it;
                                        a header line ``-- billing-tables: <tables> | none``
                                        names the version's tables that hold billing data,
                                        an optional ``-- billing-columns: t(c1, c2); u(c3)``
                                        the billing columns it adds to older tables
    sql/functions/<function>.sql        the current definition of one function (CREATE OR
                                        REPLACE); a header line ``-- version: <VERSION>`` names
                                        the version that introduced it
    sql/history/<VERSION>/<function>.sql
                                        the function file as it was while VERSION was the
                                        newest version, kept when a later version reworked it
                                        (sqitch's rework): a fresh install of several versions
                                        records each text in order (see :func:`_plan`), so the
                                        rollback of the version after VERSION restores it

The SQL directory is ``$TOKENTRACK_SQL_DIR`` when set, else the ``_sql`` directory shipped
inside the installed wheel, else the ``sql`` directory of the source checkout.

Versions are recorded in ``tokentrack.schema_migrations`` with the sha256 of their schema
file, so that an applied schema file edited later is refused loudly. The version checksum is
the sha256 of that file listed in ``sha256sum`` format (``"<sha256>  schema/V_name.sql\\n"``),
so ``cd sql && sha256sum schema/V_name.sql | sha256sum`` reproduces it.

Function files are repeatable (Flyway's repeatable migrations, sqitch's rework): whenever a
file's sha256 differs from the one last recorded for it, the installer applies it again, in
the transaction of the last pending version (or in one of its own when no version is
pending), and appends a row to ``tokentrack.schema_functions``: the file's path, sha256 and
full text, the version the row belongs to, and the signatures the file defines with an md5 of
each ``pg_get_functiondef``. A signature the file no longer defines is dropped. Rolling back
version V drops the functions V introduced and re-executes, byte for byte, the newest text
recorded before V of every function that V (or a change made while V was the newest version)
replaced: the database holds its own history, a rollback needs no old source.

The version a function row belongs to: the file's header version when the file is applied
for the first time (so a function introduced by V1 survives the rollback of V2 even when V1
and V2 were installed together), otherwise the newest version at the moment of the change
(the last pending one, or the newest applied one).

Concurrent installers are serialised by a session-level advisory lock on the constant key
:data:`ADVISORY_LOCK_KEY` = ``8390042714203517547`` (``int.from_bytes(b"tokentrk", "big")``).
Advisory locks are per database, so installs into different databases never wait for each
other. A DBA can see a running install with::

    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND classid = 1953459045 AND objid = 1853125227;

(the key's high and low 32 bits). The SQL printed by ``tokentrack migrate sql`` takes the same
key with ``pg_advisory_xact_lock`` so it cannot interleave with the migrator either.

Each version is applied in one transaction: its schema file then its ``schema_migrations``
row (the last pending version also carries the changed function files). A failure rolls that
transaction back whole. A first install (no ``schema_migrations`` yet) creates the schema and
the bookkeeping tables in the transaction of its first version, so a first install that fails
there leaves nothing behind.

Billing data is never dropped silently: a rollback refuses to drop a declared billing table
that holds rows, unless ``archive``, which bills the active reservations as the sweep does and
keeps the rows in the schema :data:`ARCHIVE_SCHEMA`; the next install of the version moves
them back in its transaction (see :func:`rollback` and :func:`_restore_sql`). The same goes
for declared billing columns (:class:`BillingColumns`), columns a version adds to a table of
an older version: a row holds data in them when one IS DISTINCT FROM its default; the
rollback refuses while a row does, ``archive`` keeps the primary key and those columns of
such rows in ``tokentrack_archive.<table>__<VERSION>``, and the next install writes them
back by primary key, with the table's enabled user triggers off around the UPDATE.

The commands return what they did (:class:`InstallResult`, :class:`RollbackResult`,
:class:`Status`) and print nothing; the CLI prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, Literal

import asyncpg

from tokentrack_client import connection
from tokentrack_client.connection import CommandError, describe_target, pg_error

__all__ = [
    "ADVISORY_LOCK_KEY",
    "ARCHIVE_SCHEMA",
    "BOOTSTRAP_SQL",
    "AppliedFunction",
    "ApplyError",
    "BootstrapError",
    "ConnectionFailed",
    "DriftError",
    "FunctionChange",
    "FunctionFile",
    "FunctionStatus",
    "InstallPlan",
    "InstallResult",
    "MigrationError",
    "MigrationOrderError",
    "MigrationVersion",
    "RollbackRefused",
    "RollbackResult",
    "RollbackSweep",
    "RolledBackVersion",
    "SqlFile",
    "SqlLayoutError",
    "Status",
    "TableRows",
    "VersionStatus",
    "default_sql_dir",
    "fresh_plan",
    "install",
    "load_functions",
    "load_versions",
    "pending_plan",
    "pending_versions",
    "render_sql",
    "rollback",
    "status",
]

ADVISORY_LOCK_KEY: Final = 8390042714203517547
"""Key of the advisory lock that serialises installers: ``int.from_bytes(b"tokentrk", "big")``."""


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
    'transaction as the version itself. files maps the version''s schema file (path relative '
    'to the sql directory) to its sha256; checksum is the sha256 of that in sha256sum format.';
CREATE TABLE IF NOT EXISTS tokentrack.schema_functions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path text NOT NULL,
    sha256 text,
    source text,
    version text NOT NULL,
    signatures jsonb NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT current_user
);
COMMENT ON TABLE tokentrack.schema_functions IS
    'Every application of a tokentrack function file, newest last, written by the migrator in '
    'the same transaction: source is the file''s full text (NULL: the file was removed), '
    'version the schema version whose rollback undoes the row, signatures maps each '
    'regprocedure the file defines to md5(pg_get_functiondef). A rollback re-executes the '
    'newest remaining source of every function it touches.';
"""
"""Idempotent SQL that creates the ``tokentrack`` schema and the two bookkeeping tables."""

_INSERT_VERSION_SQL: Final = (
    "INSERT INTO tokentrack.schema_migrations (version, name, checksum, files) "
    "VALUES ($1, $2, $3, $4::jsonb)"
)

_PIN_SEARCH_PATH: Final = "SET LOCAL search_path = pg_catalog, pg_temp;"
"""Set before function files and bookkeeping, so regprocedure text is the same every time."""

_VERSION_FILE_RE: Final = re.compile(r"^(?P<version>[0-9]{14})_(?P<name>[a-z][a-z0-9_]*)\.sql$")
_FUNCTION_FILE_RE: Final = re.compile(r"^[a-z_][a-z0-9_]*\.sql$")
_HEADER_RE: Final = re.compile(r"^--\s*version\s*:", re.IGNORECASE)
_EXACT_HEADER_RE: Final = re.compile(r"^-- version: (?P<version>[0-9]{14})$")
_OR_REPLACE_RE: Final = re.compile(r"^CREATE OR REPLACE (FUNCTION|PROCEDURE) ", re.MULTILINE)
_BILLING_HEADER_RE: Final = re.compile(r"^--\s*billing[-_ ]tables\s*:", re.IGNORECASE)
_EXACT_BILLING_RE: Final = re.compile(
    r"^-- billing-tables: (?P<tables>none|[a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*)$"
)
_BILLING_COLUMNS_HEADER_RE: Final = re.compile(r"^--\s*billing[-_ ]columns\s*:", re.IGNORECASE)
_COLUMNS_GROUP: Final = r"[a-z_][a-z0-9_]*\([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*\)"
_EXACT_BILLING_COLUMNS_RE: Final = re.compile(
    rf"^-- billing-columns: (?P<groups>{_COLUMNS_GROUP}(?:; {_COLUMNS_GROUP})*)$"
)
_GROUP_RE: Final = re.compile(r"(?P<table>[a-z_][a-z0-9_]*)\((?P<columns>[^)]*)\)")
_COLUMN_ARCHIVE_SUFFIX_RE: Final = re.compile(r"__[0-9]{14}$")

ARCHIVE_SCHEMA: Final = "tokentrack_archive"
"""Where ``rollback --archive`` keeps the rows of the billing tables it drops (see
:func:`rollback`): one table per source table, same name, with ``archived_at`` and
``archived_version`` first; and the values of the billing columns it drops, one table
``<table>__<VERSION>`` per table (primary key and those columns); restored by the next
install of that version."""

_MAX_IDENTIFIER: Final = 63
"""PostgreSQL's longest identifier (NAMEDATALEN - 1): an archive name must fit."""


class MigrationError(CommandError):
    """Base class of every error the migrator reports; its message is one line for the CLI.

    ``result`` holds what was done before the failure (an :class:`InstallResult` or a
    :class:`RollbackResult`), or None.
    """

    def __init__(self, message: str, *, result: InstallResult | RollbackResult | None = None):
        super().__init__(message)
        self.result = result


class SqlLayoutError(MigrationError):
    """The SQL directory is not laid out as the loader requires (names, halves, headers)."""


class ConnectionFailed(MigrationError, connection.ConnectionFailed):
    """The database URL is invalid, or the server cannot be reached or refuses the login."""


class DriftError(MigrationError):
    """An applied schema file was edited after it was applied, or an applied version left."""


class MigrationOrderError(MigrationError):
    """A pending version is older than the newest applied version."""


class ApplyError(MigrationError):
    """A statement failed while bootstrapping, applying or rolling back (e.g. SQLSTATE 42501)."""


class RollbackRefused(MigrationError):
    """A rollback without ``archive`` would drop rows of a version's billing tables.

    The message says what would be dropped, counted per table, how many recorded steps are
    not billed yet, and the way out (``make rollback-sql ARCHIVE=1``).
    """


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
class FunctionFile:
    """One file of ``sql/functions/``: the file and the version its header names."""

    file: SqlFile
    version: str
    history: tuple[tuple[str, SqlFile], ...] = ()
    """``(V, text)`` oldest first: the file as it was while version ``V`` was the newest, for
    every version after which a newer one changed it (``history/<V>/<name>.sql``)."""

    @property
    def relpath(self) -> str:
        """``functions/<name>.sql``."""
        return self.file.relpath

    def text_at(self, version: str) -> SqlFile:
        """The file as it was while ``version`` was the newest version: the oldest history
        entry at or after ``version``, else the current file."""
        for until, text in self.history:
            if until >= version:
                return text
        return self.file

    @property
    def name(self) -> str:
        """The function's name: the file name without ``.sql``."""
        return Path(self.file.relpath).stem


@dataclass(frozen=True)
class BillingColumns:
    """Columns holding billing data that a version adds to ``tokentrack.<table>``, a table of
    an older version, as its rollback file's ``-- billing-columns:`` header line names them.

    Rolling the version back drops the columns, not the table: the rows stay, the values go.
    """

    table: str
    columns: tuple[str, ...]

    def archive_table(self, version: str) -> str:
        """The name, in :data:`ARCHIVE_SCHEMA`, of the table that keeps the values the
        rollback of ``version`` drops: ``<table>__<version>``."""
        return f"{self.table}__{version}"


@dataclass(frozen=True)
class MigrationVersion:
    """One schema version as found on disk.

    ``functions`` are the function files whose header names this version (the functions it
    introduced); they are applied whenever they change, not as part of the version, and are
    not part of its checksum. ``billing_tables`` are the tables of this version that hold
    billing data, as its rollback file's ``-- billing-tables:`` header line names them, in
    the order a restore fills them (the tables each one references first);
    ``billing_columns`` the columns holding billing data that it adds to older tables, as the
    optional ``-- billing-columns:`` header line names them.
    """

    version: str
    name: str
    schema: SqlFile
    rollback: SqlFile
    functions: tuple[SqlFile, ...] = ()
    billing_tables: tuple[str, ...] = ()
    billing_columns: tuple[BillingColumns, ...] = ()

    @property
    def applied_files(self) -> tuple[SqlFile, ...]:
        """The files that create this version's objects: the schema file, then its functions."""
        return (self.schema, *self.functions)

    @property
    def file_checksums(self) -> dict[str, str]:
        """``{relative path: sha256}`` of the schema file, as stored in ``files``."""
        return {self.schema.relpath: self.schema.sha256}

    @property
    def checksum(self) -> str:
        """sha256 of the schema file listed in ``sha256sum`` format."""
        listing = f"{self.schema.sha256}  {self.schema.relpath}\n"
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

    @property
    def legacy_functions(self) -> dict[str, str]:
        """Function files recorded by an older installer, which checksummed them per version."""
        return {p: d for p, d in self.files.items() if p.startswith("functions/")}


@dataclass(frozen=True)
class FunctionRow:
    """One row of ``tokentrack.schema_functions``; ``source`` None records a removed file."""

    id: int
    path: str
    sha256: str | None
    source: str | None
    version: str
    signatures: Mapping[str, str]
    applied_at: datetime | None = None

    @property
    def defined(self) -> frozenset[str]:
        """The signatures this row leaves in place (none for a removal)."""
        return frozenset(self.signatures) if self.source is not None else frozenset()


ChangeKind = Literal["new", "changed", "removed"]


@dataclass(frozen=True)
class FunctionChange:
    """A function file that differs from what the database last recorded for it.

    ``version`` is the version the new ``schema_functions`` row belongs to (its rollback
    undoes the change); ``previous`` the signatures recorded before (dropped when the file
    no longer defines them).
    """

    path: str
    kind: ChangeKind
    version: str
    file: SqlFile | None = None
    previous: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """The function's name: the file name without ``.sql``."""
        return Path(self.path).stem


@dataclass(frozen=True)
class InstallPlan:
    """What an install would do: the pending versions and the function files to apply."""

    versions: tuple[MigrationVersion, ...]
    functions: tuple[FunctionChange, ...]
    current: tuple[str, str] | None = None
    """(version, name) of the newest applied version before the install, or None."""


@dataclass(frozen=True)
class AppliedFunction:
    """A function file applied (or removed) by an install, with what it defined and dropped."""

    path: str
    kind: ChangeKind
    version: str
    signatures: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class TableRows:
    """How many rows of the billing table ``tokentrack.<table>`` of ``version`` were (or
    would be) dropped, archived or restored.

    With ``columns``: the billing columns ``version`` added to that table; ``rows`` counts
    the rows whose values in them were archived or restored (see :class:`BillingColumns`).
    """

    version: str
    table: str
    rows: int
    columns: tuple[str, ...] = ()

    @property
    def archive_table(self) -> str:
        """The table of :data:`ARCHIVE_SCHEMA` that holds (or held) these rows."""
        if self.columns:
            return BillingColumns(self.table, self.columns).archive_table(self.version)
        return self.table

    @property
    def what(self) -> str:
        """``N row(s) of tokentrack.T``, or ``the data of N row(s) in tokentrack.T columns
        a, b`` for billing columns: what was archived or restored."""
        if self.columns:
            return (
                f"the data of {self.rows} row(s) in tokentrack.{self.table} columns "
                f"{', '.join(self.columns)}"
            )
        return f"{self.rows} row(s) of tokentrack.{self.table}"


@dataclass(frozen=True)
class RollbackSweep:
    """What ``rollback --archive`` swept before archiving: every active reservation (due or
    not) finalized as ``expired`` exactly as the sweep does; the fields of ``SweepResult``."""

    expired: int
    billed_tokens: int
    steps: int


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did. Nothing at all when ``versions``, ``functions`` and
    ``seeded`` are empty; ``current`` is (version, name) of the newest applied version after."""

    versions: tuple[MigrationVersion, ...] = ()
    functions: tuple[AppliedFunction, ...] = ()
    seeded: tuple[str, ...] = ()
    """Function files of an older installer's versions first recorded in schema_functions."""
    current: tuple[str, str] | None = None
    restored: tuple[TableRows, ...] = ()
    """Archived rows moved back into their tables (see :func:`rollback`, ``archive``)."""

    @property
    def changed_nothing(self) -> bool:
        """True when the database was already up to date."""
        return not (self.versions or self.functions or self.seeded)

    def lines(self) -> tuple[str, ...]:
        """What was done, one line each, as ``tokentrack migrate install`` prints it."""
        out: list[str] = []
        if self.seeded:
            out.append(
                f"recorded {len(self.seeded)} function file(s) applied by an older tokentrack "
                "installer in tokentrack.schema_functions"
            )
        out += [f"applied {v.version} {v.name}" for v in self.versions]
        out += [
            f"restored {t.what} from {ARCHIVE_SCHEMA}.{t.archive_table} (version {t.version})"
            for t in self.restored
        ]
        new = [f for f in self.functions if f.kind == "new"]
        if new:
            out.append(f"applied {len(new)} new function file(s)")
        for fn in self.functions:
            if fn.kind == "changed":
                out.append(f"applied changed function file {fn.path}")
            elif fn.kind == "removed":
                out.append(f"removed function file {fn.path}")
            out += [f"dropped {sig}: no longer defined by {fn.path}" for sig in fn.dropped]
        where = f"version {self.current[0]} ({self.current[1]})" if self.current else "no version"
        if self.changed_nothing:
            out.append(f"tokentrack schema is up to date at {where}; nothing was done")
        elif self.versions:
            out.append(f"tokentrack schema is now at {where}")
        else:
            out.append(f"tokentrack schema stays at {where}")
        return tuple(out)


@dataclass(frozen=True)
class RolledBackVersion:
    """One version undone by :func:`rollback`: its functions restored and dropped."""

    version: str
    name: str
    restored: tuple[str, ...]
    """Function files whose previous recorded text was executed again."""
    dropped: tuple[str, ...]
    """Signatures dropped: introduced by this version, or no longer defined after the restore."""
    billed: RollbackSweep | None = None
    """With ``archive``: what was billed before the rows were archived (None: nothing to bill)."""
    archived: tuple[TableRows, ...] = ()
    """With ``archive``: the rows copied into :data:`ARCHIVE_SCHEMA` before the tables went."""


@dataclass(frozen=True)
class RollbackResult:
    """What :func:`rollback` did, newest version first; ``current`` is what is left."""

    versions: tuple[RolledBackVersion, ...] = ()
    current: tuple[str, str] | None = None
    seeded: tuple[str, ...] = ()

    def lines(self) -> tuple[str, ...]:
        """What was done, one line each, as ``tokentrack migrate rollback`` prints it."""
        if not self.versions and self.current:
            return (
                f"nothing to roll back: tokentrack schema is at version {self.current[0]} "
                f"({self.current[1]})",
            )
        if not self.versions:
            return ("nothing to roll back: no tokentrack version is applied",)
        out: list[str] = []
        if self.seeded:
            out.append(
                f"recorded {len(self.seeded)} function file(s) applied by an older tokentrack "
                "installer in tokentrack.schema_functions"
            )
        for v in self.versions:
            if v.billed is not None:
                out.append(
                    f"billed {v.billed.expired} active reservation(s) of version "
                    f"{v.version} as the sweep does: {v.billed.steps} recorded step(s), "
                    f"{v.billed.billed_tokens} tokens"
                )
            out += [f"archived {t.what} in {ARCHIVE_SCHEMA}.{t.archive_table}" for t in v.archived]
            out.append(
                f"rolled back {v.version} {v.name} (function files restored: "
                f"{len(v.restored)}, routines dropped: {len(v.dropped)})"
            )
        archived = [v.version for v in self.versions if v.archived]
        if archived:
            out.append(
                f"the archived rows stay in schema {ARCHIVE_SCHEMA} until version(s) "
                f"{', '.join(reversed(archived))} are installed again, which restores them"
            )
        if self.current:
            out.append(f"tokentrack schema is now at version {self.current[0]} ({self.current[1]})")
        else:
            out.append("no tokentrack version is applied any more")
        return tuple(out)


@dataclass(frozen=True)
class VersionStatus:
    """Status of one version for ``tokentrack migrate list``.

    ``status`` is ``applied``, ``pending``, ``drifted`` (applied, but its schema file changed
    on disk since) or ``missing`` (applied, but no longer on disk).
    """

    version: str
    name: str
    status: str
    applied_at: datetime | None = None
    changed_files: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class FunctionStatus:
    """A function file that differs from the database: ``changed``, ``new`` or ``removed``."""

    path: str
    status: ChangeKind
    applied_at: datetime | None = None


@dataclass(frozen=True)
class Status:
    """``tokentrack migrate list``: every version, and the function files that differ."""

    versions: tuple[VersionStatus, ...]
    functions: tuple[FunctionStatus, ...]


Notice = Callable[[str], None]


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


def _header(text: str) -> list[str]:
    """The lines of the header comment: the comment and blank lines at the top, stripped."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("--"):
            break
        lines.append(line)
    return lines


def _billing_tables(rollback: SqlFile, schema: SqlFile, path: Path) -> tuple[str, ...]:
    """The tables named by the ``-- billing-tables:`` line of a rollback file's header.

    Exactly one such line: ``-- billing-tables: none`` or ``-- billing-tables: a, b`` (table
    names of schema tokentrack, each created by the version's own schema file, no repeats).
    Required, so that a new table holding usage cannot be dropped silently because nobody
    said it holds usage: the rollback refuses to drop declared tables that hold rows.
    """
    found: list[str] = []
    for line in _header(rollback.text):
        if not _BILLING_HEADER_RE.match(line):
            continue
        exact = _EXACT_BILLING_RE.match(line)
        if exact is None:
            raise SqlLayoutError(
                f"{path}: malformed header line {line!r}, expected '-- billing-tables: none' "
                "or '-- billing-tables: table_a, table_b' (tables of schema tokentrack)"
            )
        found.append(exact["tables"])
    if not found:
        raise SqlLayoutError(
            f"{path}: no '-- billing-tables: ...' line in the header comment at the top of the "
            "file; every rollback file must name the tables of its version that hold billing "
            "data, or say '-- billing-tables: none'"
        )
    if len(found) > 1:
        raise SqlLayoutError(f"{path}: more than one '-- billing-tables:' header line")
    tables = () if found[0] == "none" else tuple(found[0].split(", "))
    created = set(_CREATED_TABLE_RE.findall(schema.text))
    for table in tables:
        if tables.count(table) > 1:
            raise SqlLayoutError(f"{path}: billing table {table} is named twice")
        if table not in created:
            raise SqlLayoutError(
                f"{path}: billing table {table} is not created by {schema.relpath} "
                f"(no CREATE TABLE tokentrack.{table}); a version names its own tables"
            )
        if _COLUMN_ARCHIVE_SUFFIX_RE.search(table):
            raise SqlLayoutError(
                f"{path}: billing table {table} ends in __<VERSION>, the name of an archive of "
                f"billing columns in {ARCHIVE_SCHEMA}; name the table otherwise"
            )
    undeclared = sorted(created - set(tables))
    if undeclared:
        raise SqlLayoutError(
            f"{path}: {schema.relpath} creates {', '.join(f'tokentrack.{t}' for t in undeclared)}"
            ", which its '-- billing-tables:' line does not name; every table of a version holds "
            "what its rollback must not drop silently, so name each one"
        )
    return tables


_CREATED_TABLE_RE: Final = re.compile(
    r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?tokentrack\.([a-z_][a-z0-9_]*)\b",
    re.IGNORECASE | re.MULTILINE,
)
# One ALTER TABLE statement of a tokentrack table, up to its semicolon (comments removed
# first), and the columns its ADD COLUMN clauses add.
_ALTER_TABLE_RE: Final = re.compile(
    r"^\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?tokentrack\.([a-z_][a-z0-9_]*)\b([^;]*)",
    re.IGNORECASE | re.MULTILINE,
)
_ADD_COLUMN_RE: Final = re.compile(
    r"\bADD\s+COLUMN\s+(?:IF\s+NOT\s+EXISTS\s+)?([a-z_][a-z0-9_]*)\b", re.IGNORECASE
)
_LINE_COMMENT_RE: Final = re.compile(r"--[^\n]*")


def _added_columns(schema: SqlFile) -> dict[str, set[str]]:
    """``{table: columns}`` that the schema file's ``ALTER TABLE tokentrack.<table> ... ADD
    COLUMN <column>`` statements add (a check by regex, as for CREATE TABLE)."""
    added: dict[str, set[str]] = {}
    for table, body in _ALTER_TABLE_RE.findall(_LINE_COMMENT_RE.sub("", schema.text)):
        added.setdefault(table.lower(), set()).update(
            c.lower() for c in _ADD_COLUMN_RE.findall(body)
        )
    return added


def _billing_columns(rollback: SqlFile, schema: SqlFile, path: Path) -> tuple[BillingColumns, ...]:
    """The columns named by the optional ``-- billing-columns:`` line of a rollback header.

    At most one such line: ``-- billing-columns: table_a(col_1, col_2); table_b(col_3)``,
    naming columns holding billing data that the version adds to tables of schema
    tokentrack it does not create itself (a table the version creates is a billing table,
    whole). Each table once, each column once, every column added by an ``ALTER TABLE
    tokentrack.<table> ... ADD COLUMN <column>`` statement of the version's schema file. The
    rollback refuses to drop their values where a row holds data in them (see
    :func:`rollback`).
    """
    found: list[str] = []
    for line in _header(rollback.text):
        if not _BILLING_COLUMNS_HEADER_RE.match(line):
            continue
        exact = _EXACT_BILLING_COLUMNS_RE.match(line)
        if exact is None:
            raise SqlLayoutError(
                f"{path}: malformed header line {line!r}, expected "
                "'-- billing-columns: table_a(column_1, column_2); table_b(column_3)' "
                "(tables of schema tokentrack and the columns this version adds to them)"
            )
        found.append(exact["groups"])
    if not found:
        return ()
    if len(found) > 1:
        raise SqlLayoutError(f"{path}: more than one '-- billing-columns:' header line")
    created = {t.lower() for t in _CREATED_TABLE_RE.findall(schema.text)}
    added = _added_columns(schema)
    groups: list[BillingColumns] = []
    for match in _GROUP_RE.finditer(found[0]):
        table, columns = match["table"], tuple(match["columns"].split(", "))
        if any(g.table == table for g in groups):
            raise SqlLayoutError(f"{path}: billing columns of table {table} are named twice")
        if table in created:
            raise SqlLayoutError(
                f"{path}: {schema.relpath} creates tokentrack.{table}: name it in "
                "'-- billing-tables:', not its columns in '-- billing-columns:'"
            )
        if len(BillingColumns(table, columns).archive_table("0" * 14)) > _MAX_IDENTIFIER:
            raise SqlLayoutError(
                f"{path}: table name {table} is too long for its archive "
                f"{ARCHIVE_SCHEMA}.{table}__<VERSION> (at most {_MAX_IDENTIFIER} characters)"
            )
        for column in columns:
            if columns.count(column) > 1:
                raise SqlLayoutError(f"{path}: billing column {table}.{column} is named twice")
            if column not in added.get(table, set()):
                raise SqlLayoutError(
                    f"{path}: billing column {table}.{column} is not added by {schema.relpath} "
                    f"(no ALTER TABLE tokentrack.{table} ... ADD COLUMN {column}); a version "
                    "names the columns it adds"
                )
        groups.append(BillingColumns(table, columns))
    return tuple(groups)


def _load(sql_dir: Path | None) -> tuple[list[MigrationVersion], list[FunctionFile]]:
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

    functions: list[FunctionFile] = []
    for path in _list_sql_files(functions_dir):
        if _FUNCTION_FILE_RE.match(path.name) is None:
            raise SqlLayoutError(
                f"{path}: bad function file name, expected <function_name>.sql in lower case"
            )
        sql_file = SqlFile.read(root, path)
        version = _function_version(path, sql_file.text)
        if version not in schemas:
            raise SqlLayoutError(
                f"{path}: header names version {version}, which has no schema file in {schema_dir}"
            )
        functions.append(FunctionFile(sql_file, version, _history(root, path, version, schemas)))
    functions.sort(key=lambda f: f.relpath)
    _check_history(root, {f.name for f in functions}, schemas)

    versions: list[MigrationVersion] = []
    for version in sorted(schemas):
        schema = SqlFile.read(root, schemas[version][1])
        rollback = SqlFile.read(root, rollbacks[version][1])
        versions.append(
            MigrationVersion(
                version=version,
                name=schemas[version][0],
                schema=schema,
                rollback=rollback,
                functions=tuple(f.file for f in functions if f.version == version),
                billing_tables=_billing_tables(rollback, schema, rollbacks[version][1]),
                billing_columns=_billing_columns(rollback, schema, rollbacks[version][1]),
            )
        )
    return versions, functions


def _history(
    root: Path, path: Path, version: str, schemas: Mapping[str, tuple[str, Path]]
) -> tuple[tuple[str, SqlFile], ...]:
    """The ``history/<V>/<name>.sql`` files of function file ``path``, oldest first."""
    found: list[tuple[str, SqlFile]] = []
    history_dir = root / "history"
    if not history_dir.is_dir():
        return ()
    for until_dir in sorted(history_dir.iterdir()):
        old = until_dir / path.name
        if not old.is_file():
            continue
        until = until_dir.name
        if until < version:
            raise SqlLayoutError(
                f"{old}: version {until} is older than version {version}, which introduces "
                f"{path.name}: there is no earlier text of it to keep"
            )
        text = SqlFile.read(root, old)
        if _function_version(old, text.text) != version:
            raise SqlLayoutError(
                f"{old}: its header must name version {version}, as {path} does (a history "
                "file is the function file as it was, byte for byte)"
            )
        found.append((until, text))
    return tuple(found)


def _check_history(root: Path, names: set[str], schemas: Mapping[str, tuple[str, Path]]) -> None:
    """Every ``history/<V>/<name>.sql``: V a known version, name a current function file."""
    history_dir = root / "history"
    if not history_dir.is_dir():
        return
    for until_dir in sorted(history_dir.iterdir()):
        if not until_dir.is_dir() or until_dir.name not in schemas:
            raise SqlLayoutError(
                f"{until_dir}: expected a directory named after a version of {root / 'schema'}"
            )
        newest = max(schemas)
        if until_dir.name >= newest:
            raise SqlLayoutError(
                f"{until_dir}: a history directory names a version that a newer one follows; "
                f"{until_dir.name} is the newest version"
            )
        for old in sorted(until_dir.iterdir()):
            if old.suffix != ".sql" or old.stem not in names:
                raise SqlLayoutError(
                    f"{old}: not a function file of {root / 'functions'} as it was at "
                    f"version {until_dir.name}"
                )


def load_versions(sql_dir: Path | None = None) -> list[MigrationVersion]:
    """Load and validate every version under ``sql_dir``, oldest first.

    Raises :class:`SqlLayoutError`, naming the offending file, for a schema file without its
    rollback or the reverse, a duplicate version, a bad file name, a function file whose
    header does not name exactly one known version, or a rollback file whose header does not
    declare its version's billing tables (``-- billing-tables: ...``, see
    :func:`_billing_tables`) or declares billing columns wrongly (``-- billing-columns:
    ...``, see :func:`_billing_columns`).
    """
    return _load(sql_dir)[0]


def load_functions(sql_dir: Path | None = None) -> list[FunctionFile]:
    """Every function file under ``sql_dir`` by path, validated as :func:`load_versions` does."""
    return _load(sql_dir)[1]


# --------------------------------------------------------------------------------------------
# Database helpers
# --------------------------------------------------------------------------------------------


async def _connect(dsn: str) -> asyncpg.Connection:
    """Connect; every failure is a :class:`ConnectionFailed` with a one-line message."""
    return await connection.connect(dsn, "tokentrack migrate", failure=ConnectionFailed)


_close = connection.close


async def _acquire_lock(conn: asyncpg.Connection, wait_notice: Notice | None) -> None:
    got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY)
    if not got:
        if wait_notice is not None:
            wait_notice(
                f"waiting for another tokentrack installer (advisory lock {ADVISORY_LOCK_KEY})..."
            )
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)


async def _release_lock(conn: asyncpg.Connection) -> None:
    if not conn.is_closed():
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)


async def _has_tables(conn: asyncpg.Connection) -> tuple[bool, bool]:
    """Whether ``schema_migrations`` and ``schema_functions`` exist."""
    row = await conn.fetchrow(
        "SELECT to_regclass('tokentrack.schema_migrations') IS NOT NULL AS versions,"
        " to_regclass('tokentrack.schema_functions') IS NOT NULL AS functions"
    )
    assert row is not None
    return bool(row["versions"]), bool(row["functions"])


class BootstrapError(ApplyError):
    """The schema or the bookkeeping tables could not be created (nothing was changed)."""


def _bootstrap_failed(exc: asyncpg.PostgresError) -> BootstrapError:
    hint = ""
    if exc.sqlstate == "42501":
        hint = "; the installing role needs CREATE on the database (see docs/INSTALL.md)"
    return BootstrapError(f"cannot create tokentrack.schema_migrations: {pg_error(exc)}{hint}")


async def _bootstrap(conn: asyncpg.Connection) -> None:
    """Create the schema and the bookkeeping tables unless they exist (needs CREATE on the db).

    Only for a database that has some of them (an older installer's, or one bootstrapped by
    ``migrate sql``): a first install bootstraps inside the transaction of its first version
    (see :func:`install`), so that a failure leaves nothing behind."""
    if all(await _has_tables(conn)):
        return
    try:
        async with conn.transaction(isolation="read_committed"):
            await conn.execute(BOOTSTRAP_SQL)
    except asyncpg.PostgresError as exc:
        raise _bootstrap_failed(exc) from exc


_CREATE_ROLE_RE: Final = re.compile(r"\bCREATE\s+ROLE\s+([a-z_][a-z0-9_]*)", re.IGNORECASE)


def _first_install_hint(version: MigrationVersion, exc: BaseException | None) -> str:
    """What to do when a version could not create its roles: the roles by name, and the
    statements an administrator runs to create them beforehand (docs/INSTALL.md)."""
    cause = exc.__cause__ if exc is not None else None
    if not (
        isinstance(cause, asyncpg.PostgresError)
        and cause.sqlstate == "42501"
        and "create role" in str(cause).lower()
    ):
        return ""
    roles = list(dict.fromkeys(_CREATE_ROLE_RE.findall(version.schema.text)))
    if not roles:
        return "; the installing role needs CREATEROLE, or the roles created beforehand"
    statements = " ".join(f"CREATE ROLE {role} NOLOGIN;" for role in roles)
    return (
        f"; version {version.version} creates the roles {' and '.join(roles)} when they are "
        "missing, which needs CREATEROLE: have an administrator create them first "
        f"({statements}) and install again (docs/INSTALL.md, Privileges)"
    )


async def _applied_rows(conn: asyncpg.Connection) -> list[AppliedRow]:
    if not (await _has_tables(conn))[0]:
        return []
    try:
        records = await conn.fetch(
            "SELECT version, name, checksum, files::text AS files, applied_at "
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
        )
        for r in records
    ]


async def _function_rows(conn: asyncpg.Connection) -> list[FunctionRow]:
    """Every row of ``schema_functions``, oldest first (none when the table does not exist)."""
    if not (await _has_tables(conn))[1]:
        return []
    try:
        records = await conn.fetch(
            "SELECT id, path, sha256, source, version, signatures::text AS signatures, applied_at "
            "FROM tokentrack.schema_functions ORDER BY id"
        )
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"cannot read tokentrack.schema_functions: {pg_error(exc)}") from exc
    return [
        FunctionRow(
            id=r["id"],
            path=r["path"],
            sha256=r["sha256"],
            source=r["source"],
            version=r["version"],
            signatures=json.loads(r["signatures"]),
            applied_at=r["applied_at"],
        )
        for r in records
    ]


async def _read_bookkeeping(dsn: str) -> tuple[list[AppliedRow], list[FunctionRow]]:
    """The rows of both bookkeeping tables (read-only); every failure is one
    :class:`ApplyError` line naming the target (e.g. a role without USAGE on the schema)."""
    conn = await _connect(dsn)
    try:
        return await _applied_rows(conn), await _function_rows(conn)
    except connection.DATABASE_ERRORS as exc:
        raise ApplyError(f"{describe_target(dsn)}: {connection.failure_line(exc)}") from exc
    finally:
        await _close(conn)


def _newest_rows(history: Sequence[FunctionRow]) -> dict[str, FunctionRow]:
    newest: dict[str, FunctionRow] = {}
    for row in history:  # oldest first: the last one per path wins
        newest[row.path] = row
    return newest


def _legacy_match(sql_file: SqlFile, recorded: str) -> bool:
    """Whether ``sql_file`` is what an older installer recorded as ``recorded``.

    Older function files said ``CREATE FUNCTION`` where they now say ``CREATE OR REPLACE
    FUNCTION``; that is the only difference accepted, and it defines the same function.
    """
    if sql_file.sha256 == recorded:
        return True
    old_text = _OR_REPLACE_RE.sub(r"CREATE \1 ", sql_file.text)
    return hashlib.sha256(old_text.encode("utf-8")).hexdigest() == recorded


def _changed_files(
    row: AppliedRow, on_disk: MigrationVersion, functions: Mapping[str, FunctionFile]
) -> list[str]:
    """Files of an applied version that differ from what was applied (edited or removed).

    Only the schema file counts. Function files are repeatable: those an older installer
    recorded in the version's row are upgraded by :func:`_seed_legacy`, never refused.
    """
    changed = [
        path
        for path, digest in row.files.items()
        if not path.startswith("functions/")
        and (path != on_disk.schema.relpath or digest != on_disk.schema.sha256)
    ]
    if on_disk.schema.relpath not in row.files or row.name != on_disk.name:
        changed.append(on_disk.schema.relpath)
    return sorted(set(changed))


def _check_applied(
    versions: Sequence[MigrationVersion],
    applied: Sequence[AppliedRow],
    sql_dir: Path,
    functions: Sequence[FunctionFile],
) -> list[MigrationVersion]:
    """Refuse drift, vanished versions and out-of-order pending ones; return the pending."""
    by_version = {v.version: v for v in versions}
    by_path = {f.relpath: f for f in functions}
    missing = [row for row in applied if row.version not in by_version]
    if missing:
        names = ", ".join(f"{row.version}_{row.name}" for row in missing)
        raise DriftError(
            f"applied version(s) {names} not found in {sql_dir}; refusing to install from a "
            "SQL directory that does not contain what the database has"
        )
    edited: list[str] = []
    for row in applied:
        edited += _changed_files(row, by_version[row.version], by_path)
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


# What the database holds for the routines of one name, as a file would say it: each
# definition (pg_get_functiondef), its EXECUTE grants and its comment, so that executing it
# again (a rollback's restore) brings back exactly that routine, also after a drop.
_DEFINITION_OF_NAME_SQL: Final = """
SELECT pg_catalog.string_agg(
    pg_catalog.pg_get_functiondef(p.oid) || E';\n'
    || CASE WHEN p.proacl IS NULL THEN '' ELSE pg_catalog.format(
        E'REVOKE ALL ON %s %s FROM PUBLIC;\n', k.kind, p.oid::pg_catalog.regprocedure) END
    || coalesce((
        SELECT pg_catalog.string_agg(pg_catalog.format(
            E'GRANT EXECUTE ON %s %s TO %s;\n', k.kind, p.oid::pg_catalog.regprocedure,
            CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                 ELSE pg_catalog.quote_ident(a.grantee::pg_catalog.regrole::text) END),
            '' ORDER BY a.grantee)
        FROM pg_catalog.aclexplode(p.proacl) AS a
        WHERE a.grantee <> p.proowner AND a.privilege_type = 'EXECUTE'), '')
    || coalesce(pg_catalog.format(E'COMMENT ON %s %s IS %L;\n', k.kind,
        p.oid::pg_catalog.regprocedure, pg_catalog.obj_description(p.oid, 'pg_proc')), ''),
    E'\n' ORDER BY p.oid::pg_catalog.regprocedure::text)
FROM pg_catalog.pg_proc AS p
CROSS JOIN LATERAL (
    SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END AS kind) AS k
WHERE p.pronamespace = 'tokentrack'::pg_catalog.regnamespace AND p.proname = $1
"""

_SIGNATURES_OF_NAME_SQL: Final = (
    "SELECT coalesce(pg_catalog.jsonb_object_agg(p.oid::pg_catalog.regprocedure::text,"
    " pg_catalog.md5(pg_catalog.pg_get_functiondef(p.oid))), '{}'::jsonb)::text"
    " FROM pg_catalog.pg_proc AS p"
    " WHERE p.pronamespace = 'tokentrack'::pg_catalog.regnamespace AND p.proname = $1"
)


async def _seed_legacy(
    conn: asyncpg.Connection,
    applied: Sequence[AppliedRow],
    versions: Sequence[MigrationVersion],
    functions: Sequence[FunctionFile],
) -> tuple[str, ...]:
    """Upgrade the bookkeeping of a database installed by an older installer, in place.

    That installer applied each function file with the version its header names and put its
    sha256 in the version's ``files``. Every such file gets its first ``schema_functions`` row
    with that version and the recorded sha256, and the version row keeps only its schema file.
    The row's text is the file on disk when it is the one that was applied (see
    :func:`_legacy_match`); otherwise (the file changed since, or is gone: a newer release)
    it is what the database holds for that routine (definition, grants, comment), so that the
    plan then applies the file as changed or drops it as removed, and a rollback restores the
    routine exactly as it was. One transaction; returns the files recorded.
    """
    legacy = [row for row in applied if row.legacy_functions]
    if not legacy:
        return ()
    by_version = {v.version: v for v in versions}
    by_path = {f.relpath: f for f in functions}
    seeded: list[str] = []
    current = "tokentrack.schema_functions"
    try:
        async with conn.transaction(isolation="read_committed"):
            await conn.execute(_PIN_SEARCH_PATH)
            for row in legacy:
                for path, digest in sorted(row.legacy_functions.items()):
                    current = path
                    disk = by_path.get(path)
                    signatures = await conn.fetchval(_SIGNATURES_OF_NAME_SQL, Path(path).stem)
                    if disk is not None and _legacy_match(disk.file, digest):
                        sha, source = disk.file.sha256, disk.file.text
                    else:
                        source = await conn.fetchval(_DEFINITION_OF_NAME_SQL, Path(path).stem)
                        if source is None:  # nothing of that name left to restore
                            continue
                        sha = digest
                    await conn.execute(
                        "INSERT INTO tokentrack.schema_functions"
                        " (path, sha256, source, version, signatures)"
                        " VALUES ($1, $2, $3, $4, $5::jsonb)",
                        path,
                        sha,
                        source,
                        row.version,
                        signatures,
                    )
                    seeded.append(path)
                version = by_version[row.version]
                current = "tokentrack.schema_migrations"
                await conn.execute(
                    "UPDATE tokentrack.schema_migrations SET files = $2::jsonb, checksum = $3"
                    " WHERE version = $1",
                    row.version,
                    json.dumps(version.file_checksums, sort_keys=True),
                    version.checksum,
                )
    except asyncpg.PostgresError as exc:
        raise ApplyError(
            f"recording the function history of an older installation failed in {current}: "
            f"{pg_error(exc)} (nothing was changed)"
        ) from exc
    return tuple(seeded)


def _plan(
    functions: Sequence[FunctionFile],
    applied: Sequence[AppliedRow],
    history: Sequence[FunctionRow],
    pending: Sequence[MigrationVersion],
) -> InstallPlan:
    """The pending versions and every function file that differs from its newest row."""
    current = (applied[-1].version, applied[-1].name) if applied else None
    after = pending[-1].version if pending else (current[0] if current else None)
    if after is None:  # pragma: no cover - the loader refuses a directory without versions
        return InstallPlan((), (), current)
    newest = _newest_rows(history)
    on_disk = {f.relpath for f in functions}
    changes: list[FunctionChange] = []
    # Each pending version gets the text the file had while that version was the newest (its
    # history file, else the current file), in order, so that the rollback of any of them
    # restores the text before it, also after a fresh install of several versions at once.
    steps = [v.version for v in pending] or [after]
    for fn in functions:
        if fn.version > after:
            continue
        last = newest.get(fn.relpath)
        recorded = last.sha256 if last is not None and last.source is not None else None
        for step in steps:
            if step < fn.version:
                continue
            text = fn.text_at(step) if pending else fn.file
            if text.sha256 == recorded:
                continue
            if last is None and recorded is None:
                # First application: the row belongs to the version that introduces the
                # function, not to the last one of this run, so that rolling back version 2
                # of a fresh install of versions 1 and 2 keeps version 1's functions.
                changes.append(FunctionChange(fn.relpath, "new", fn.version, text))
            else:
                # A history text belongs to the version it became current in; the current
                # text too when the file has history (its change is dated), else to the
                # newest version of the run.
                owner = step if fn.history else after
                if recorded is None:
                    changes.append(FunctionChange(fn.relpath, "new", owner, text))
                else:
                    previous = last.defined if last is not None else frozenset()
                    changes.append(FunctionChange(fn.relpath, "changed", owner, text, previous))
            recorded = text.sha256
    for path, last in sorted(newest.items()):
        if path not in on_disk and last.source is not None:
            changes.append(FunctionChange(path, "removed", after, None, last.defined))
    changes.sort(key=lambda c: c.path)
    return InstallPlan(tuple(pending), tuple(changes), current)


def _dollar_quote(text: str, base: str) -> str:
    """``text`` as a dollar-quoted literal whose delimiter does not occur in it."""
    tag, n = base, 0
    while f"${tag}$" in text:
        n += 1
        tag = f"{base}_{n}"
    return f"${tag}${text}${tag}$"


def _quote_literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    return "'" + value.replace("'", "''") + "'"


def _record_sql(change: FunctionChange) -> str:
    """SQL that finishes applying ``change`` after its file ran, in the same transaction.

    It refuses a change already recorded (so the printed SQL cannot be applied twice) and a
    file that defines no routine of its name, drops the signatures recorded before that the
    file no longer defines (found as the routines of that name that this transaction did not
    write: ``pg_proc.xmin``), and appends the ``schema_functions`` row.
    """
    path, name = _quote_literal(change.path), _quote_literal(change.name)
    sha = _quote_literal(change.file.sha256 if change.file else None)
    written = (
        "p.pronamespace = 'tokentrack'::pg_catalog.regnamespace"
        f" AND p.proname = {name}"
        " AND p.xmin = pg_catalog.pg_current_xact_id()::xid"
    )
    if change.file is None:
        written = "false"
    check_defined = ""
    if change.file is not None:
        message = _quote_literal(
            f"{change.path} defines no routine tokentrack.{change.name}: a function file must "
            "be named after the function it defines"
        )
        check_defined = (
            f"    IF NOT EXISTS (SELECT FROM pg_catalog.pg_proc AS p WHERE {written}) THEN\n"
            "        RAISE EXCEPTION USING ERRCODE = 'invalid_function_definition',\n"
            f"            MESSAGE = {message};\n"
            "    END IF;\n"
        )
    already = _quote_literal(f"tokentrack function file {change.path} is already recorded")
    source = "NULL" if change.file is None else _dollar_quote(change.file.text, "tokentrack_source")
    return (
        "DO $tokentrack_record$\n"
        "DECLARE\n"
        "    v_found boolean;\n"
        "    v_sha text;\n"
        "    v_previous jsonb;\n"
        "    v_signature text;\n"
        "BEGIN\n"
        "    SELECT true, f.sha256, CASE WHEN f.source IS NULL THEN '{}'::jsonb"
        " ELSE f.signatures END\n"
        "    INTO v_found, v_sha, v_previous\n"
        f"    FROM tokentrack.schema_functions AS f WHERE f.path = {path}\n"
        "    ORDER BY f.id DESC LIMIT 1;\n"
        f"    IF v_found AND v_sha IS NOT DISTINCT FROM {sha} THEN\n"
        "        RAISE EXCEPTION USING ERRCODE = 'unique_violation',\n"
        f"            MESSAGE = {already};\n"
        "    END IF;\n"
        f"{check_defined}"
        "    FOR v_signature IN\n"
        "        SELECT pg_catalog.jsonb_object_keys(coalesce(v_previous, '{}'::jsonb))\n"
        "        EXCEPT\n"
        "        SELECT p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc AS p\n"
        f"        WHERE {written}\n"
        "    LOOP\n"
        "        EXECUTE pg_catalog.format('DROP ROUTINE IF EXISTS %s', v_signature);\n"
        "    END LOOP;\n"
        "END\n"
        "$tokentrack_record$;\n"
        "INSERT INTO tokentrack.schema_functions (path, sha256, source, version, signatures)\n"
        f"SELECT {path}, {sha}, {source}, {_quote_literal(change.version)},\n"
        "    coalesce(pg_catalog.jsonb_object_agg(p.oid::pg_catalog.regprocedure::text,\n"
        "        pg_catalog.md5(pg_catalog.pg_get_functiondef(p.oid))), '{}'::jsonb)\n"
        f"FROM pg_catalog.pg_proc AS p WHERE {written};"
    )


def _restore_sql(version: MigrationVersion) -> str:
    """SQL that runs right after ``version``'s schema file, in its transaction.

    It checks that every billing table the rollback file declares exists, then moves back
    the rows a ``rollback --archive`` of this version kept in :data:`ARCHIVE_SCHEMA`: table by
    table in declaration order (the tables each one references first), every column by name,
    identity values included (``OVERRIDING SYSTEM VALUE``, then the identity sequence is set
    past them), and drops the archive table; the archive schema goes when it is empty. The
    rows are never in both places: the restore and the version commit together or not at
    all, so a restore cannot be applied twice.

    For billing columns (:class:`BillingColumns`) it checks that the schema file added every
    declared column, then writes the archived values back by primary key (``UPDATE ... FROM
    ARCHIVE_SCHEMA.<table>__<version>``) and drops that archive table. The table is locked
    ACCESS EXCLUSIVE first, and its enabled user triggers (``report_step_usage``'s
    immutable-billed-steps trigger refuses any UPDATE of a billed row) are disabled around
    the UPDATE and enabled again as they were (``ENABLE``, ``ENABLE ALWAYS`` or ``ENABLE
    REPLICA``), in the same transaction: only the table's owner can, and no other session
    ever sees them disabled. An archived row whose key is no longer in the table is refused,
    not dropped. Empty string for a version without billing tables or columns.
    """
    if not (version.billing_tables or version.billing_columns):
        return ""
    foreign_schema = _quote_literal(_FOREIGN_ARCHIVE.format(ARCHIVE_SCHEMA, "%s", "%s"))
    foreign_table = _quote_literal(
        _FOREIGN_ARCHIVE_TABLE.format(f"{ARCHIVE_SCHEMA}.%s", "%s", "%s", "%s")
    )
    stray = _quote_literal(_STRAY_ARCHIVE.format(f"{ARCHIVE_SCHEMA}.%s", "%s", version.version))
    out = [
        "DO $tokentrack_restore$\n"
        "DECLARE\n"
        "    v_table text;\n"
        "    v_live pg_catalog.regclass;\n"
        "    v_columns text;\n"
        "    v_identity text;\n"
        "    v_owner pg_catalog.oid;\n"
        "    v_archive pg_catalog.oid;\n"
        "    v_archive_owner pg_catalog.oid;\n"
        '    v_kind "char";\n'
        "    v_relowner pg_catalog.oid;\n"
        "    v_stray bigint;\n"
        + (
            "    v_missing text;\n"
            "    v_set text;\n"
            "    v_match text;\n"
            "    v_archived bigint;\n"
            "    v_updated bigint;\n"
            "    v_triggers text[];\n"
            "    v_modes text[];\n"
            if version.billing_columns
            else ""
        )
        + "BEGIN\n"
        "    -- Only an archive of the owner of schema tokentrack is read, checked in the catalog\n"
        "    -- before any select from it (a view or another role's table could run its code).\n"
        "    SELECT n.nspowner INTO v_owner FROM pg_catalog.pg_namespace AS n\n"
        "    WHERE n.nspname = 'tokentrack';\n"
        "    SELECT n.oid, n.nspowner INTO v_archive, v_archive_owner\n"
        f"    FROM pg_catalog.pg_namespace AS n WHERE n.nspname = '{ARCHIVE_SCHEMA}';\n"
        "    IF v_archive IS NOT NULL AND v_archive_owner IS DISTINCT FROM v_owner THEN\n"
        "        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',\n"
        f"            MESSAGE = pg_catalog.format({foreign_schema},\n"
        "                v_archive_owner::pg_catalog.regrole, v_owner::pg_catalog.regrole);\n"
        "    END IF;\n"
    ]
    if version.billing_tables:
        out.append(_restore_tables_sql(version, foreign_table, stray))
    for group in version.billing_columns:
        out.append(_restore_columns_sql(version, group, foreign_table, stray))
    out.append(
        f"    IF pg_catalog.to_regnamespace('{ARCHIVE_SCHEMA}') IS NOT NULL AND NOT EXISTS (\n"
        "        SELECT FROM pg_catalog.pg_class AS c\n"
        f"        WHERE c.relnamespace = pg_catalog.to_regnamespace('{ARCHIVE_SCHEMA}')\n"
        "    ) THEN\n"
        "        BEGIN\n"
        f"            DROP SCHEMA {ARCHIVE_SCHEMA};\n"
        "        EXCEPTION WHEN dependent_objects_still_exist THEN\n"
        "            NULL;  -- something else of the operator's lives there: keep the schema\n"
        "        END;\n"
        "    END IF;\n"
        "END\n"
        "$tokentrack_restore$;"
    )
    return "".join(out)


def _restore_tables_sql(version: MigrationVersion, foreign_table: str, stray: str) -> str:
    """The part of :func:`_restore_sql` that moves back whole billing tables."""
    tables = ", ".join(_quote_literal(t) for t in version.billing_tables)
    missing = _quote_literal(
        f"version {version.label} declares the billing table tokentrack.%s in its rollback "
        "file, but its schema file did not create it"
    )
    return (
        f"    FOREACH v_table IN ARRAY ARRAY[{tables}]::text[] LOOP\n"
        "        v_live := pg_catalog.to_regclass(pg_catalog.format('tokentrack.%I', v_table));\n"
        "        IF v_live IS NULL THEN\n"
        "            RAISE EXCEPTION USING ERRCODE = 'undefined_table',\n"
        f"                MESSAGE = pg_catalog.format({missing}, v_table);\n"
        "        END IF;\n"
        "        CONTINUE WHEN v_archive IS NULL;\n"
        "        SELECT c.relkind, c.relowner INTO v_kind, v_relowner\n"
        "        FROM pg_catalog.pg_class AS c\n"
        "        WHERE c.relnamespace = v_archive AND c.relname = v_table;\n"
        "        CONTINUE WHEN NOT FOUND;\n"
        "        IF v_kind <> 'r' OR v_relowner IS DISTINCT FROM v_owner THEN\n"
        "            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',\n"
        f"                MESSAGE = pg_catalog.format({foreign_table}, v_table, v_kind,\n"
        "                    v_relowner::pg_catalog.regrole, v_owner::pg_catalog.regrole);\n"
        "        END IF;\n"
        "        EXECUTE pg_catalog.format(\n"
        f"            'SELECT pg_catalog.count(*) FROM {ARCHIVE_SCHEMA}.%I"
        " WHERE archived_version IS DISTINCT FROM %L',\n"
        f"            v_table, {_quote_literal(version.version)}) INTO v_stray;\n"
        "        IF v_stray > 0 THEN\n"
        "            RAISE EXCEPTION USING ERRCODE = 'data_exception',\n"
        f"                MESSAGE = pg_catalog.format({stray}, v_table, v_stray);\n"
        "        END IF;\n"
        "        SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', '"
        " ORDER BY a.attnum)\n"
        "        INTO v_columns FROM pg_catalog.pg_attribute AS a\n"
        "        WHERE a.attrelid = v_live AND a.attnum > 0 AND NOT a.attisdropped"
        " AND a.attgenerated = '';\n"
        "        EXECUTE pg_catalog.format(\n"
        "            'INSERT INTO tokentrack.%I (%s) OVERRIDING SYSTEM VALUE"
        f" SELECT %s FROM {ARCHIVE_SCHEMA}.%I',\n"
        "            v_table, v_columns, v_columns, v_table);\n"
        "        FOR v_identity IN\n"
        "            SELECT a.attname FROM pg_catalog.pg_attribute AS a\n"
        "            WHERE a.attrelid = v_live AND a.attidentity <> '' AND NOT a.attisdropped\n"
        "        LOOP\n"
        "            EXECUTE pg_catalog.format(\n"
        "                'SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence(%L, %L),"
        " m.v) FROM (SELECT pg_catalog.max(%I) AS v FROM tokentrack.%I) AS m"
        " WHERE m.v IS NOT NULL',\n"
        "                v_live::text, v_identity, v_identity, v_table);\n"
        "        END LOOP;\n"
        f"        EXECUTE pg_catalog.format('DROP TABLE {ARCHIVE_SCHEMA}.%I', v_table);\n"
        "    END LOOP;\n"
    )


def _restore_columns_sql(
    version: MigrationVersion, group: BillingColumns, foreign_table: str, stray: str
) -> str:
    """The part of :func:`_restore_sql` that writes back one table's billing columns."""
    table, archive = group.table, group.archive_table(version.version)
    columns = ", ".join(_quote_literal(c) for c in group.columns)
    no_table = _quote_literal(
        f"version {version.label} declares billing columns of tokentrack.{table} in its "
        "rollback file, but that table does not exist"
    )
    no_column = _quote_literal(
        f"version {version.label} declares the billing column(s) %s of tokentrack.{table} in "
        "its rollback file, but its schema file did not add them"
    )
    no_key = _quote_literal(
        f"cannot restore {ARCHIVE_SCHEMA}.{archive}: tokentrack.{table} has no primary key, "
        f"or the archive holds none of the columns {', '.join(group.columns)}"
    )
    gone = _quote_literal(
        f"{ARCHIVE_SCHEMA}.{archive} holds %s archived row(s) whose primary key is no longer in "
        f"tokentrack.{table}: refusing to drop their values (export them, delete them from the "
        "archive and install again)"
    )
    return (
        f"    -- billing columns of tokentrack.{table}, from {ARCHIVE_SCHEMA}.{archive}\n"
        f"    v_live := pg_catalog.to_regclass('tokentrack.{table}');\n"
        "    IF v_live IS NULL THEN\n"
        "        RAISE EXCEPTION USING ERRCODE = 'undefined_table', MESSAGE = "
        f"{no_table};\n"
        "    END IF;\n"
        "    SELECT pg_catalog.string_agg(d.name, ', ' ORDER BY d.n) INTO v_missing\n"
        f"    FROM pg_catalog.unnest(ARRAY[{columns}]::text[]) WITH ORDINALITY AS d (name, n)\n"
        "    WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute AS a WHERE a.attrelid = v_live\n"
        "        AND a.attname OPERATOR(pg_catalog.=) d.name AND a.attnum > 0"
        " AND NOT a.attisdropped);\n"
        "    IF v_missing IS NOT NULL THEN\n"
        "        RAISE EXCEPTION USING ERRCODE = 'undefined_column',\n"
        f"            MESSAGE = pg_catalog.format({no_column}, v_missing);\n"
        "    END IF;\n"
        "    IF v_archive IS NOT NULL THEN\n"
        "        SELECT c.relkind, c.relowner INTO v_kind, v_relowner\n"
        "        FROM pg_catalog.pg_class AS c\n"
        f"        WHERE c.relnamespace = v_archive AND c.relname = '{archive}';\n"
        "        IF FOUND THEN\n"
        "            IF v_kind <> 'r' OR v_relowner IS DISTINCT FROM v_owner THEN\n"
        "                RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',\n"
        f"                    MESSAGE = pg_catalog.format({foreign_table}, '{archive}', v_kind,\n"
        "                        v_relowner::pg_catalog.regrole, v_owner::pg_catalog.regrole);\n"
        "            END IF;\n"
        f"            SELECT pg_catalog.count(*) INTO v_stray FROM {ARCHIVE_SCHEMA}.{archive}\n"
        "            WHERE archived_version IS DISTINCT FROM "
        f"{_quote_literal(version.version)};\n"
        "            IF v_stray > 0 THEN\n"
        "                RAISE EXCEPTION USING ERRCODE = 'data_exception',\n"
        f"                    MESSAGE = pg_catalog.format({stray}, '{archive}', v_stray);\n"
        "            END IF;\n"
        "            -- What goes back: the declared columns the archive holds, matched on the\n"
        "            -- table's primary key.\n"
        "            SELECT pg_catalog.string_agg(pg_catalog.format('%I = a.%I', a.attname,"
        " a.attname), ', ' ORDER BY a.attnum)\n"
        "            INTO v_set FROM pg_catalog.pg_attribute AS a\n"
        f"            WHERE a.attrelid = '{ARCHIVE_SCHEMA}.{archive}'::pg_catalog.regclass\n"
        f"            AND a.attname OPERATOR(pg_catalog.=) ANY (ARRAY[{columns}]::text[])\n"
        "            AND a.attnum > 0 AND NOT a.attisdropped;\n"
        "            SELECT pg_catalog.string_agg(pg_catalog.format('t.%I = a.%I', a.attname,"
        " a.attname), ' AND ' ORDER BY a.attnum)\n"
        "            INTO v_match FROM pg_catalog.pg_index AS i\n"
        "            JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid\n"
        "                AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey)\n"
        "            WHERE i.indrelid = v_live AND i.indisprimary;\n"
        "            IF v_set IS NULL OR v_match IS NULL THEN\n"
        "                RAISE EXCEPTION USING ERRCODE = 'data_exception', MESSAGE = "
        f"{no_key};\n"
        "            END IF;\n"
        f"            SELECT pg_catalog.count(*) INTO v_archived FROM {ARCHIVE_SCHEMA}.{archive};\n"
        "            -- Nobody sees the table between the triggers going off and coming back.\n"
        f"            LOCK TABLE tokentrack.{table} IN ACCESS EXCLUSIVE MODE;\n"
        "            SELECT coalesce(pg_catalog.array_agg(g.tgname::text ORDER BY g.tgname),"
        " '{}'),\n"
        "                coalesce(pg_catalog.array_agg(g.tgenabled::text ORDER BY g.tgname),"
        " '{}')\n"
        "            INTO v_triggers, v_modes FROM pg_catalog.pg_trigger AS g\n"
        "            WHERE g.tgrelid = v_live AND NOT g.tgisinternal AND g.tgenabled <> 'D';\n"
        "            FOR i IN 1 .. coalesce(pg_catalog.array_length(v_triggers, 1), 0) LOOP\n"
        "                EXECUTE pg_catalog.format(\n"
        f"                    'ALTER TABLE tokentrack.{table} DISABLE TRIGGER %I',"
        " v_triggers[i]);\n"
        "            END LOOP;\n"
        "            EXECUTE pg_catalog.format(\n"
        f"                'UPDATE tokentrack.{table} AS t SET %s FROM {ARCHIVE_SCHEMA}.{archive}"
        " AS a WHERE %s',\n"
        "                v_set, v_match);\n"
        "            GET DIAGNOSTICS v_updated = ROW_COUNT;\n"
        "            IF v_updated <> v_archived THEN\n"
        "                RAISE EXCEPTION USING ERRCODE = 'data_exception',\n"
        f"                    MESSAGE = pg_catalog.format({gone}, v_archived - v_updated);\n"
        "            END IF;\n"
        "            FOR i IN 1 .. coalesce(pg_catalog.array_length(v_triggers, 1), 0) LOOP\n"
        "                EXECUTE pg_catalog.format(\n"
        f"                    'ALTER TABLE tokentrack.{table} ENABLE %s TRIGGER %I',\n"
        "                    CASE v_modes[i] WHEN 'A' THEN 'ALWAYS' WHEN 'R' THEN 'REPLICA'"
        " ELSE '' END,\n"
        "                    v_triggers[i]);\n"
        "            END LOOP;\n"
        f"            DROP TABLE {ARCHIVE_SCHEMA}.{archive};\n"
        "        END IF;\n"
        "    END IF;\n"
    )


_FOREIGN_ARCHIVE: Final = (
    "schema {} belongs to role {}, not to {}, the owner of schema tokentrack: refusing to "
    "read archived billing rows from it"
)
_FOREIGN_ARCHIVE_TABLE: Final = (
    "{} is a relation of kind '{}' owned by role {}, not an ordinary table (kind 'r') owned "
    "by {}, the owner of schema tokentrack: refusing to read archived billing rows from it"
)
_STRAY_ARCHIVE: Final = "{} holds {} row(s) not archived from version {}: refusing to restore it"


async def _archived(
    conn: asyncpg.Connection,
    version: MigrationVersion,
    *,
    restoring: bool = True,
) -> list[TableRows]:
    """The rows :data:`ARCHIVE_SCHEMA` holds for ``version``'s billing tables and billing
    columns (``<table>__<version>``; :attr:`TableRows.columns` set) (read-only).

    Raises :class:`ApplyError` (:class:`RollbackRefused` unless ``restoring``) before
    selecting from anything when the catalog shows an archive that is not the owner's: the
    schema, or one of its tables, owned by a role other than the owner of schema tokentrack
    (the installing role when there is none yet), or a relation that is not an ordinary table
    (a view or a foreign table runs someone else's code); when ``restoring``, also when a
    table holds rows archived from another version.
    """
    refused: type[MigrationError] = ApplyError if restoring else RollbackRefused
    if not (version.billing_tables or version.billing_columns):
        return []
    schema = await conn.fetchrow(
        "SELECT a.oid, a.nspowner::regrole::text AS owner, e.owner::regrole::text AS expected"
        " FROM pg_namespace AS a, (SELECT coalesce((SELECT t.nspowner FROM pg_namespace AS t"
        " WHERE t.nspname = 'tokentrack'), (SELECT r.oid FROM pg_roles AS r"
        " WHERE r.rolname = current_user)) AS owner) AS e WHERE a.nspname = $1",
        ARCHIVE_SCHEMA,
    )
    if schema is None:
        return []
    if schema["owner"] != schema["expected"]:
        raise refused(_FOREIGN_ARCHIVE.format(ARCHIVE_SCHEMA, schema["owner"], schema["expected"]))
    found: list[TableRows] = []
    archives = [(t, t, ()) for t in version.billing_tables] + [
        (g.table, g.archive_table(version.version), g.columns) for g in version.billing_columns
    ]
    for table, archive, declared in archives:
        name = f"{ARCHIVE_SCHEMA}.{archive}"
        rel = await conn.fetchrow(
            "SELECT c.oid, c.relkind::text, c.relowner::regrole::text AS owner FROM pg_class AS c"
            " WHERE c.relnamespace = $1 AND c.relname = $2",
            schema["oid"],
            archive,
        )
        if rel is None:
            continue
        if rel["relkind"] != "r" or rel["owner"] != schema["expected"]:
            raise refused(
                _FOREIGN_ARCHIVE_TABLE.format(
                    name, rel["relkind"], rel["owner"], schema["expected"]
                )
            )
        rows = await conn.fetchval(f"SELECT count(*) FROM {name}")
        if restoring and rows:
            stray = await conn.fetchval(
                f"SELECT count(*) FROM {name} WHERE archived_version IS DISTINCT FROM $1",
                version.version,
            )
            if stray:
                raise refused(_STRAY_ARCHIVE.format(name, stray, version.version))
        columns: tuple[str, ...] = ()
        if declared:  # the declared columns the archive holds, in declaration order
            kept = {
                r["attname"]
                for r in await conn.fetch(
                    "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0"
                    " AND NOT attisdropped",
                    rel["oid"],
                )
            }
            columns = tuple(c for c in declared if c in kept) or declared
        found.append(TableRows(version.version, table, int(rows), columns))
    return found


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


async def install(
    dsn: str,
    *,
    sql_dir: Path | None = None,
    wait_notice: Notice | None = None,
) -> InstallResult:
    """Apply every pending version and every changed function file; return what was done.

    Takes the advisory lock :data:`ADVISORY_LOCK_KEY` (calling ``wait_notice`` once when
    another installer holds it), bootstraps the bookkeeping tables (on a first install, in the
    transaction of the first version, so that its failure leaves nothing), refuses drift
    (naming every edited schema file), applied versions missing on disk and pending versions
    older than the newest applied one, records the function history of a database installed
    by an older installer, then applies the pending versions in order, each in its own
    transaction; the function files whose sha256 differs from their newest
    ``schema_functions`` row go into the transaction of the last pending version, or into one
    of their own.
    Raises :class:`MigrationError`; an :class:`ApplyError` carries in ``result`` what was
    applied before the failure.
    """
    root = (sql_dir or default_sql_dir()).resolve()
    versions, functions = _load(root)
    conn = await _connect(dsn)
    try:
        await _acquire_lock(conn, wait_notice)
        try:
            # A first install (no schema_migrations yet) bootstraps in the transaction of its
            # first version: when that version fails, the schema and the bookkeeping tables
            # go with it and the database is left as it was found.
            first = not (await _has_tables(conn))[0]
            if not first:
                await _bootstrap(conn)
            applied = await _applied_rows(conn)
            pending = _check_applied(versions, applied, root, functions)
            seeded = await _seed_legacy(conn, applied, versions, functions)
            if seeded:
                applied = await _applied_rows(conn)
            plan = _plan(functions, applied, await _function_rows(conn), pending)
            return await _execute_plan(conn, plan, seeded, bootstrap=first)
        finally:
            await _release_lock(conn)
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"{describe_target(dsn)}: {pg_error(exc)}") from exc
    except (asyncpg.InterfaceError, OSError) as exc:
        raise ApplyError(f"lost the connection to {describe_target(dsn)}: {exc}") from exc
    finally:
        await _close(conn)


async def _execute_plan(
    conn: asyncpg.Connection,
    plan: InstallPlan,
    seeded: tuple[str, ...],
    *,
    bootstrap: bool = False,
) -> InstallResult:
    """Apply ``plan``; with ``bootstrap`` (a first install) the bootstrap goes into the
    transaction of the first version."""
    current = plan.current
    done: list[MigrationVersion] = []
    functions: tuple[AppliedFunction, ...] = ()
    restored: list[TableRows] = []
    # Counted before the versions' transactions: only a migrator holding the advisory lock,
    # as this one does, writes or empties the archive. An archive that is not the owner's is
    # refused here, before anything is applied.
    try:
        archives = [await _archived(conn, version) for version in plan.versions]
    except ApplyError as exc:
        exc.result = InstallResult((), (), seeded, current)
        exc.args = (f"{exc.args[0]}; nothing was changed",)
        raise
    for i, version in enumerate(plan.versions):
        with_functions = plan.functions if i == len(plan.versions) - 1 else ()
        archived = archives[i]
        try:
            functions = await _apply(conn, version, with_functions, bootstrap=bootstrap and i == 0)
        except BootstrapError as exc:
            exc.result = InstallResult((), (), seeded, current)
            exc.args = (f"{exc.args[0]}; nothing was changed",)
            raise
        except ApplyError as exc:
            exc.result = InstallResult(tuple(done), (), seeded, current)
            if bootstrap and i == 0:
                hint = _first_install_hint(version, exc)
                exc.args = (
                    f"{exc.args[0]}{hint}; nothing was installed (version {version.version}, "
                    "the tokentrack schema and its bookkeeping tables were rolled back)",
                )
                raise
            kept = (
                f"; already applied in this run: {', '.join(v.version for v in done)}"
                if done
                else ""
            )
            exc.args = (f"{exc.args[0]}; version {version.version} was rolled back{kept}",)
            raise
        done.append(version)
        restored += archived
        current = (version.version, version.name)
    if not plan.versions and plan.functions:
        try:
            functions = await _apply(conn, None, plan.functions)
        except ApplyError as exc:
            exc.result = InstallResult((), (), seeded, current)
            exc.args = (f"{exc.args[0]}; nothing was changed",)
            raise
    return InstallResult(tuple(done), functions, seeded, current, tuple(restored))


async def _apply(
    conn: asyncpg.Connection,
    version: MigrationVersion | None,
    changes: Sequence[FunctionChange],
    *,
    bootstrap: bool = False,
) -> tuple[AppliedFunction, ...]:
    """One transaction: the bootstrap (a first install), ``version``'s schema file, the
    function changes, the version row."""
    what = f"applying version {version.label}" if version else "applying function files"
    current = version.schema.relpath if version else ""
    applied: list[AppliedFunction] = []
    try:
        async with conn.transaction(isolation="read_committed"):
            if bootstrap:
                try:
                    await conn.execute(BOOTSTRAP_SQL)
                except asyncpg.PostgresError as exc:
                    raise _bootstrap_failed(exc) from exc
            if version is not None:
                await conn.execute(version.schema.text)
                if version.billing_tables or version.billing_columns:
                    current = f"{version.schema.relpath} (restoring {ARCHIVE_SCHEMA})"
                    await conn.execute(_restore_sql(version))
            if changes:
                await conn.execute(_PIN_SEARCH_PATH)
            for change in changes:
                current = change.path
                if change.file is not None:
                    await conn.execute(change.file.text)
                current = f"tokentrack.schema_functions ({change.path})"
                await conn.execute(_record_sql(change))
                defined = json.loads(
                    await conn.fetchval(
                        "SELECT signatures::text FROM tokentrack.schema_functions"
                        " WHERE path = $1 ORDER BY id DESC LIMIT 1",
                        change.path,
                    )
                )
                applied.append(
                    AppliedFunction(
                        path=change.path,
                        kind=change.kind,
                        version=change.version,
                        signatures=tuple(sorted(defined)),
                        dropped=tuple(sorted(change.previous - set(defined))),
                    )
                )
            if version is not None:
                current = "tokentrack.schema_migrations"
                await conn.execute(
                    _INSERT_VERSION_SQL,
                    version.version,
                    version.name,
                    version.checksum,
                    json.dumps(version.file_checksums, sort_keys=True),
                )
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"{what} failed in {current}: {pg_error(exc)}") from exc
    return tuple(applied)


async def rollback(
    dsn: str,
    *,
    steps: int = 1,
    to: str | None = None,
    sql_dir: Path | None = None,
    wait_notice: Notice | None = None,
    archive: bool = False,
) -> RollbackResult:
    """Roll back the newest ``steps`` applied versions, newest first; return what was done.

    ``to`` (instead of ``steps``) rolls back every applied version newer than the applied
    version ``to``, which stays: ``to=V1`` goes back to version 1 however many versions came
    after it (what a runbook wants to say). ``to`` must be an applied version.

    Each version V is undone in one transaction: the functions V introduced (and signatures
    that its changes added) are dropped, V's rollback file runs, V's ``schema_functions``
    rows are deleted, the newest remaining recorded text of every function that had rows
    under V is executed again (byte for byte what was applied before), and V's
    ``schema_migrations`` row is deleted. With nothing applied it does nothing.

    Billing data is never dropped silently (the contract's "Rollback safety"). The tables a
    version's rollback file declares (``-- billing-tables:``) are locked first (ACCESS
    EXCLUSIVE, in declaration order); when any of them holds a row:

    * without ``archive``: :class:`RollbackRefused`, naming the rows per table and the
      recorded steps not billed yet. The check runs for every target version before
      anything is changed, and again under the lock in each version's transaction;
    * with ``archive``: in V's transaction, before anything is dropped, every active
      reservation is billed exactly as the sweep bills it (``finalize_reservation(id,
      'expired')`` under its row lock, reservations locked first, finalized in (period_id,
      id) order: the global lock order reservation, period, report, steps), then every
      declared table's rows are copied into ``tokentrack_archive.<table>`` (with
      ``archived_at`` and ``archived_version``), then the rollback runs as above. The next
      install of V moves the rows back (see :func:`_restore_sql`). An archive table that
      already exists (an earlier archive not restored) is refused, never appended to.

    Billing columns (``-- billing-columns:``, :class:`BillingColumns`): the tables V adds
    them to are locked too (after its billing tables), and a row holds data in them when
    one of them IS DISTINCT FROM its default expression (``pg_attrdef``, evaluated in the
    counting query; NULL without a default; see :func:`_present_columns`). Without
    ``archive`` such rows are refused, counted per table, as above; with ``archive`` their
    primary key and the declared columns are copied into
    ``tokentrack_archive.<table>__<V>`` (with ``archived_at`` and ``archived_version``; a
    table without a primary key is refused), and the next install of V writes them back.
    """
    if steps < 1:
        raise MigrationError(f"--steps must be at least 1, got {steps}")
    root = (sql_dir or default_sql_dir()).resolve()
    loaded, functions = _load(root)
    versions = {v.version: v for v in loaded}
    conn = await _connect(dsn)
    try:
        await _acquire_lock(conn, wait_notice)
        try:
            applied = await _applied_rows(conn)
            if not applied:
                return RollbackResult()
            if to is not None:
                if to not in {row.version for row in applied}:
                    known = ", ".join(row.version for row in applied)
                    raise MigrationError(
                        f"--to {to}: not an applied version (applied: {known}); nothing was changed"
                    )
                targets = [row for row in reversed(applied) if row.version > to]
                if not targets:
                    return RollbackResult((), (applied[-1].version, applied[-1].name))
            else:
                targets = list(reversed(applied))[:steps]
            missing = [
                f"{row.version}_{row.name}" for row in targets if row.version not in versions
            ]
            if missing:
                raise DriftError(
                    f"no rollback file for applied version(s) {', '.join(missing)} in "
                    f"{root / 'rollback'} (nothing was changed)"
                )
            await _check_billing_data([versions[row.version] for row in targets], conn, archive)
            seeded: tuple[str, ...] = ()
            if any(row.legacy_functions for row in applied):
                seeded = await _seed_older_installation(conn, applied, loaded, functions)
            done: list[RolledBackVersion] = []
            for n, row in enumerate(targets):
                remaining = applied[: len(applied) - n - 1]
                current = (remaining[-1].version, remaining[-1].name) if remaining else None
                try:
                    done.append(
                        await _rollback_version(conn, versions[row.version], row.version, archive)
                    )
                except (ApplyError, RollbackRefused) as exc:
                    exc.result = RollbackResult(tuple(done), (row.version, row.name), seeded)
                    kept = (
                        f"; already rolled back: {', '.join(v.version for v in done)}"
                        if done
                        else ""
                    )
                    exc.args = (f"{exc.args[0]}; version {row.version} stays applied{kept}",)
                    raise
            return RollbackResult(tuple(done), current, seeded)
        finally:
            await _release_lock(conn)
    except asyncpg.PostgresError as exc:
        raise ApplyError(f"{describe_target(dsn)}: {pg_error(exc)}") from exc
    except (asyncpg.InterfaceError, OSError) as exc:
        raise ApplyError(f"lost the connection to {describe_target(dsn)}: {exc}") from exc
    finally:
        await _close(conn)


async def _seed_older_installation(
    conn: asyncpg.Connection,
    applied: Sequence[AppliedRow],
    versions: Sequence[MigrationVersion],
    functions: Sequence[FunctionFile],
) -> tuple[str, ...]:
    """Before a rollback: record the function history that an older installer did not keep."""
    await _bootstrap(conn)
    return await _seed_legacy(conn, applied, versions, functions)


_ARCHIVE_HINT: Final = (
    f"run `make rollback-sql ARCHIVE=1` (tokentrack migrate rollback --archive) to bill them "
    f"and keep the dropped rows in schema {ARCHIVE_SCHEMA}, restored by the next install"
)

# The contract's own tables, whose meaning the archive needs: the reservations a rollback
# bills before archiving, and the step rows whose billed_at says whether they are billed.
_RESERVATIONS: Final = "report_reservations"
_STEPS: Final = "report_step_usage"


async def _present(conn: asyncpg.Connection, version: MigrationVersion) -> list[str]:
    """The billing tables of ``version`` that exist in the database, in declaration order."""
    return [
        t
        for t in version.billing_tables
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"tokentrack.{t}")
    ]


async def _rows(
    conn: asyncpg.Connection, version: MigrationVersion, tables: Sequence[str]
) -> list[TableRows]:
    return [
        TableRows(
            version.version, t, int(await conn.fetchval(f"SELECT count(*) FROM tokentrack.{t}"))
        )
        for t in tables
    ]


@dataclass(frozen=True)
class _ColumnData:
    """The declared billing columns of one table as the catalog has them at rollback time."""

    table: str
    columns: tuple[str, ...]
    """The declared columns that exist and hold values of their own (not generated)."""
    key: tuple[str, ...]
    """The table's primary key columns, in key order (empty: no primary key)."""
    holding: str
    """SQL condition on a row of the table: one of ``columns`` holds data."""


def _ident(name: str) -> str:
    """A column name of the loader's (lower case letters, digits, ``_``) as a quoted identifier."""
    return f'"{name}"'


async def _present_columns(
    conn: asyncpg.Connection, version: MigrationVersion
) -> list[_ColumnData]:
    """The billing columns of ``version`` that exist in the database, in declaration order.

    A row holds data in a column when its value IS DISTINCT FROM the column's default
    expression (``pg_get_expr`` of ``pg_attrdef``; NULL without a default), evaluated in the
    same query: for a constant default (``DEFAULT 0``, none) exactly the rows whose value is
    not the one every row got when the column was added; a volatile default (``now()``)
    makes every row count. A generated column holds nothing of its own and is left out.
    """
    found: list[_ColumnData] = []
    for declared in version.billing_columns:
        relation = f"tokentrack.{declared.table}"
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", relation):
            continue
        defaults = {
            r["name"]: r["def"]
            for r in await conn.fetch(
                "SELECT a.attname::text AS name, pg_get_expr(d.adbin, d.adrelid) AS def"
                " FROM pg_attribute AS a LEFT JOIN pg_attrdef AS d"
                " ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
                " WHERE a.attrelid = $1::regclass AND a.attname::text = ANY($2::text[])"
                " AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''",
                relation,
                list(declared.columns),
            )
        }
        columns = tuple(c for c in declared.columns if c in defaults)
        if not columns:
            continue
        key = tuple(
            r["name"]
            for r in await conn.fetch(
                "SELECT a.attname::text AS name FROM pg_index AS i JOIN pg_attribute AS a"
                " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = $1::regclass AND i.indisprimary"
                " ORDER BY array_position(i.indkey::int2[], a.attnum)",
                relation,
            )
        )
        holding = " OR ".join(
            f"{_ident(c)} IS DISTINCT FROM ({defaults[c] or 'NULL'})" for c in columns
        )
        found.append(_ColumnData(declared.table, columns, key, holding))
    return found


async def _column_rows(
    conn: asyncpg.Connection, version: MigrationVersion, data: Sequence[_ColumnData]
) -> list[TableRows]:
    """How many rows hold data in each table's billing columns."""
    return [
        TableRows(
            version.version,
            d.table,
            int(
                await conn.fetchval(f"SELECT count(*) FROM tokentrack.{d.table} WHERE {d.holding}")
            ),
            d.columns,
        )
        for d in data
    ]


async def _would_drop(
    conn: asyncpg.Connection,
    version: MigrationVersion,
    tables: Sequence[str],
    columns: Sequence[_ColumnData] = (),
) -> str | None:
    """What rolling back ``version`` would drop, as a phrase, or None when its tables are
    empty and no row holds data in its billing columns."""
    counted = [r for r in await _rows(conn, version, tables) if r.rows]
    held = [r for r in await _column_rows(conn, version, columns) if r.rows]
    if not counted and not held:
        return None
    parts = [r.what for r in counted]
    if counted and _STEPS in tables:
        row = await conn.fetchrow(
            f"SELECT count(*) AS steps, COALESCE(sum(total_tokens), 0) AS tokens"
            f" FROM tokentrack.{_STEPS} WHERE billed_at IS NULL"
        )
        assert row is not None
        parts[-1] += f" ({row['steps']} recorded step(s), {row['tokens']} tokens, not billed yet)"
    parts += [r.what for r in held]
    return f"version {version.version} ({version.name}) would drop {', '.join(parts)}"


async def _check_archive_free(
    conn: asyncpg.Connection,
    version: MigrationVersion,
    tables: Sequence[str],
    columns: Sequence[_ColumnData] = (),
) -> None:
    """Refuse to archive into a schema someone else owns, or over an earlier archive, or the
    billing columns of a table without a primary key (their values could not go back)."""
    owner = await conn.fetchrow(
        "SELECT a.nspowner::regrole::text AS archive, t.nspowner::regrole::text AS tokentrack"
        " FROM pg_namespace AS a, pg_namespace AS t"
        " WHERE a.nspname = $1 AND t.nspname = 'tokentrack'",
        ARCHIVE_SCHEMA,
    )
    if owner is not None and owner["archive"] != owner["tokentrack"]:
        raise RollbackRefused(
            f"schema {ARCHIVE_SCHEMA} belongs to role {owner['archive']}, not to "
            f"{owner['tokentrack']}, the owner of schema tokentrack: refusing to copy billing "
            "data into it"
        )
    for held in await _column_rows(conn, version, [d for d in columns if not d.key]):
        if held.rows:
            raise RollbackRefused(
                f"tokentrack.{held.table} has no primary key: refusing to archive {held.what}, "
                "which could not be restored row by row"
            )
    present = {(t, False) for t in tables} | {(d.table, True) for d in columns}
    for found in await _archived(conn, version, restoring=False):
        if (found.table, bool(found.columns)) in present:
            raise RollbackRefused(
                f"{ARCHIVE_SCHEMA}.{found.archive_table} already exists and holds {found.rows} "
                f"row(s) (an earlier archive of version {version.version}, not restored); "
                "install that version to restore them, or export and drop that table, before "
                "archiving again"
            )


async def _check_billing_data(
    targets: Sequence[MigrationVersion], conn: asyncpg.Connection, archive: bool
) -> None:
    """Before anything changes: refuse what the rollback of ``targets`` would refuse later."""
    drops: list[str] = []
    for version in targets:
        tables = await _present(conn, version)
        columns = await _present_columns(conn, version)
        if archive:
            try:
                await _check_archive_free(conn, version, tables, columns)
            except RollbackRefused as exc:
                exc.args = (f"{exc.args[0]} (nothing was changed)",)
                raise
        elif (phrase := await _would_drop(conn, version, tables, columns)) is not None:
            drops.append(phrase)
    if drops:
        raise RollbackRefused(
            f"refusing to roll back: {'; '.join(drops)}; {_ARCHIVE_HINT} (nothing was changed)"
        )


async def _sweep_active(conn: asyncpg.Connection) -> RollbackSweep:
    """Bill every active reservation as the sweep bills an expired one (in the caller's
    transaction): every reservation row locked first, in the sweep's (expires_at, id) order,
    then finalized in (period_id, id) order so that periods are locked in ascending order."""
    ids = await conn.fetch(
        f"SELECT due.id FROM (SELECT rr.id, rr.period_id FROM tokentrack.{_RESERVATIONS} AS rr"
        " WHERE rr.status = 'active' ORDER BY rr.expires_at, rr.id FOR UPDATE) AS due"
        " ORDER BY due.period_id, due.id"
    )
    expired = steps = tokens = 0
    for record in ids:
        answer = json.loads(
            await conn.fetchval(
                "SELECT tokentrack.finalize_reservation($1, 'expired')::text", record["id"]
            )
        )
        if not answer["already_finalized"]:
            expired += 1
            steps += int(answer["steps"])
            tokens += int(answer["billed_tokens"])
    return RollbackSweep(expired=expired, billed_tokens=tokens, steps=steps)


async def _archive_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ARCHIVE_SCHEMA}")
    await conn.execute(
        f"COMMENT ON SCHEMA {ARCHIVE_SCHEMA} IS 'Rows of tokentrack billing tables that "
        "`tokentrack migrate rollback --archive` dropped, one table per source table, and "
        "the values of billing columns it dropped, one table <table>__<version> per table "
        "(primary key and those columns); the next install of their version moves them back "
        "and drops the table. Owner only.'"
    )


async def _archive_columns(
    conn: asyncpg.Connection, version: MigrationVersion, data: Sequence[_ColumnData]
) -> tuple[TableRows, ...]:
    """Copy the primary key and the billing columns of every row holding data in them into
    ``ARCHIVE_SCHEMA.<table>__<version>`` (caller's transaction, tables locked)."""
    archived: list[TableRows] = []
    for d in data:
        kept = (*d.key, *(c for c in d.columns if c not in d.key))
        types = {
            r["name"]: r["type"]
            for r in await conn.fetch(
                "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type"
                " FROM pg_attribute AS a WHERE a.attrelid = $1::regclass"
                " AND a.attname::text = ANY($2::text[]) AND a.attnum > 0 AND NOT a.attisdropped",
                f"tokentrack.{d.table}",
                list(kept),
            )
        }
        name = BillingColumns(d.table, d.columns).archive_table(version.version)
        target = f"{ARCHIVE_SCHEMA}.{name}"
        definitions = ", ".join(
            f"{_ident(c)} {types[c]}{' NOT NULL' if c in d.key else ''}" for c in kept
        )
        await conn.execute(
            f"CREATE TABLE {target} (archived_at timestamptz NOT NULL,"
            f" archived_version text NOT NULL, {definitions},"
            f" PRIMARY KEY ({', '.join(_ident(c) for c in d.key)}))"
        )
        status = await conn.execute(
            f"INSERT INTO {target} SELECT now(), $1, {', '.join(f't.{_ident(c)}' for c in kept)}"
            f" FROM tokentrack.{d.table} AS t WHERE {d.holding}",
            version.version,
        )
        await conn.execute(
            f"COMMENT ON TABLE {target} IS "
            + _quote_literal(
                f"Values of the billing columns {', '.join(d.columns)} of tokentrack.{d.table} "
                f"(by primary key, rows holding data in them) dropped by the rollback of "
                f"version {version.label} (archived_at); written back by the next install of "
                "that version."
            )
        )
        archived.append(TableRows(version.version, d.table, int(status.split()[-1]), d.columns))
    return tuple(archived)


async def _archive(
    conn: asyncpg.Connection, version: MigrationVersion, counted: Sequence[TableRows]
) -> tuple[TableRows, ...]:
    """Copy the rows of ``counted``'s tables into :data:`ARCHIVE_SCHEMA` (caller's transaction)."""
    archived: list[TableRows] = []
    for counts in counted:
        table, target = counts.table, f"{ARCHIVE_SCHEMA}.{counts.table}"
        await conn.execute(
            f"CREATE TABLE {target} (archived_at timestamptz NOT NULL,"
            f" archived_version text NOT NULL, LIKE tokentrack.{table})"
        )
        status = await conn.execute(
            f"INSERT INTO {target} SELECT now(), $1, t.* FROM tokentrack.{table} AS t",
            version.version,
        )
        await conn.execute(
            f"COMMENT ON TABLE {target} IS "
            + _quote_literal(
                f"Rows of tokentrack.{table} dropped by the rollback of version "
                f"{version.label} (archived_at); moved back by the next install of that version."
            )
        )
        archived.append(TableRows(version.version, table, int(status.split()[-1])))
    return tuple(archived)


async def _rollback_version(
    conn: asyncpg.Connection, version: MigrationVersion, key: str, archive: bool = False
) -> RolledBackVersion:
    history = await _function_rows(conn)
    by_path: dict[str, list[FunctionRow]] = {}
    for row in history:
        by_path.setdefault(row.path, []).append(row)
    drops: set[str] = set()
    restores: list[FunctionRow] = []
    for path in sorted(by_path):
        rows = by_path[path]
        if not any(r.version == key for r in rows):
            continue
        before = [r for r in rows if r.version != key]
        restored = before[-1] if before else None
        keep = restored.defined if restored is not None else frozenset()
        drops |= rows[-1].defined - keep
        if restored is not None and restored.source is not None:
            restores.append(restored)
    current = version.rollback.relpath
    billed: RollbackSweep | None = None
    archived: tuple[TableRows, ...] = ()
    try:
        async with conn.transaction(isolation="read_committed"):
            await conn.execute(_PIN_SEARCH_PATH)
            tables = await _present(conn, version)
            columns = await _present_columns(conn, version)
            locked = [*tables, *(d.table for d in columns if d.table not in tables)]
            if locked:
                # Nobody writes (or reads) a billing table, or a table whose billing columns
                # go, between the count and the drop.
                current = f"LOCK TABLE of version {version.version}'s billing tables"
                await conn.execute(
                    f"LOCK TABLE {', '.join(f'tokentrack.{t}' for t in locked)}"
                    " IN ACCESS EXCLUSIVE MODE"
                )
                if not archive:
                    phrase = await _would_drop(conn, version, tables, columns)
                    if phrase is not None:
                        raise RollbackRefused(f"refusing to roll back: {phrase}; {_ARCHIVE_HINT}")
                else:
                    await _check_archive_free(conn, version, tables, columns)
                    # A version whose tables or columns hold reservations' billing data: bill
                    # the reports in flight first, with its own functions, so that nothing
                    # billed later (at the older version) is missing from what it archives.
                    if _RESERVATIONS in tables or any(c.table == _RESERVATIONS for c in columns):
                        current = f"billing the active reservations of version {version.version}"
                        billed = await _sweep_active(conn)
                    current = f"archiving version {version.version}'s billing tables"
                    counted = [r for r in await _rows(conn, version, tables) if r.rows]
                    held = [r for r in await _column_rows(conn, version, columns) if r.rows]
                    if counted or held:
                        await _archive_schema(conn)
                    if counted:
                        archived = await _archive(conn, version, counted)
                    if held:
                        current = f"archiving version {version.version}'s billing columns"
                        archived += await _archive_columns(
                            conn,
                            version,
                            [d for d in columns if d.table in {r.table for r in held}],
                        )
            # Drops first: a function of this version may take or return one of its types.
            for signature in sorted(drops):
                current = f"DROP ROUTINE {signature}"
                await conn.execute(f"DROP ROUTINE IF EXISTS {signature}")
            current = version.rollback.relpath
            await conn.execute(version.rollback.text)
            await conn.execute("DELETE FROM tokentrack.schema_functions WHERE version = $1", key)
            # Restores last: an earlier body may use what the rollback file put back.
            for row in restores:
                current = f"restoring {row.path}"
                assert row.source is not None
                await conn.execute(row.source)
            current = "tokentrack.schema_migrations"
            await conn.execute("DELETE FROM tokentrack.schema_migrations WHERE version = $1", key)
    except asyncpg.PostgresError as exc:
        raise ApplyError(
            f"rolling back version {version.label} failed in {current}: {pg_error(exc)}"
        ) from exc
    return RolledBackVersion(
        version=key,
        name=version.name,
        restored=tuple(r.path for r in restores),
        dropped=tuple(sorted(drops)),
        billed=billed,
        archived=archived,
    )


async def status(dsn: str, *, sql_dir: Path | None = None) -> Status:
    """Every version on disk or in the database, oldest first, and every function file that
    differs from what the database recorded (read-only)."""
    root = (sql_dir or default_sql_dir()).resolve()
    loaded, functions = _load(root)
    versions = {v.version: v for v in loaded}
    by_path = {f.relpath: f for f in functions}
    applied_rows, history = await _read_bookkeeping(dsn)
    applied = {row.version: row for row in applied_rows}
    result: list[VersionStatus] = []
    for key in sorted(versions.keys() | applied.keys()):
        row, disk = applied.get(key), versions.get(key)
        if row is None and disk is not None:
            result.append(VersionStatus(key, disk.name, "pending"))
        elif row is not None and disk is None:
            result.append(VersionStatus(key, row.name, "missing", row.applied_at))
        elif row is not None and disk is not None:
            changed = tuple(_changed_files(row, disk, by_path))
            state = "drifted" if changed else "applied"
            result.append(VersionStatus(key, disk.name, state, row.applied_at, changed))
    recorded: dict[str, tuple[str | None, datetime | None]] = {
        path: (digest, row.applied_at)
        for row in applied_rows
        for path, digest in row.legacy_functions.items()
    }
    if history:
        recorded = {
            path: (last.sha256, last.applied_at) for path, last in _newest_rows(history).items()
        }
    differing: list[FunctionStatus] = []
    for path in sorted(by_path.keys() | recorded.keys()):
        disk_fn = by_path.get(path)
        digest, when = recorded.get(path, (None, None))
        if disk_fn is None:
            if digest is not None:
                differing.append(FunctionStatus(path, "removed", when))
        elif digest is None:
            differing.append(FunctionStatus(path, "new"))
        elif not (
            disk_fn.file.sha256 == digest or (not history and _legacy_match(disk_fn.file, digest))
        ):
            differing.append(FunctionStatus(path, "changed", when))
    return Status(tuple(result), tuple(differing))


async def pending_versions(dsn: str, *, sql_dir: Path | None = None) -> list[MigrationVersion]:
    """Versions not yet applied to the database at ``dsn`` (read-only; refuses drift)."""
    return list((await pending_plan(dsn, sql_dir=sql_dir)).versions)


async def pending_plan(dsn: str, *, sql_dir: Path | None = None) -> InstallPlan:
    """What ``install`` would apply to the database at ``dsn`` (read-only; refuses drift).

    A database whose function history was kept by an older installer must be installed once
    with ``tokentrack migrate install`` first: the printed SQL does not upgrade bookkeeping.
    """
    root = (sql_dir or default_sql_dir()).resolve()
    versions, functions = _load(root)
    applied, history = await _read_bookkeeping(dsn)
    pending = _check_applied(versions, applied, root, functions)
    if any(row.legacy_functions for row in applied):
        raise MigrationError(
            "this database was installed by an older tokentrack installer that did not record "
            "function history; run `tokentrack migrate install` once to upgrade it"
        )
    return _plan(functions, applied, history, pending)


def _terminated(text: str) -> str:
    """``text`` without trailing blank lines, ending its last statement with ``;`` for psql."""
    lines = text.rstrip().splitlines()
    code = [line for line in lines if line.strip() and not line.strip().startswith("--")]
    if code and not code[-1].rstrip().endswith(";"):
        lines.append(";")
    return "\n".join(lines)


def fresh_plan(sql_dir: Path | None = None) -> InstallPlan:
    """What ``install`` would apply to a database that has no tokentrack yet: every version
    and every function file (with the earlier texts of the reworked ones, as install records
    them)."""
    versions, functions = _load(sql_dir)
    return _plan(functions, [], [], versions)


def _functions_sql(changes: Sequence[FunctionChange]) -> list[str]:
    out = ["", _PIN_SEARCH_PATH]
    for change in changes:
        sha = change.file.sha256 if change.file else "removed"
        out += ["", f"-- ----- {change.path} ({change.kind}, sha256 {sha})"]
        if change.file is not None:
            out.append(_terminated(change.file.text))
        out.append(_record_sql(change))
    return out


def render_sql(plan: InstallPlan) -> str:
    """The SQL that applies ``plan`` (:func:`pending_plan`, or :func:`fresh_plan` for a
    database that has no tokentrack yet) with psql, for teams with their own migration tool.
    Output: the bootstrap in its own transaction, then one
    ``BEGIN; ... COMMIT;`` block per version holding its schema file (followed by the restore
    of its archived billing rows and column values, :func:`_restore_sql`, for a version with
    billing tables or billing columns) and
    its ``schema_migrations`` row; the last block also applies the function files with their
    ``schema_functions`` rows (a block of their own when no version is pending). Each block
    first takes the installer's advisory lock and refuses a version or function change that
    is already recorded. Run it with ``psql -v ON_ERROR_STOP=1 -f FILE``.
    """
    from tokentrack_client import __version__

    header = ", ".join(v.label for v in plan.versions) or "(none)"
    if plan.functions:
        files = len({c.path for c in plan.functions})
        header += f"; {files} function file(s), {len(plan.functions)} text(s)"
    out: list[str] = [
        f"-- tokentrack {__version__}: SQL of version(s) {header}",
        "-- Generated by `tokentrack migrate sql`. Apply with: psql -v ON_ERROR_STOP=1 -f FILE",
        "",
        "BEGIN;",
        f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});",
        BOOTSTRAP_SQL.rstrip("\n"),
        "COMMIT;",
    ]
    for i, version in enumerate(plan.versions):
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
            "",
            f"-- ----- {version.schema.relpath} (sha256 {version.schema.sha256})",
            _terminated(version.schema.text),
        ]
        if version.billing_tables or version.billing_columns:
            declared = [
                f"billing columns: {g.table}({', '.join(g.columns)})"
                for g in version.billing_columns
            ]
            if version.billing_tables:
                declared.insert(0, f"billing tables: {', '.join(version.billing_tables)}")
            out += [
                "",
                f"-- ----- {'; '.join(declared)} (restored from {ARCHIVE_SCHEMA} when a "
                f"`rollback --archive` kept their {'data' if version.billing_columns else 'rows'})",
                _restore_sql(version),
            ]
        if i == len(plan.versions) - 1 and plan.functions:
            out += _functions_sql(plan.functions)
        files_json = json.dumps(version.file_checksums, sort_keys=True)
        out += [
            "",
            "INSERT INTO tokentrack.schema_migrations (version, name, checksum, files)",
            f"VALUES ({_quote_literal(version.version)}, {_quote_literal(version.name)}, "
            f"{_quote_literal(version.checksum)}, {_quote_literal(files_json)}::jsonb);",
            "COMMIT;",
        ]
    if not plan.versions and plan.functions:
        out += [
            "",
            "-- ===== function files =====",
            "BEGIN;",
            f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});",
            *_functions_sql(plan.functions),
            "COMMIT;",
        ]
    return "\n".join(out) + "\n"
