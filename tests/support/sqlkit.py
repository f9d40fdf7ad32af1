"""Small helpers for the SQL-level tests: call a tokentrack function, count rows, seed data."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

Connect = Callable[[], Awaitable[asyncpg.Connection]]
"""The ``connect`` fixture: a factory of extra connections to the test database."""

TABLES = (
    "accounts",
    "usage_periods",
    "reports",
    "usage_ledger",
    "report_reservations",
    "report_step_usage",
)

FINAL_STATUSES = ("complete", "failed", "cancelled")


async def call(conn: asyncpg.Connection, function: str, *args: Any) -> dict[str, Any]:
    """Call ``tokentrack.<function>(args...)`` and return its jsonb answer as a dict."""
    placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
    raw = await conn.fetchval(f"SELECT tokentrack.{function}({placeholders})", *args)
    answer = json.loads(raw)
    assert isinstance(answer, dict)
    return answer


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Row counts of every tokentrack table."""
    result: dict[str, int] = {}
    for table in TABLES:
        result[table] = await conn.fetchval(f"SELECT count(*) FROM tokentrack.{table}")
    return result


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every tokentrack table, as text, in a stable order."""
    result: dict[str, list[str]] = {}
    for table in TABLES:
        rows = await conn.fetch(
            f"SELECT t::text AS row FROM tokentrack.{table} AS t ORDER BY t::text"
        )
        result[table] = [r["row"] for r in rows]
    return result


async def new_account(conn: asyncpg.Connection, limit: int = 100_000) -> uuid.UUID:
    """Create an account with an active period of ``limit`` tokens."""
    account_id = uuid.uuid4()
    answer = await call(conn, "open_usage_period", account_id, limit, None)
    assert answer["success"] is True
    return account_id


async def reserve(
    conn: asyncpg.Connection, account_id: uuid.UUID, estimate: int = 1_000
) -> tuple[uuid.UUID, dict[str, Any]]:
    """Reserve ``estimate`` tokens for a new report; return its id and the answer."""
    report_id = uuid.uuid4()
    answer = await call(conn, "try_reserve_tokens", account_id, report_id, estimate)
    return report_id, answer


async def step(
    conn: asyncpg.Connection,
    report_id: uuid.UUID,
    account_id: uuid.UUID,
    name: str,
    input_tokens: int,
    output_tokens: int,
    total_tokens: int | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """persist_step_usage with keyword-friendly arguments."""
    return await call(
        conn,
        "persist_step_usage",
        report_id,
        account_id,
        name,
        input_tokens,
        output_tokens,
        total_tokens,
        model,
    )


async def period(conn: asyncpg.Connection, account_id: uuid.UUID) -> asyncpg.Record:
    """The account's active period row."""
    row = await conn.fetchrow(
        "SELECT * FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active'",
        account_id,
    )
    assert row is not None
    return row


async def expire(conn: asyncpg.Connection, report_id: uuid.UUID) -> None:
    """Move a report's reservation into the past so that it is expired."""
    await conn.execute(
        "UPDATE tokentrack.report_reservations"
        " SET created_at = now() - interval '3 hours', expires_at = now() - interval '1 hour'"
        " WHERE report_id = $1",
        report_id,
    )


async def assert_reconciled(conn: asyncpg.Connection) -> None:
    """reconcile() over all accounts must be ok."""
    answer = await call(conn, "reconcile", None)
    assert answer["ok"] is True, answer["discrepancies"]
