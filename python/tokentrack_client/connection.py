"""What every ``tokentrack`` command shares: its error base class and its database connection.

:class:`CommandError` is the base of every error a command reports: the migrator's
:class:`~tokentrack_client.migrate.MigrationError`, the operations commands'
:class:`~tokentrack_client.ops.OpsError` and :class:`ConnectionFailed`. The CLI prints its
message as one line ``tokentrack: error: ...`` on stderr and exits with its ``exit_code``.

:func:`connect` opens the one connection a command works on: a ``postgresql://`` URL, a
bounded timeout, an ``application_name`` that shows the command in ``pg_stat_activity``, and
every failure (invalid URL, unreachable server, refused login, timeout) raised as one
:class:`ConnectionFailed` naming the target ``user@host:port/db``, never the password.
:func:`close` closes it politely, or drops the socket when that is not possible.

This module imports no other module of the package, so that all of them can use it.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

import asyncpg

CONNECT_TIMEOUT: Final = 10.0
"""Seconds to wait for the server to accept the connection and the login."""

CLOSE_TIMEOUT: Final = 5.0
"""Seconds to wait for a polite close before the socket is dropped."""

EXIT_ERROR: Final = 2
"""The exit status of a command that stopped on a :class:`CommandError`."""

URL_HELP: Final = "postgresql://user:password@host:port/dbname (default: $DATABASE_URL)"
"""The help text of every ``--database-url`` option."""


class CommandError(Exception):
    """A problem that stops a ``tokentrack`` command; the CLI prints :attr:`line`."""

    exit_code: int = EXIT_ERROR

    @property
    def line(self) -> str:
        """The message on one line (a server's multi-line message is joined)."""
        return " ".join(str(self).split()) or type(self).__name__


class ConnectionFailed(CommandError):
    """The database URL is invalid, or the server cannot be reached or refuses the login."""


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


async def connect(
    dsn: str,
    application_name: str,
    *,
    failure: type[ConnectionFailed] = ConnectionFailed,
) -> asyncpg.Connection:
    """An asyncpg connection to ``dsn``; every failure raises ``failure`` (a
    :class:`ConnectionFailed`, or a subclass a caller's ``except`` clauses expect)."""
    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise failure(
            "invalid DATABASE_URL: expected a URL like postgresql://user:password@host:5432/dbname"
        )
    target = describe_target(dsn)
    try:
        return await asyncpg.connect(
            dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": application_name},
        )
    except asyncpg.PostgresError as exc:
        raise failure(f"cannot connect to {target}: {pg_error(exc)}") from exc
    except (OSError, TimeoutError, asyncpg.InterfaceError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise failure(f"cannot connect to {target}: {detail}") from exc


async def close(conn: asyncpg.Connection) -> None:
    """Close politely, or drop the socket when the connection is broken or the close hangs."""
    try:
        await conn.close(timeout=CLOSE_TIMEOUT)
    except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError, TimeoutError):
        conn.terminate()


__all__ = [
    "CLOSE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "EXIT_ERROR",
    "URL_HELP",
    "CommandError",
    "ConnectionFailed",
    "close",
    "connect",
    "describe_target",
    "pg_error",
]
