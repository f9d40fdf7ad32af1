"""Transient failures: backends terminated mid-call, a COMMIT whose answer is lost,
serialization failures and deadlocks. Retries must leave every report billed exactly once."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Any

import asyncpg
import pytest

from client_fixtures import FAST_RETRY, FaultProxy, report_state, wait_for_backend
from sqlkit import Connect, assert_reconciled, new_account, period
from tokentrack_client import (
    DEFAULT_RETRY,
    NO_RETRY,
    ConnectionLost,
    DatabaseError,
    RetryPolicy,
    TokenTracker,
    TransientError,
)


async def hold_period_lock(blocker: asyncpg.Connection, account: uuid.UUID) -> asyncpg.Transaction:
    """Lock the account's active period row in an open transaction of ``blocker``."""
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute(
        "SELECT 1 FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active'"
        " FOR UPDATE",
        account,
    )
    return tx


async def kill_mid_call(
    conn: asyncpg.Connection,
    blocker: asyncpg.Connection,
    account: uuid.UUID,
    function: str,
    call: Any,
) -> Any:
    """Run ``call`` while its backend waits behind ``blocker``'s lock; terminate that backend,
    wait until the retry waits again (on a new backend), release, and return the result."""
    tx = await hold_period_lock(blocker, account)
    task = asyncio.ensure_future(call)
    first = await wait_for_backend(conn, function)
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", first)
    second = await wait_for_backend(conn, function, exclude={first})
    assert second != first
    await tx.rollback()
    return await asyncio.wait_for(task, timeout=30)


async def test_try_reserve_survives_its_backend_being_killed(
    tracker: TokenTracker, conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, 10_000)
    report_id = uuid.uuid4()
    reservation = await kill_mid_call(
        conn,
        await connect(),
        account,
        "try_reserve_tokens",
        tracker.try_reserve(account, report_id, 4_000),
    )
    assert (reservation.reserved_tokens, reservation.available_tokens) == (4_000, 6_000)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations") == 1


async def test_finalize_killed_mid_call_bills_exactly_once(
    tracker: TokenTracker, conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 10_000)
    for name, tokens in (("AN0", 1_200), ("AN2", 3_400), ("AN5", 2_100)):
        await tracker.persist_step(report_id, account, name, tokens, 100)
    settlement = await kill_mid_call(
        conn,
        await connect(),
        account,
        "finish_report",
        tracker.finish_report(report_id, account, "complete"),
    )
    assert (settlement.billed_tokens, settlement.already_finalized) == (7_000, False)
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    assert [(e["kind"], e["tokens"]) for e in state["ledger"]] == [("report_billed", 7_000)]
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (7_000, 1)
    await assert_reconciled(conn)


async def test_increment_usage_killed_before_commit_is_retried_and_counted_once(
    tracker: TokenTracker, conn: asyncpg.Connection, connect: Connect
) -> None:
    """Killed while its statement waited, the transaction certainly rolled back: even the
    non-idempotent increment_usage may be (and is) retried."""
    account = await new_account(conn, 100_000)
    used = await kill_mid_call(
        conn, await connect(), account, "increment_usage", tracker.increment_usage(account, 250)
    )
    assert used.tokens_used == 250
    assert (await period(conn, account))["tokens_used"] == 250
    entries = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.usage_ledger WHERE account_id = $1", account
    )
    assert entries == 1
    await assert_reconciled(conn)


