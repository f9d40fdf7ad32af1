"""What every operations command shares: the errors, the connection, the table printer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final

import asyncpg

from tokentrack_client import connection
from tokentrack_client.connection import (
    DATABASE_ERRORS,
    CommandError,
    describe_target,
    failure_line,
)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""A check failed, an alert fired, or a figure that must not change changed."""


class OpsError(CommandError):
    """A problem that stops an operations command; its message is one line for the CLI."""


@asynccontextmanager
async def connected(dsn: str, application_name: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to ``dsn`` (:func:`tokentrack_client.connection.connect`: its
    failures raise :class:`~tokentrack_client.connection.ConnectionFailed`); a server error,
    a lost connection, a socket error or a timeout while it is in use becomes
    :class:`OpsError` naming the target."""
    conn = await connection.connect(dsn, application_name)
    try:
        yield conn
    except DATABASE_ERRORS as exc:
        raise OpsError(f"{describe_target(dsn)}: {failure_line(exc)}") from exc
    finally:
        await connection.close(conn)


async def require_installed(conn: asyncpg.Connection, *, table: str = "usage_periods") -> None:
    """Refuse with a clear message when the tokentrack schema (or one of its tables) is missing."""
    found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"tokentrack.{table}")
    if not found:
        raise OpsError(
            f"tokentrack.{table} not found in this database: install tokentrack first "
            "(make install-sql DATABASE_URL=... or tokentrack migrate install)"
        )


async def fetchrow(conn: asyncpg.Connection, sql: str, *args: Any) -> asyncpg.Record:
    """``conn.fetchrow`` for a query that always returns one row (an aggregate)."""
    row = await conn.fetchrow(sql, *args)
    if row is None:  # pragma: no cover - aggregates always return a row
        raise OpsError(f"no row from {sql!r}")
    return row


def iso(value: datetime | None) -> str | None:
    """ISO 8601 (seconds) or None."""
    return value.isoformat(timespec="seconds") if value is not None else None


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: a header line, then one line per row, columns aligned."""
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)
