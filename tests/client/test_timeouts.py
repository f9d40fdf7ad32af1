"""Timeouts: the tracker's own (``timeout=``, applied on the server as ``SET LOCAL
statement_timeout`` and ``lock_timeout``) and the driver's (asyncpg's ``command_timeout``).

Each call here waits on a row lock that another connection holds, so that it runs into its
timeout at a known point. A server-side timeout rolls the call back (nothing written, for
every method); the driver's timeout is told apart from a lost connection, and while COMMIT
is in flight it says that the call may have committed (here it did).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from client_fixtures import FAST_RETRY, OwnServer
from sqlkit import Connect, assert_reconciled, expire, new_account, period, reserve, snapshot, step
from tokentrack_client import (
    DEFAULT_RETRY,
    CallTimeout,
    ConnectionLost,
    DatabaseError,
    RetryPolicy,
    TokenTracker,
    TransientError,
)

LOCK_PERIOD = (
    "SELECT 1 FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active' FOR UPDATE"
)
LOCK_RESERVATION = "SELECT 1 FROM tokentrack.report_reservations WHERE report_id = $1 FOR UPDATE"
LOCK_ACCOUNT = "SELECT 1 FROM tokentrack.accounts WHERE id = $1 FOR UPDATE"


async def locked(blocker: asyncpg.Connection, sql: str, key: uuid.UUID) -> asyncpg.Transaction:
    """Hold the row lock of ``sql`` in an open transaction of ``blocker``."""
    tx = blocker.transaction()
    await tx.start()
    assert await blocker.fetchval(sql, key) == 1
    return tx


Call = Callable[[TokenTracker, uuid.UUID, uuid.UUID], Awaitable[Any]]

# method: (the call, the lock it waits on, keyed by "account" or "report")
BLOCKED_CALLS: dict[str, tuple[Call, str, str]] = {
    "try_reserve": (lambda t, a, r: t.try_reserve(a, uuid.uuid4(), 100), LOCK_PERIOD, "account"),
    "persist_step": (
        lambda t, a, r: t.persist_step(r, a, "AN1", 7, 3),
        LOCK_RESERVATION,
        "report",
    ),
    "finalize": (lambda t, a, r: t.finalize(r, a), LOCK_RESERVATION, "report"),
    "finish_report": (
        lambda t, a, r: t.finish_report(r, a, "complete"),
        LOCK_RESERVATION,
        "report",
    ),
    "cancel_report": (lambda t, a, r: t.cancel_report(r, a), LOCK_PERIOD, "account"),
    "cleanup_expired_reservations": (
        lambda t, a, r: t.cleanup_expired_reservations(),
        LOCK_RESERVATION,
        "report",
    ),
    "increment_usage": (
        lambda t, a, r: t.increment_usage(a, 250, is_report=True),
        LOCK_PERIOD,
        "account",
    ),
    "open_usage_period": (lambda t, a, r: t.open_usage_period(a, 5_000), LOCK_ACCOUNT, "account"),
}


@pytest.mark.parametrize("method", list(BLOCKED_CALLS))
async def test_a_call_blocked_on_a_lock_raises_call_timeout_promptly_and_writes_nothing(
    pool: asyncpg.Pool[Any], conn: asyncpg.Connection, connect: Connect, method: str
) -> None:
    account = await new_account(conn, 10_000)
    report, answer = await reserve(conn, account, 1_000)
    assert answer["success"] is True
    assert (await step(conn, report, account, "AN0", 10, 5))["success"] is True
    if method == "cleanup_expired_reservations":
        await expire(conn, report)
    before = await snapshot(conn)
    run, lock, key = BLOCKED_CALLS[method]
    tx = await locked(await connect(), lock, account if key == "account" else report)
    tracker = TokenTracker(pool, retry=FAST_RETRY, timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(CallTimeout) as raised:
            await run(tracker, account, report)
        elapsed = time.monotonic() - started
    finally:
        await tx.rollback()
    assert 0.5 <= elapsed < 1.5, elapsed  # one attempt, ended by the server at 0.5 s
    error = raised.value
    assert error.sqlstate in ("57014", "55P03")
    assert isinstance(error.__cause__, asyncpg.QueryCanceledError | asyncpg.LockNotAvailableError)
    assert (error.attempts, error.outcome_unknown) == (1, False)
    assert "did not take effect" in str(error)
    assert isinstance(error, DatabaseError)
    assert not isinstance(error, TransientError)
    assert await snapshot(conn) == before
    await assert_reconciled(conn)


async def test_the_timeout_is_local_to_the_calls_transaction(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """One connection, no pool (whose reset would clear a session setting): after a call that
    timed out and one that committed, the session has no timeout of the tracker's."""
    single = await connect()
    tracker = TokenTracker(single, retry=FAST_RETRY)
    assert tracker.timeout is None
    account = await new_account(conn, 10_000)
    short = tracker.with_timeout(0.3)
    assert (short.timeout, tracker.timeout) == (0.3, None)
    tx = await locked(await connect(), LOCK_PERIOD, account)
    try:
        with pytest.raises(CallTimeout):
            await short.increment_usage(account, 10)
    finally:
        await tx.rollback()
    assert (await short.increment_usage(account, 10)).tokens_used == 10
    assert await single.fetchval("SHOW statement_timeout") == "0"
    assert await single.fetchval("SHOW lock_timeout") == "0"

    # Inside the caller's own transaction the call joins it and sets nothing.
    async with single.transaction():
        assert (await short.increment_usage(account, 5)).tokens_used == 15
        assert await single.fetchval("SHOW statement_timeout") == "0"


