"""Credits, adjustments and refunds under real concurrency: several connections at once, held
at the lock each function takes first until all of them wait there, then released together."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import asyncpg
from test_credits import billed_report, budget, reconciled, reserve_with, window_used

from sqlkit import Connect, call, new_account

LANES = 10


async def until_waiting(
    conn: asyncpg.Connection, n: int, pending: list[asyncio.Future[Any]]
) -> None:
    """Wait until ``n`` other backends wait for a lock (each call started is queued there)."""
    deadline = time.monotonic() + 20
    while (
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        < n
    ):
        for task in pending:
            assert not task.done(), task.result()
        assert time.monotonic() < deadline, "the calls never queued on the lock"
        await asyncio.sleep(0.02)


async def released_together(
    conn: asyncpg.Connection, lock_sql: str, args: tuple[Any, ...], calls: list[Awaitable[Any]]
) -> list[Any]:
    """Hold ``lock_sql``'s lock on ``conn``, start ``calls``, wait for all of them to queue on
    it, release it, and return their results."""
    holding = conn.transaction()
    await holding.start()
    await conn.execute(lock_sql, *args)
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        await until_waiting(conn, len(tasks), tasks)
    finally:
        await holding.commit()
    return list(await asyncio.wait_for(asyncio.gather(*tasks), 60))


async def test_ten_concurrent_refunds_of_one_report_under_different_keys_refund_it_once(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    team = await budget(conn, account, "team:a", "day", 10_000)
    report = await billed_report(conn, account, 300, ["team:a"])
    await billed_report(conn, account, 20, ["team:a"])
    lanes = [await connect() for _ in range(LANES)]
    answers = await released_together(
        conn,
        "SELECT FROM tokentrack.report_reservations WHERE report_id = $1 FOR UPDATE",
        (report,),
        [call(c, "refund_report", report, account, f"key-{i}", "r") for i, c in enumerate(lanes)],
    )
    outcomes = Counter(a.get("error", "success") for a in answers)
    assert outcomes == {"success": 1, "already_refunded": LANES - 1}, answers
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_refunds") == 1
    assert await window_used(conn, team) == 20
    assert (
        await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
        )
        == 20
    )
    await reconciled(conn)


async def test_ten_concurrent_refunds_with_the_same_key_write_one_record(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    report = await billed_report(conn, account, 300)
    lanes = [await connect() for _ in range(LANES)]
    answers = await released_together(
        conn,
        "SELECT FROM tokentrack.report_reservations WHERE report_id = $1 FOR UPDATE",
        (report,),
        [call(c, "refund_report", report, account, "same", "r") for c in lanes],
    )
    assert all(a["success"] for a in answers), answers
    assert Counter(a["duplicate"] for a in answers) == {False: 1, True: LANES - 1}
    assert len({a["refund_id"] for a in answers}) == 1
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_refunds") == 1
    await reconciled(conn)


async def test_concurrent_grants_with_the_same_key_write_one_record(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    lanes = [await connect() for _ in range(LANES)]
    answers = await released_together(
        conn,
        "SELECT FROM tokentrack.budgets WHERE id = $1 FOR UPDATE",
        (day,),
        [call(c, "grant_credits", account, day, 25, None, "promo", "r") for c in lanes],
    )
    assert all(a["success"] for a in answers), answers
    assert Counter(a["duplicate"] for a in answers) == {False: 1, True: LANES - 1}
    assert {a["limit"] for a in answers} == {125}
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.credit_grants") == 1


async def test_concurrent_adjustments_with_the_same_key_adjust_once(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    lanes = [await connect() for _ in range(LANES)]
    answers = await released_together(
        conn,
        "SELECT FROM tokentrack.budgets WHERE id = $1 FOR UPDATE",
        (day,),
        [call(c, "adjust_usage", account, day, 9, "fix-1", "r") for c in lanes],
    )
    assert Counter(a["duplicate"] for a in answers) == {False: 1, True: LANES - 1}
    # A negative one to the period, ten times at once: the retries that waited are
    # duplicates, not refused for going below 0.
    await call(conn, "adjust_usage", account, None, 4, "up", "r")
    answers = await released_together(
        conn,
        "SELECT FROM tokentrack.usage_periods WHERE account_id = $1 FOR UPDATE",
        (account,),
        [call(c, "adjust_usage", account, None, -4, "down", "r") for c in lanes],
    )
    assert Counter(a["duplicate"] for a in answers) == {False: 1, True: LANES - 1}, answers
    assert await window_used(conn, day) == 9
    assert (
        await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods WHERE account_id = $1", account
        )
        == 0
    )
    await reconciled(conn)


async def test_refunds_grants_adjustments_and_billing_race_without_deadlock_and_reconcile(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """Refunds of billed reports, grants, adjustments of the same budgets, reservations and
    late steps, all at once: every call answers (no 40P01), and reconcile is ok after."""
    account = await new_account(conn, limit=10_000_000)
    team = await budget(conn, account, "team:a", "day", 1_000_000)
    whole = await budget(conn, account, None, "month", 1_000_000)
    billed = [await billed_report(conn, account, 100 + i, ["team:a"]) for i in range(6)]
    lanes = [await connect() for _ in range(12)]
    work: list[Awaitable[Any]] = []
    for i, report in enumerate(billed):
        work.append(call(lanes[i], "refund_report", report, account, f"r-{i}", "r"))
    work.append(call(lanes[6], "grant_credits", account, team, 100, None, "g", "r"))
    work.append(call(lanes[7], "adjust_usage", account, whole, 50, "a", "r"))
    work.append(call(lanes[8], "adjust_usage", account, None, 7, "p", "r"))
    work.append(reserve_with(lanes[9], account, {"tokens": 10}, ["team:a"]))
    for i in (0, 1):
        late = json.dumps({"input_tokens": 5})
        work.append(call(lanes[10 + i], "record_step", billed[i], account, "late", late, None))
    answers = await asyncio.wait_for(asyncio.gather(*work), 60)
    assert all((a[1] if isinstance(a, tuple) else a)["success"] for a in answers), answers
    verdict = await reconciled(conn)
    assert verdict["corrections_checked"] == 9
    # The late steps that raced the refunds are billed either way, exactly once each.
    refunded = await conn.fetchval("SELECT sum(tokens) FROM tokentrack.report_refunds")
    billed_total = sum(100 + i for i in range(6)) + 10
    assert refunded in {billed_total - 10, billed_total - 5, billed_total}
    assert await window_used(conn, team) == billed_total - refunded
    _ = uuid
