"""The client behind Debian's PgBouncer in transaction pooling mode.

PgBouncer hands each transaction to whichever of its few server connections is free, so
nothing may live in a session between two calls: no session settings, no named prepared
statements. Callers create their pool with ``statement_cache_size=0`` (docs/CLIENT.md); the
client runs every call as one explicit transaction. Every pool here has more client
connections than PgBouncer has server connections, so calls really share them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from client_fixtures import (
    FAST_RETRY,
    GatedLLM,
    PgBouncer,
    cost,
    report_state,
    run_steps,
)
from sqlkit import assert_reconciled, new_account, period
from tokentrack_client import (
    CallTimeout,
    DatabaseError,
    InsufficientTokens,
    ReportCancelled,
    TokenTracker,
)

ALL_STEPS = ("AN0", "AN1.5", "AN1.7", "AN2", "AN3", "AN4", "AN5")


@pytest.fixture
def bounced(bouncer_pool: asyncpg.Pool[Any]) -> TokenTracker:
    return TokenTracker(bouncer_pool, retry=FAST_RETRY)


async def test_the_whole_lifecycle_through_pgbouncer(
    bounced: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 500_000)
    complete, failed = uuid.uuid4(), uuid.uuid4()
    async with bounced.track_report(account, complete, 80_000) as report:
        await run_steps(report, GatedLLM(), ALL_STEPS)

    async def failing() -> None:
        async with bounced.track_report(account, failed, 80_000) as report:
            await run_steps(report, GatedLLM(), ("AN0", "AN2"))
            raise RuntimeError("provider down")

    with pytest.raises(RuntimeError, match="provider down"):
        await failing()
    with pytest.raises(InsufficientTokens):
        await bounced.try_reserve(account, uuid.uuid4(), 10_000_000)

    assert (await report_state(conn, complete))["status"] == "complete"
    failed_state = await report_state(conn, failed)
    assert (failed_state["status"], failed_state["error_message"]) == ("failed", "provider down")
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (cost(*ALL_STEPS, "AN0", "AN2"), 1)
    assert (await bounced.reconcile(account)).ok is True


async def test_task_cancellation_through_pgbouncer(
    bounced: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 500_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()
    llm.hold("AN2")

    async def generator() -> None:
        async with bounced.track_report(account, report_id, 80_000) as report:
            await run_steps(report, llm, ("AN0", "AN1.5", "AN2", "AN5"))

    task = asyncio.create_task(generator())
    await asyncio.wait_for(llm.started("AN2").wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert set(state["steps"]) == {"AN0", "AN1.5"}
    assert state["reservation"]["billed_tokens"] == cost("AN0", "AN1.5")
    await assert_reconciled(conn)


async def test_cancel_report_from_another_pgbouncer_client(
    bounced: TokenTracker, pgbouncer: PgBouncer, db_dsn: str, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 500_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()
    llm.hold("AN3")
    button_connection = await asyncpg.connect(pgbouncer.dsn(db_dsn), statement_cache_size=0)
    try:
        button = TokenTracker(button_connection, retry=FAST_RETRY)

        async def generator() -> None:
            async with bounced.track_report(account, report_id, 80_000) as report:
                await run_steps(report, llm, ("AN0", "AN2", "AN3", "AN4", "AN5"))

        task = asyncio.create_task(generator())
        await asyncio.wait_for(llm.started("AN3").wait(), timeout=10)
        settlement = await button.cancel_report(report_id, account)
        llm.release("AN3")
        with pytest.raises(ReportCancelled):
            await task
    finally:
        await button_connection.close()

    assert settlement.billed_tokens == cost("AN0", "AN2")
    assert llm.calls == ["AN0", "AN2", "AN3"]
    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert state["steps"]["AN3"]["late"] is True
    assert (await period(conn, account))["tokens_used"] == cost("AN0", "AN2", "AN3")
    await assert_reconciled(conn)


async def test_many_concurrent_reports_share_few_server_connections(
    bounced: TokenTracker, pgbouncer: PgBouncer, conn: asyncpg.Connection, db_dsn: str
) -> None:
    accounts = [await new_account(conn, 1_000_000) for _ in range(3)]
    reports = [(accounts[i % 3], uuid.uuid4()) for i in range(12)]

    async def generate(account: uuid.UUID, report_id: uuid.UUID) -> None:
        async with bounced.track_report(account, report_id, 80_000) as report:
            await asyncio.gather(*(run_steps(report, GatedLLM(), (s,)) for s in ALL_STEPS))

    await asyncio.gather(*(generate(a, r) for a, r in reports))

    servers = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    assert 1 <= servers <= pgbouncer.pool_size  # twelve reports, at most three server sessions
    for account in accounts:
        row = await period(conn, account)
        assert (row["tokens_used"], row["reports_count"]) == (4 * cost(*ALL_STEPS), 4)
    assert await conn.fetchval(
        "SELECT count(*) FROM tokentrack.report_reservations WHERE status = 'completed'"
    ) == len(reports)
    await assert_reconciled(conn)


async def test_the_statement_cache_is_the_trap_and_the_error_says_so(
    pgbouncer: PgBouncer, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """With asyncpg's default statement cache, named prepared statements outlive the
    transaction that PgBouncer gave them; the next call of the same client lands on another
    server connection. This is why callers must set statement_cache_size=0."""
    account = await new_account(conn, 10**9)
    pool = await asyncpg.create_pool(pgbouncer.dsn(db_dsn), min_size=8, max_size=8)
    try:
        tracker = TokenTracker(pool, retry=FAST_RETRY)
        errors: list[DatabaseError] = []

        async def caller() -> None:
            for _ in range(10):
                try:
                    await tracker.reconcile(account)
                except DatabaseError as exc:
                    errors.append(exc)

        await asyncio.gather(*(caller() for _ in range(8)))
    finally:
        await pool.close()
    assert errors, "named prepared statements unexpectedly survived transaction pooling"
    assert all("statement_cache_size=0" in str(e) for e in errors)
    assert {e.sqlstate for e in errors} <= {"26000", "42P05"}


async def keep_session(connection: asyncpg.Connection) -> None:
    """A pool reset that resets nothing (asyncpg's default runs RESET ALL, which would hide a
    setting that a call left behind)."""


async def test_a_timeout_through_pgbouncer_stays_inside_its_transaction(
    pgbouncer: PgBouncer, db_dsn: str, conn: asyncpg.Connection, connect: Any
) -> None:
    """The tracker's timeout is SET LOCAL in the call's transaction: it ends the blocked call
    and leaves nothing on the server connection that PgBouncer hands to the next client."""
    account = await new_account(conn, 10_000)
    pool = await asyncpg.create_pool(
        pgbouncer.dsn(db_dsn), min_size=1, max_size=6, statement_cache_size=0, reset=keep_session
    )
    try:
        tracker = TokenTracker(pool, retry=FAST_RETRY, timeout=0.3)
        blocker = await connect()
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM tokentrack.usage_periods WHERE account_id = $1 FOR UPDATE", account
        )
        try:
            with pytest.raises(CallTimeout) as raised:
                await tracker.increment_usage(account, 10)
        finally:
            await tx.rollback()
        assert raised.value.sqlstate in ("57014", "55P03")
        for _ in range(pgbouncer.pool_size):  # committed calls, on any server connection
            await tracker.increment_usage(account, 10)

        # Every server connection of PgBouncer at once (one open transaction each): none of
        # them kept the calls' settings.
        held = [await pool.acquire() for _ in range(pgbouncer.pool_size)]
        seen, pids = set(), set()
        try:
            for client in held:
                await client.execute("BEGIN")
                pids.add(await client.fetchval("SELECT pg_backend_pid()"))
            for client in held:
                timeouts = (
                    await client.fetchval("SHOW statement_timeout"),
                    await client.fetchval("SHOW lock_timeout"),
                )
                seen.add(timeouts)
        finally:
            for client in held:
                await client.execute("ROLLBACK")
                await pool.release(client)
    finally:
        await pool.close()
    assert len(pids) == pgbouncer.pool_size
    assert seen == {("0", "0")}
    assert (await period(conn, account))["tokens_used"] == 10 * pgbouncer.pool_size
