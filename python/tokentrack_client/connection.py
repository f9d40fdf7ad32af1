"""What every ``tokentrack`` command shares: its error base class and its database connection.

:class:`CommandError` is the base of every error a command reports: the migrator's
:class:`~tokentrack_client.migrate.MigrationError`, the operations commands'
:class:`~tokentrack_client.ops.OpsError` and :class:`ConnectionFailed`. The CLI prints its
message as one line ``tokentrack: error: ...`` on stderr and exits with its ``exit_code``.

:func:`connect` opens the one connection a command works on: a ``postgresql://`` URL, a
bounded connect timeout (:func:`connect_timeout`: ``--connect-timeout``, else
``$TOKENTRACK_CONNECT_TIMEOUT``, else 10 s), an ``application_name`` that shows the command in
``pg_stat_activity``, and every failure (invalid URL, unreachable server, refused login, a
server that accepts and never answers) raised as one :class:`ConnectionFailed` naming the
target ``user@host:port/db``, never the password.
:func:`close` closes it politely, or drops the socket when that is not possible.

This module imports no other module of the package, so that all of them can use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final
from urllib.parse import urlsplit

import asyncpg

CONNECT_TIMEOUT: Final = 10.0
"""Default seconds to wait for the server to accept the connection and the login."""

CONNECT_TIMEOUT_ENV: Final = "TOKENTRACK_CONNECT_TIMEOUT"
"""The environment variable that overrides :data:`CONNECT_TIMEOUT` (seconds)."""

_connect_timeout: ContextVar[float | None] = ContextVar("tokentrack_connect_timeout", default=None)
"""The ``--connect-timeout`` of the running command (set by :func:`connect_timeout_of`)."""

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


def parse_seconds(text: str, source: str) -> float:
    """``text`` as a positive number of seconds; ValueError naming ``source`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):  # also refuses NaN
        raise ValueError(f"{source}: expected a positive number of seconds, got {text!r}")
    return value


def connect_timeout() -> float:
    """Seconds :func:`connect` waits: the command's ``--connect-timeout``, else
    ``$TOKENTRACK_CONNECT_TIMEOUT``, else :data:`CONNECT_TIMEOUT`. ValueError when the
    environment variable is not a positive number."""
    chosen = _connect_timeout.get()
    if chosen is not None:
        return chosen
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    return parse_seconds(text, f"${CONNECT_TIMEOUT_ENV}") if text else CONNECT_TIMEOUT


@contextmanager
def connect_timeout_of(seconds: float | None) -> Iterator[None]:
    """Within the block (and the event loops it starts), :func:`connect` waits ``seconds``
    (None: the environment's or the default)."""
    token = _connect_timeout.set(seconds)
    try:
        yield
    finally:
        _connect_timeout.reset(token)


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


DATABASE_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
"""What a command can meet while it works on its connection: a server error, a lost or
broken connection, a socket error, a timeout (each becomes one line, :func:`failure_line`)."""


def failure_line(exc: BaseException) -> str:
    """One line for one of :data:`DATABASE_ERRORS`: the SQLSTATE and message of a server
    error, otherwise the exception's name and message (``ConnectionResetError: ...``)."""
    if isinstance(exc, asyncpg.PostgresError):
        return pg_error(exc)
    detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


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
        seconds = connect_timeout()
    except ValueError as exc:
        raise failure(str(exc)) from exc
    try:
        return await asyncpg.connect(
            dsn,
            timeout=seconds,
            server_settings={"application_name": application_name},
        )
    except asyncpg.PostgresError as exc:
        raise failure(f"cannot connect to {target}: {pg_error(exc)}") from exc
    except TimeoutError as exc:  # a server (or anything) that accepts and never answers
        raise failure(
            f"cannot connect to {target}: no answer within {seconds:g} s (the connect "
            f"timeout: --connect-timeout SECONDS or ${CONNECT_TIMEOUT_ENV})"
        ) from exc
    except (OSError, asyncpg.InterfaceError, ValueError) as exc:
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
    "CONNECT_TIMEOUT_ENV",
    "DATABASE_ERRORS",
    "EXIT_ERROR",
    "URL_HELP",
    "CommandError",
    "ConnectionFailed",
    "close",
    "connect",
    "connect_timeout",
    "connect_timeout_of",
    "describe_target",
    "failure_line",
    "parse_seconds",
    "pg_error",
]
