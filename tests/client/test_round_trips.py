"""What each call sends: the idempotent calls are one statement (the server commits it as it
ends), the others an explicit transaction; a session that is not READ COMMITTED, a connection
without asyncpg's statement cache (PgBouncer) or with a command_timeout, and a tracker with a
timeout get the explicit transaction too; ``create_pool`` releases without asyncpg's reset
query. Each statement a connection runs is seen through asyncpg's query logger."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from client_fixtures import FAST_RETRY, FaultProxy, report_state
from sqlkit import assert_reconciled, new_account, period
from tokentrack_client import TokenTracker, create_pool, reset_nothing

BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"
GUARD = (
    "SELECT CASE WHEN pg_catalog.current_setting('transaction_isolation') = 'read committed' THEN "
)


def logged(connection: asyncpg.Connection) -> list[str]:
    """The statements ``connection`` runs from now on, as asyncpg sends them."""
    seen: list[str] = []
    connection.add_query_logger(lambda record: seen.append(record.query))
    return seen


async def shape(queries: list[str]) -> list[str]:
    """Each statement as BEGIN, COMMIT, guarded (the one-statement call), call or other
    (once asyncpg, which calls its query loggers soon after each statement, has logged)."""
    await asyncio.sleep(0)
    kinds = []
    for query in queries:
        if query == BEGIN:
            kinds.append("BEGIN")
        elif query == "COMMIT":
            kinds.append("COMMIT")
        elif query.startswith(GUARD):
            kinds.append("guarded")
        elif query.startswith("SELECT tokentrack."):
            kinds.append("call")
        else:
            kinds.append(query)
    return kinds


async def lifecycle(tracker: TokenTracker, account: uuid.UUID) -> uuid.UUID:
    report = uuid.uuid4()
    async with tracker.track_report(account, report, 5_000) as tracked:
        await tracked.step("AN0", input_tokens=900, output_tokens=100)
        await tracked.step("AN2", input_tokens=1_400, output_tokens=600)
    assert tracked.settlement is not None
    assert tracked.settlement.billed_tokens == 3_000
    return report


async def test_the_lifecycle_is_one_statement_per_call_and_increment_usage_a_transaction(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    single = await asyncpg.connect(db_dsn)
    try:
        seen = logged(single)
        tracker = TokenTracker(single, retry=FAST_RETRY)
        account = await new_account(conn, 100_000)
        await lifecycle(tracker, account)
        assert await shape(seen) == ["guarded"] * 4  # reserve, two steps, finish
        assert not single.is_in_transaction()
        seen.clear()
        assert (await tracker.increment_usage(account, 250)).tokens_used == 3_250
        assert await shape(seen) == ["BEGIN", "call", "COMMIT"]  # not idempotent
    finally:
        await single.close()
    assert (await period(conn, account))["tokens_used"] == 3_250
    await assert_reconciled(conn)


@pytest.mark.parametrize(
    "options",
    [
        {"statement_cache_size": 0},  # PgBouncer: Parse and Bind must share a transaction
        {"command_timeout": 30},  # its expiry mid-statement could not tell
    ],
    ids=["no-statement-cache", "command-timeout"],
)
async def test_connections_that_need_the_explicit_transaction_get_it(
    conn: asyncpg.Connection, db_dsn: str, options: dict[str, Any]
) -> None:
    single = await asyncpg.connect(db_dsn, **options)
    try:
        seen = logged(single)
        tracker = TokenTracker(single, retry=FAST_RETRY)
        account = await new_account(conn, 100_000)
        await lifecycle(tracker, account)
        assert await shape(seen) == ["BEGIN", "call", "COMMIT"] * 4
    finally:
        await single.close()
    await assert_reconciled(conn)


async def test_a_tracker_with_a_timeout_keeps_the_explicit_transaction(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    single = await asyncpg.connect(db_dsn)
    try:
        seen = logged(single)
        tracker = TokenTracker(single, retry=FAST_RETRY, timeout=5)
        account = await new_account(conn, 100_000)
        await tracker.try_reserve(account, uuid.uuid4(), 100)
        begin = f"{BEGIN}; SET LOCAL statement_timeout = 5000; SET LOCAL lock_timeout = 5000"
        assert (await shape(seen))[1:] == ["call", "COMMIT"]
        assert seen[0] == begin
    finally:
        await single.close()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_a_session_that_is_not_read_committed_is_called_in_read_committed(
    conn: asyncpg.Connection, db_dsn: str, isolation: str
) -> None:
    """The one statement does nothing outside READ COMMITTED (it answers NULL); the call is
    then made in an explicit READ COMMITTED transaction, once."""
    single = await asyncpg.connect(
        db_dsn, server_settings={"default_transaction_isolation": isolation}
    )
    try:
        seen = logged(single)
        tracker = TokenTracker(single, retry=FAST_RETRY)
        account = await new_account(conn, 100_000)
        report = await lifecycle(tracker, account)
        assert await shape(seen) == ["guarded", "BEGIN", "call", "COMMIT"] * 4
    finally:
        await single.close()
    state = await report_state(conn, report)
    assert state["status"] == "complete"
    assert len(state["steps"]) == 2
    assert [(e["kind"], e["tokens"]) for e in state["ledger"]] == [("report_billed", 3_000)]
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations") == 1
    await assert_reconciled(conn)


async def test_a_call_joining_the_callers_transaction_sends_only_the_call(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    single = await asyncpg.connect(db_dsn)
    try:
        tracker = TokenTracker(single, retry=FAST_RETRY)
        account = await new_account(conn, 100_000)
        async with single.transaction():
            seen = logged(single)
            await tracker.try_reserve(account, uuid.uuid4(), 100)
            assert await shape(seen) == ["call"]
    finally:
        await single.close()


async def test_create_pool_releases_without_the_reset_query(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    seen: list[str] = []

    async def init(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda record: seen.append(record.query))

    pool = await create_pool(db_dsn, min_size=1, max_size=1, init=init)
    default = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1, init=init)
    try:
        account = await new_account(conn, 100_000)
        seen.clear()
        await lifecycle(TokenTracker(pool, retry=FAST_RETRY), account)
        assert await shape(seen) == ["guarded"] * 4
        seen.clear()
        await lifecycle(TokenTracker(default, retry=FAST_RETRY), account)
        reset = default._holders[0]._con.get_reset_query()  # asyncpg's reset query
        assert reset
        assert await shape(seen) == ["guarded", reset] * 4
        # A transaction left open is still rolled back on release.
        async with pool.acquire() as leaky:
            await leaky.execute("BEGIN")
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
    finally:
        await pool.close()
        await default.close()
    await assert_reconciled(conn)


async def test_reset_nothing_is_the_default_only_when_reset_is_not_given(db_dsn: str) -> None:
    pool = await create_pool(db_dsn, min_size=0, max_size=1)
    mine = await create_pool(db_dsn, min_size=0, max_size=1, reset=None)
    try:
        assert pool._reset is reset_nothing
        assert mine._reset is None  # asyncpg's own reset
    finally:
        await pool.close()
        await mine.close()


async def test_the_explicit_transactions_lost_commit_answer_is_retried_safely(
    fault_proxy: FaultProxy, db_dsn: str, conn: asyncpg.Connection
) -> None:
    """Without the statement cache the idempotent calls are BEGIN/SELECT/COMMIT: a COMMIT
    whose answer is lost is retried, and the retry answers the first result."""
    pool = await asyncpg.create_pool(
        fault_proxy.dsn(db_dsn), min_size=1, max_size=4, statement_cache_size=0
    )
    try:
        proxied = TokenTracker(pool, retry=FAST_RETRY)
        account = await new_account(conn, 100_000)
        report_id = uuid.uuid4()
        fault_proxy.cut_after_commit()
        assert (await proxied.try_reserve(account, report_id, 5_000)).existing is True
        fault_proxy.cut_after_commit()
        assert (await proxied.persist_step(report_id, account, "AN0", 900, 100)).duplicate
        fault_proxy.cut_after_commit()
        settlement = await proxied.finish_report(report_id, account, "complete")
        assert (settlement.billed_tokens, settlement.already_finalized) == (1_000, True)
        assert fault_proxy.cuts == 3
    finally:
        await pool.close()
    state = await report_state(conn, report_id)
    assert [(e["kind"], e["tokens"]) for e in state["ledger"]] == [("report_billed", 1_000)]
    await assert_reconciled(conn)
