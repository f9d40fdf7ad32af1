"""DBA review: the isolation level the billing functions assume (READ COMMITTED).

The functions wait for row locks and then read rows that the lock holders committed while
they waited: try_reserve_tokens sums the account's reservations after the period lock,
finalize/finish/the sweep sum the report's steps after the reservation lock. Under READ
COMMITTED each statement takes a new snapshot and sees those rows (shown below with real
blocked sessions). Under REPEATABLE READ or SERIALIZABLE the snapshot predates them: a
reservation would be granted beyond the limit and a step would stay unbilled behind a
completed reservation, silently (a SERIALIZABLE caller is not protected either when the
lock holder ran at READ COMMITTED). So they refuse those levels with SQLSTATE 25000 before
reading anything; increment_usage, open_usage_period and reconcile are safe at any level.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest

from sqlkit import call, new_account, reserve, snapshot, step

LEVELS = ("repeatable_read", "serializable")
SQL_LEVEL = {"repeatable_read": "repeatable read", "serializable": "serializable"}


async def wait_until_blocked_by(admin: asyncpg.Connection, waiter: int, holder: int) -> None:
    """Poll until backend ``waiter`` waits for a lock that backend ``holder`` holds."""
    deadline = time.monotonic() + 10
    while holder not in await admin.fetchval("SELECT pg_blocking_pids($1)", waiter):
        assert time.monotonic() < deadline, f"backend {waiter} never waited for {holder}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def running(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """An account with a running report (active reservation, one unbilled step)."""
    account = await new_account(conn, limit=10_000)
    report, answer = await reserve(conn, account, 1_000)
    assert answer["success"] is True
    assert (await step(conn, report, account, "outline", 10, 20))["success"] is True
    return account, report


def guarded_calls(account: uuid.UUID, report: uuid.UUID) -> dict[str, tuple[str, tuple[Any, ...]]]:
    return {
        "try_reserve_tokens": ("try_reserve_tokens", (account, uuid.uuid4(), 100)),
        "try_reserve_tokens again": ("try_reserve_tokens", (account, report, 1_000)),
        "persist_step_usage": ("persist_step_usage", (report, account, "draft", 1, 1, None, None)),
        "finalize_report_usage": ("finalize_report_usage", (report, account)),
        "finish_report": ("finish_report", (report, account, "complete", None)),
        "cleanup_expired_reservations": ("cleanup_expired_reservations", ()),
        "expire_reservations": ("expire_reservations", (10,)),
        "record_step": ("record_step", (report, account, "notes", '{"input_tokens": 1}', None)),
        "reserve": ("reserve", (account, uuid.uuid4(), '{"tokens": 1}', ["team:a"], "standard")),
        "extend_reservation": ("extend_reservation", (report, account, '{"tokens": 1}')),
        "set_budget": ("set_budget", (account, "team:a", "tokens", "day", 10, "{}")),
    }


@pytest.mark.parametrize("level", LEVELS)
async def test_the_billing_functions_refuse_repeatable_read_and_serializable(
    conn: asyncpg.Connection, connect: Any, running: tuple[uuid.UUID, uuid.UUID], level: str
) -> None:
    account, report = running
    before = await snapshot(conn)
    caller = await connect()
    for what, (function, args) in guarded_calls(account, report).items():
        with pytest.raises(asyncpg.InvalidTransactionStateError) as caught:
            async with caller.transaction(isolation=level):
                await call(caller, function, *args)
        assert caught.value.sqlstate == "25000", what
        assert "must run at READ COMMITTED" in str(caught.value), what
        assert SQL_LEVEL[level].upper() in str(caught.value), what

    # The batched sweep runs each batch in a transaction of the session's default level.
    await caller.execute(f"SET default_transaction_isolation = '{SQL_LEVEL[level]}'")
    with pytest.raises(asyncpg.InvalidTransactionStateError):
        await caller.execute("CALL tokentrack.sweep_expired_reservations(10)")
    await caller.execute("RESET default_transaction_isolation")
    assert await snapshot(conn) == before

    # The same calls at READ COMMITTED (explicitly, and by default) go through.
    async with caller.transaction(isolation="read_committed"):
        answer = await call(caller, "finish_report", report, account, "complete", None)
    assert answer["success"] is True
    assert answer["billed_tokens"] == 30


@pytest.mark.parametrize("level", LEVELS)
async def test_legacy_and_read_only_functions_work_at_any_level(
    conn: asyncpg.Connection, connect: Any, running: tuple[uuid.UUID, uuid.UUID], level: str
) -> None:
    # increment_usage locks the period and changes only that row (a concurrent change of it
    # is a 40001 at these levels, never a stale read); reconcile is one read-only statement.
    account, _ = running
    caller = await connect()
    async with caller.transaction(isolation=level):
        assert (await call(caller, "increment_usage", account, 5, False, False))["success"]
        assert (await call(caller, "reconcile", account))["ok"] is True
        assert (await call(caller, "open_usage_period", uuid.uuid4(), 100, None))["success"]


async def test_finalize_bills_a_step_committed_while_it_waited(
    conn: asyncpg.Connection, connect: Any, running: tuple[uuid.UUID, uuid.UUID]
) -> None:
    # READ COMMITTED at work: the step's transaction holds the reservation FOR SHARE;
    # finalize waits for it and, once it commits, its next statement sees the step.
    account, report = running
    stepper, finalizer = await connect(), await connect()
    async with stepper.transaction():
        assert (await step(stepper, report, account, "draft", 100, 200))["success"] is True
        billing = asyncio.create_task(call(finalizer, "finalize_report_usage", report, account))
        await wait_until_blocked_by(conn, finalizer.get_server_pid(), stepper.get_server_pid())
    answer = await billing
    assert answer["billed_tokens"] == 30 + 300
    unbilled = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.report_step_usage WHERE billed_at IS NULL"
    )
    assert unbilled == 0


async def test_a_reservation_sees_the_reservation_committed_while_it_waited(
    conn: asyncpg.Connection, connect: Any
) -> None:
    account = await new_account(conn, limit=1_000)
    first, second = await connect(), await connect()
    async with first.transaction():
        answer = await call(first, "try_reserve_tokens", account, uuid.uuid4(), 600)
        assert answer["success"] is True
        racing = asyncio.create_task(call(second, "try_reserve_tokens", account, uuid.uuid4(), 600))
        await wait_until_blocked_by(conn, second.get_server_pid(), first.get_server_pid())
    answer = await racing
    assert answer["success"] is False
    assert answer["error"] == "insufficient_tokens"
    assert answer["available_tokens"] == 400