async def test_a_single_connection_that_is_killed_raises_connection_lost(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, 10_000)
    blocker = await connect()
    tracker = TokenTracker(await connect(), retry=FAST_RETRY)
    tx = await hold_period_lock(blocker, account)
    task = asyncio.ensure_future(tracker.try_reserve(account, uuid.uuid4(), 100))
    pid = await wait_for_backend(conn, "try_reserve_tokens")
    await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    with pytest.raises(ConnectionLost) as raised:
        await asyncio.wait_for(task, timeout=30)
    await tx.rollback()
    assert raised.value.outcome_unknown is False
    assert raised.value.attempts == 1
    assert isinstance(raised.value.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations") == 0


# --------------------------------------------------------------------------------------------
# The answer of a COMMIT lost on the way back (the FaultProxy cuts the connection)
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def proxied(fault_proxy: FaultProxy, db_dsn: str) -> Any:
    pool = await asyncpg.create_pool(fault_proxy.dsn(db_dsn), min_size=1, max_size=4)
    try:
        yield TokenTracker(pool, retry=FAST_RETRY)
    finally:
        await pool.close()


async def test_idempotent_calls_whose_commit_answer_is_lost_are_retried_safely(
    proxied: TokenTracker, fault_proxy: FaultProxy, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()

    fault_proxy.cut_after_commit()
    reservation = await proxied.try_reserve(account, report_id, 5_000)
    assert reservation.existing is True  # the first attempt committed; the retry found it

    fault_proxy.cut_after_commit()
    step = await proxied.persist_step(report_id, account, "AN0", 900, 100)
    assert step.duplicate is True

    fault_proxy.cut_after_commit()
    settlement = await proxied.finish_report(report_id, account, "complete")
    assert (settlement.billed_tokens, settlement.already_finalized) == (1_000, True)
    assert fault_proxy.cuts == 3

    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    assert len(state["steps"]) == 1
    assert [(e["kind"], e["tokens"]) for e in state["ledger"]] == [("report_billed", 1_000)]
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (1_000, 1)
    await assert_reconciled(conn)


async def test_increment_usage_whose_commit_answer_is_lost_is_not_repeated(
    proxied: TokenTracker, fault_proxy: FaultProxy, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    fault_proxy.cut_after_commit()
    with pytest.raises(ConnectionLost) as raised:
        await proxied.increment_usage(account, 300, is_report=True)
    assert raised.value.outcome_unknown is True
    assert raised.value.attempts == 1
    assert fault_proxy.cuts == 1
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (300, 1)  # it did commit, once
    await assert_reconciled(conn)


async def test_an_unreachable_server_raises_connection_lost_after_the_retries(
    fault_proxy: FaultProxy, db_dsn: str
) -> None:
    pool = await asyncpg.create_pool(fault_proxy.dsn(db_dsn), min_size=0, max_size=2)
    try:
        await fault_proxy.close()  # nobody listens on the port any more
        tracker = TokenTracker(pool, retry=RetryPolicy(max_attempts=3, initial_delay=0.001))
        with pytest.raises(ConnectionLost) as raised:
            await tracker.reconcile()
        assert raised.value.attempts == 3
        assert "could not get a connection" in str(raised.value)
    finally:
        await pool.close()


# --------------------------------------------------------------------------------------------
# Serialization failures and deadlocks: the server rolled back, any call is retried
# --------------------------------------------------------------------------------------------


async def fail_ledger_inserts(conn: asyncpg.Connection, sqlstate: str, times: int) -> None:
    """Make the next ``times`` ledger inserts fail with ``sqlstate`` (a sequence counts the
    attempts outside the transactions that roll back)."""
    await conn.execute("CREATE SEQUENCE public.fault_attempts")
    await conn.execute(
        f"""
        CREATE FUNCTION public.inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('public.fault_attempts') <= {times} THEN
                RAISE EXCEPTION 'injected fault' USING ERRCODE = '{sqlstate}';
            END IF;
            RETURN NEW;
        END $$
        """
    )
    await conn.execute(
        "CREATE TRIGGER inject_fault BEFORE INSERT ON tokentrack.usage_ledger"
        " FOR EACH ROW EXECUTE FUNCTION public.inject_fault()"
    )


async def attempts_made(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT last_value FROM public.fault_attempts"))


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
async def test_rolled_back_transactions_are_retried_even_for_increment_usage(
    tracker: TokenTracker,
    conn: asyncpg.Connection,
    sqlstate: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    account = await new_account(conn, 100_000)
    await fail_ledger_inserts(conn, sqlstate, times=2)
    with caplog.at_level(logging.WARNING, logger="tokentrack_client"):
        used = await tracker.increment_usage(account, 120)
    assert used.tokens_used == 120
    assert await attempts_made(conn) == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2
    assert (await period(conn, account))["tokens_used"] == 120
    await assert_reconciled(conn)


async def test_a_failure_that_outlives_the_retries_is_raised_as_transient(
    pool: asyncpg.Pool[Any], conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    await fail_ledger_inserts(conn, "40001", times=100)
    tracker = TokenTracker(pool, retry=RetryPolicy(max_attempts=4, initial_delay=0.001))
    with pytest.raises(TransientError) as raised:
        await tracker.increment_usage(account, 10)
    assert (raised.value.attempts, raised.value.sqlstate) == (4, "40001")
    assert isinstance(raised.value.__cause__, asyncpg.SerializationError)
    assert await attempts_made(conn) == 4

    once = TokenTracker(pool, retry=NO_RETRY)
    with pytest.raises(TransientError):
        await once.increment_usage(account, 10)
    assert await attempts_made(conn) == 5
    assert (await period(conn, account))["tokens_used"] == 0


async def test_other_errors_are_not_retried(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    await fail_ledger_inserts(conn, "23514", times=1)
    with pytest.raises(DatabaseError) as raised:
        await tracker.increment_usage(account, 10)
    assert not isinstance(raised.value, TransientError)
    assert raised.value.sqlstate == "23514"
    assert await attempts_made(conn) == 1


# --------------------------------------------------------------------------------------------
# The backoff itself
# --------------------------------------------------------------------------------------------


def test_backoff_is_bounded_exponential_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=10, initial_delay=0.05, max_delay=1.0, multiplier=2.0)
    ceilings = [policy.backoff_ceiling(n) for n in range(1, 10)]
    assert ceilings[:5] == [0.05, 0.1, 0.2, 0.4, 0.8]
    assert ceilings[5:] == [1.0] * 4
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(1, 10) for _ in range(20)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert len(set(delays)) == len(delays)  # jittered: no two pauses alike
    assert policy.backoff_ceiling(10_000) == 1.0


def test_the_default_policy_keeps_retrying_until_its_60_second_deadline() -> None:
    """The issue: the defaults allowed at most 0.75 s of pauses (5 attempts) while the docs
    said about 4 s; a 22 s outage ended the report's step in ConnectionLost."""
    assert (DEFAULT_RETRY.deadline, DEFAULT_RETRY.max_attempts) == (60.0, None)
    assert DEFAULT_RETRY.retry_timeouts is False
    rng = random.Random(11)
    elapsed, attempt, pauses = 0.0, 0, []
    while (pause := DEFAULT_RETRY.pause_after(attempt + 1, elapsed, rng)) is not None:
        attempt += 1
        pauses.append(pause)
        elapsed += pause  # attempts that fail at once (connection refused)
    assert elapsed == pytest.approx(60.0)  # the last pause ends exactly at the deadline
    assert max(pauses) <= DEFAULT_RETRY.max_delay
    assert attempt > 30  # a server that is back is tried again within 2 s
    assert sum(pauses[:-1]) < 60.0


class TopDraw(random.Random):
    """Draws the largest pause every time."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_deadline_and_max_attempts_both_bound_the_retries() -> None:
    policy = RetryPolicy(initial_delay=10.0, max_delay=10.0, deadline=1.0)
    always_top = TopDraw()
    assert policy.pause_after(1, 0.25, always_top) == pytest.approx(0.75)  # shortened
    assert policy.pause_after(5, 1.0, always_top) is None  # the deadline has passed
    counted = RetryPolicy(max_attempts=3, deadline=None)
    assert counted.pause_after(2, 1e9) is not None
    assert counted.pause_after(3, 0.0) is None
    assert NO_RETRY.max_attempts == 1
    assert NO_RETRY.pause_after(1, 0.0) is None
    assert RetryPolicy(max_attempts=3).pause_after(3, 0.0) is None  # the count, within 60 s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": -1.0},
        {"max_delay": float("inf")},
        {"multiplier": 0.5},
        {"deadline": -1.0},
        {"deadline": float("nan")},
        {"deadline": None},  # with max_attempts None: it would retry forever
        {"retry_timeouts": 1},
    ],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)
