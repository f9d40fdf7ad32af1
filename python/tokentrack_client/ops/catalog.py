"""What the tokentrack SQL creates, read from the SQL files themselves.

``tokentrack verify`` compares a database with this: the tables, indexes, routines (with
their argument types), row level security flags, policies and grants that each version's
files create. Reading them from the files that the migrator applies (rather than keeping a
second list here) means a reviewed change of the SQL needs no change of the checker.

The parser is deliberately small: it drops comments and dollar-quoted bodies, splits the
rest into statements at ``;`` and recognises the few DDL shapes the SQL style guide allows
(``CREATE TABLE tokentrack.x``, ``REVOKE ALL ON FUNCTION tokentrack.f(types) FROM PUBLIC``...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from tokentrack_client.migrate import MigrationVersion

_DOLLAR_QUOTE: Final = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$.*?\$\1\$", re.DOTALL)
_LINE_COMMENT: Final = re.compile(r"--[^\n]*")
_BLOCK_COMMENT: Final = re.compile(r"/\*.*?\*/", re.DOTALL)
_STRING: Final = re.compile(r"'(?:[^']|'')*'")

_IDENT = r"[a-z_][a-z0-9_]*"
_CREATE_TABLE: Final = re.compile(
    rf"^CREATE TABLE (?:IF NOT EXISTS )?tokentrack\.({_IDENT})\b", re.I
)
_CREATE_INDEX: Final = re.compile(
    rf"^CREATE (?:UNIQUE )?INDEX (?:IF NOT EXISTS )?({_IDENT}) ON tokentrack\.({_IDENT})\b", re.I
)
_CREATE_ROUTINE: Final = re.compile(
    rf"^CREATE (?:OR REPLACE )?(FUNCTION|PROCEDURE) tokentrack\.({_IDENT})\s*\(", re.I
)
_ROUTINE_PRIV: Final = re.compile(
    rf"^(GRANT|REVOKE) (EXECUTE|ALL(?: PRIVILEGES)?) ON (FUNCTION|PROCEDURE) "
    rf"tokentrack\.({_IDENT})\s*\(([^)]*)\) (?:TO|FROM) (.+)$",
    re.I,
)
_ENABLE_RLS: Final = re.compile(
    rf"^ALTER TABLE tokentrack\.({_IDENT}) ENABLE ROW LEVEL SECURITY$", re.I
)
_CREATE_POLICY: Final = re.compile(
    rf"^CREATE POLICY ({_IDENT}) ON tokentrack\.({_IDENT})"
    r"(?: AS (?:PERMISSIVE|RESTRICTIVE))?(?: FOR (ALL|SELECT|INSERT|UPDATE|DELETE))?"
    r"(?: TO (.+?))?(?: USING\b.*| WITH CHECK\b.*)?$",
    re.I,
)
_TABLE_PRIV: Final = re.compile(
    r"^(GRANT|REVOKE) ((?:SELECT|INSERT|UPDATE|DELETE|TRUNCATE|REFERENCES|TRIGGER|ALL)"
    r"(?:\s*,\s*(?:SELECT|INSERT|UPDATE|DELETE|TRUNCATE|REFERENCES|TRIGGER))*)"
    rf"(?: PRIVILEGES)? ON (?:TABLE )?(tokentrack\.{_IDENT}(?:\s*,\s*tokentrack\.{_IDENT})*)"
    r" (?:TO|FROM) (.+)$",
    re.I,
)

TABLE_PRIVILEGES: Final = (
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
)


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r.strip().lower() for r in text.split(",") if r.strip())


def normalise_types(args: str) -> str:
    """``uuid,  integer`` -> ``uuid, integer``: one spelling of an argument type list."""
    return ", ".join(" ".join(part.split()).lower() for part in args.split(",") if part.strip())


def statements(sql: str) -> list[str]:
    """The statements of ``sql`` without comments, string literals or dollar-quoted bodies."""
    text = _DOLLAR_QUOTE.sub("$$", sql)
    text = _BLOCK_COMMENT.sub(" ", text)
    text = _LINE_COMMENT.sub(" ", text)
    text = _STRING.sub("''", text)
    return [" ".join(s.split()) for s in text.split(";") if s.strip()]


@dataclass(frozen=True)
class Routine:
    """A function or procedure; ``args`` are its identity argument types (None when unknown)."""

    kind: str  # "function" | "procedure"
    name: str
    args: str | None

    @property
    def signature(self) -> str:
        """``tokentrack.name(types)``."""
        return f"tokentrack.{self.name}({self.args if self.args is not None else '...'})"


@dataclass(frozen=True)
class Policy:
    """A row level security policy of a table."""

    table: str
    name: str
    command: str
    roles: tuple[str, ...]


@dataclass
class Catalog:
    """The objects of one or more versions."""

    versions: tuple[str, ...] = ()
    tables: set[str] = field(default_factory=set)
    indexes: dict[str, str] = field(default_factory=dict)  # index -> table
    routines: dict[str, Routine] = field(default_factory=dict)  # name -> routine
    execute_grants: dict[str, set[str]] = field(default_factory=dict)  # routine -> roles
    public_revoked: set[str] = field(default_factory=set)  # routines revoked from PUBLIC
    rls_tables: set[str] = field(default_factory=set)
    policies: dict[str, Policy] = field(default_factory=dict)  # "table.name" -> policy
    table_grants: set[tuple[str, str, str]] = field(default_factory=set)  # (table, role, priv)
    public_revoked_tables: set[str] = field(default_factory=set)

    def add_sql(self, sql: str) -> None:
        """Record what the statements of ``sql`` create, grant and revoke."""
        for stmt in statements(sql):
            self._add_statement(stmt)

    def _add_statement(self, stmt: str) -> None:
        if m := _CREATE_TABLE.match(stmt):
            self.tables.add(m[1].lower())
        elif m := _CREATE_INDEX.match(stmt):
            self.indexes[m[1].lower()] = m[2].lower()
        elif m := _CREATE_ROUTINE.match(stmt):
            name = m[2].lower()
            if name not in self.routines:
                self.routines[name] = Routine(m[1].lower(), name, None)
        elif m := _ROUTINE_PRIV.match(stmt):
            action, name, args = m[1].upper(), m[4].lower(), normalise_types(m[5])
            known = self.routines.get(name)
            kind = known.kind if known else m[3].lower()
            self.routines[name] = Routine(kind, name, args)
            roles = _roles(m[6])
            if action == "REVOKE" and "public" in roles:
                self.public_revoked.add(name)
            elif action == "GRANT":
                self.execute_grants.setdefault(name, set()).update(roles)
        elif m := _ENABLE_RLS.match(stmt):
            self.rls_tables.add(m[1].lower())
        elif m := _CREATE_POLICY.match(stmt):
            policy = Policy(
                table=m[2].lower(),
                name=m[1].lower(),
                command=(m[3] or "ALL").upper(),
                roles=_roles(m[4]) if m[4] else ("public",),
            )
            self.policies[f"{policy.table}.{policy.name}"] = policy
        elif m := _TABLE_PRIV.match(stmt):
            self._table_privileges(m[1].upper(), m[2], m[3], m[4])

    def _table_privileges(self, action: str, privs: str, tables: str, roles: str) -> None:
        names = [t.strip().split(".", 1)[1].lower() for t in tables.split(",")]
        wanted = [p.strip().upper() for p in privs.split(",")]
        if "ALL" in wanted:
            wanted = list(TABLE_PRIVILEGES)
        for table in names:
            for role in _roles(roles):
                for priv in wanted:
                    if action == "GRANT":
                        self.table_grants.add((table, role, priv))
                    else:
                        self.table_grants.discard((table, role, priv))
                        if role == "public":
                            self.public_revoked_tables.add(table)


def catalog_of(versions: Iterable[MigrationVersion]) -> Catalog:
    """Everything that ``versions`` create (in order: later grants and revokes win)."""
    chosen: Sequence[MigrationVersion] = sorted(versions, key=lambda v: v.version)
    catalog = Catalog(versions=tuple(v.version for v in chosen))
    for version in chosen:
        for sql_file in version.applied_files:
            catalog.add_sql(sql_file.text)
    return catalog
