"""Small helpers for the SQL-level tests: call a tokentrack function, count rows, seed data."""

from __future__ import annotations

import asyncio
import json
import time
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


async def race_a_short_batch(dsn: str, sweep: Callable[[], Awaitable[object]]) -> object:
    """Run ``sweep`` (a sweep in batches of 2) so that its first batch comes out short while a
    due reservation remains; return what ``sweep`` returned, after asserting that it left no
    reservation active past its expiry.

    Three reservations of one account, each with a step: R0 and R1 due, R2 due 1.5 s later.
    A concurrent finalize of R1 holds R1's row lock; the sweep's first batch (R0, R1) waits
    for it; once R2 has come due the finalize commits, so R1 drops out of the batch and the
    batch expires 1 of 2. R2 was not due at that batch's now(): only a sweep that goes on
    after a short batch bills it.
    """
    setup = await asyncpg.connect(dsn)
    finalizer = await asyncpg.connect(dsn)
    try:
        account = await new_account(setup)
        reports = []
        for n in range(3):
            report, answer = await reserve(setup, account, 10)
            assert answer["success"] is True
            assert (await step(setup, report, account, "AN0", n + 1, 1))["success"]
            reports.append(report)
        r0, r1, r2 = reports
        for report, ago in ((r0, "2 hours"), (r1, "1 hour")):
            await setup.execute(
                "UPDATE tokentrack.report_reservations SET created_at = now() - interval"
                " '3 hours', expires_at = now() - $2::text::interval WHERE report_id = $1",
                report,
                ago,
            )
        due_at = await setup.fetchval(
            "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
            " expires_at = clock_timestamp() + interval '1.5 seconds' WHERE report_id = $1"
            " RETURNING extract(epoch FROM expires_at)::float8",
            r2,
        )
        holding = finalizer.transaction()
        await holding.start()
        finalized = await call(finalizer, "finalize_report_usage", r1, account)
        assert finalized["success"] is True
        running = asyncio.ensure_future(sweep())
        deadline = time.monotonic() + 10
        # The sweep's first batch waits for R1's row lock.
        while not await setup.fetchval(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> $1)",
            finalizer.get_server_pid(),
        ):
            assert not running.done(), running.result()
            assert time.monotonic() < deadline, "the sweep never waited for the finalize"
            await asyncio.sleep(0.02)
        # Commit once R2 has come due (by the server's clock), after the batch's now().
        server_now = await setup.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        await asyncio.sleep(max(0.0, due_at + 0.2 - server_now))
        await holding.commit()
        result = await asyncio.wait_for(running, 30)
        left = await setup.fetch(
            "SELECT report_id FROM tokentrack.report_reservations"
            " WHERE status = 'active' AND expires_at <= now()"
        )
        assert left == [], f"the sweep left due reservations active: {left}"
        statuses = await setup.fetch(
            "SELECT report_id, status FROM tokentrack.report_reservations WHERE account_id = $1",
            account,
        )
        assert {r["report_id"]: r["status"] for r in statuses} == {
            r0: "expired",
            r1: "completed",
            r2: "expired",
        }
        await assert_reconciled(setup)
        return result
    finally:
        await finalizer.close()
        await setup.close()