async def test_the_drivers_command_timeout_is_a_call_timeout_not_a_lost_connection(
    db_dsn: str, conn: asyncpg.Connection, connect: Connect
) -> None:
    """The issue: command_timeout=2 and a blocked lock ended after 10.3 s as ConnectionLost
    (TimeoutError is an OSError; each of 5 attempts waited out the timeout)."""
    one = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1, command_timeout=1)
    try:
        tracker = TokenTracker(one)
        assert tracker.retry_policy == DEFAULT_RETRY
        account = await new_account(conn, 10_000)
        before = await snapshot(conn)
        tx = await locked(await connect(), LOCK_PERIOD, account)
        started = time.monotonic()
        try:
            with pytest.raises(CallTimeout) as raised:
                await tracker.try_reserve(account, uuid.uuid4(), 100)
            elapsed = time.monotonic() - started
        finally:
            await tx.rollback()
        assert 1.0 <= elapsed < 2.0, elapsed
        error = raised.value
        assert not isinstance(error, ConnectionLost)
        assert isinstance(error.__cause__, TimeoutError)
        assert (error.sqlstate, error.attempts, error.outcome_unknown) == (None, 1, False)
        assert "driver's timeout expired before COMMIT" in str(error)
        assert await snapshot(conn) == before
        # The connection was kept and is clean: the next call on it works.
        assert (await tracker.try_reserve(account, uuid.uuid4(), 100)).reserved_tokens == 100
    finally:
        await one.close()


async def _wait_for_sync_rep(dsn: str) -> None:
    """Wait until commits with synchronous_commit=on wait for the (absent) standby: the
    checkpointer applies synchronous_standby_names shortly after the reload. (The probe
    writes a row: a transaction that wrote nothing does not wait.)"""
    probe = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "on"})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                await probe.execute("INSERT INTO public.sync_probe VALUES (1)", timeout=0.2)
            except TimeoutError:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("commits never waited for the synchronous standby")
    finally:
        probe.terminate()


async def test_the_drivers_timeout_during_commit_says_the_outcome_is_unknown(
    own_server: OwnServer,
) -> None:
    """A COMMIT that waits for a synchronous standby which never answers has committed
    locally: the driver's timeout then cannot know. CallTimeout says so, and is not
    retried for increment_usage (which, indeed, was counted)."""
    admin = await asyncpg.connect(own_server.dsn)
    pool = None
    try:
        account = await new_account(admin, 10_000)
        await admin.execute("CREATE TABLE IF NOT EXISTS public.sync_probe (x integer)")
        await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await admin.execute("SELECT pg_reload_conf()")
        await _wait_for_sync_rep(own_server.dsn)
        pool = await asyncpg.create_pool(
            own_server.dsn,
            min_size=1,
            max_size=1,
            command_timeout=0.5,
            server_settings={"synchronous_commit": "on"},
        )
        tracker = TokenTracker(pool, retry=FAST_RETRY)
        with pytest.raises(CallTimeout) as raised:
            await tracker.increment_usage(account, 77, is_report=True)
        error = raised.value
        assert (error.sqlstate, error.attempts, error.outcome_unknown) == (None, 1, True)
        assert "while COMMIT was in flight: it may or may not have taken effect" in str(error)
    finally:
        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
        if pool is not None:
            await pool.close()
    row = await period(admin, account)
    assert (row["tokens_used"], row["reports_count"]) == (77, 1)  # committed, once
    await assert_reconciled(admin)
    await admin.close()


async def test_timeouts_are_retried_only_when_the_policy_says_so(
    pool: asyncpg.Pool[Any],
    conn: asyncpg.Connection,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    account = await new_account(conn, 10_000)
    policy = RetryPolicy(initial_delay=0.01, max_delay=0.05, deadline=10.0, retry_timeouts=True)
    tracker = TokenTracker(pool, retry=policy, timeout=0.2)
    tx = await locked(await connect(), LOCK_PERIOD, account)
    with caplog.at_level(logging.WARNING, logger="tokentrack_client"):
        task = asyncio.ensure_future(tracker.increment_usage(account, 40))
        deadline = time.monotonic() + 5
        while not any("retrying" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the timeout was not retried"
            assert not task.done()
            await asyncio.sleep(0.01)
        await tx.rollback()
        used = await asyncio.wait_for(task, timeout=10)
    assert used.tokens_used == 40  # every timed-out attempt rolled back; the last one counted
    assert (await period(conn, account))["tokens_used"] == 40
    await assert_reconciled(conn)


BAD_TIMEOUTS: list[tuple[object, type[Exception]]] = [
    ("1", TypeError),
    (True, TypeError),
    (0, ValueError),
    (-1.0, ValueError),
    (float("inf"), ValueError),
    (3_000_000, ValueError),
]


@pytest.mark.parametrize(("seconds", "error"), BAD_TIMEOUTS)
async def test_a_bad_timeout_is_refused(
    pool: asyncpg.Pool[Any], seconds: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="timeout"):
        TokenTracker(pool, timeout=seconds)  # type: ignore[arg-type]
    with pytest.raises(error, match="timeout"):
        TokenTracker(pool).with_timeout(seconds)  # type: ignore[arg-type]
