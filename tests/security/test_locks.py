"""DBA review: two concurrent sweeps with disjoint batches never deadlock on period rows.

A sweep (expire_reservations) is the only caller that holds several period rows at once. It
settles its batch in (period_id, id) order, so every holder of two periods takes them in
ascending order. The test builds the interleaving in which a sweep that settled its batch in
the order it chose it deadlocked: sweep 1 holds reservations r1 (low period) and r2 (high
period), has locked the low period and waits (for a report row held by another session);
meanwhile r3 (high) and r4 (low) turn out to be longer expired, and sweep 2 takes them. Settled
in that order, sweep 2 locked the high period and then waited for the low one, which sweep 1
held while it next wanted the high one: SQLSTATE 40P01. In (period_id, id) order both finish,
and every reservation is billed once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg

from sqlkit import assert_reconciled, call, expire, new_account, reserve, step


async def wait_until_blocked_by(admin: asyncpg.Connection, waiter: int, holder: int) -> None:
    """Poll until backend ``waiter`` waits for a lock that backend ``holder`` holds."""
    deadline = time.monotonic() + 10
    while holder not in await admin.fetchval("SELECT pg_blocking_pids($1)", waiter):
        assert time.monotonic() < deadline, f"backend {waiter} never waited for {holder}"
        await asyncio.sleep(0.01)


async def test_two_sweeps_with_disjoint_batches_do_not_deadlock(
    conn: asyncpg.Connection, connect: Any
) -> None:
    accounts = [await new_account(conn), await new_account(conn)]
    periods = {
        a: await conn.fetchval(
            "SELECT id FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active'",
            a,
        )
        for a in accounts
    }
    low, high = sorted(accounts, key=lambda a: periods[a])

    async def running_report(account: uuid.UUID, reservation_id: str) -> uuid.UUID:
        report, answer = await reserve(conn, account, 100)
        assert answer["success"] is True
        assert (await step(conn, report, account, "outline", 1, 2))["success"] is True
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET id = $2 WHERE report_id = $1",
            report,
            uuid.UUID(reservation_id),
        )
        return report

    r1 = await running_report(low, "00000000-0000-0000-0000-000000000011")
    r2 = await running_report(high, "00000000-0000-0000-0000-000000000012")
    r3 = await running_report(high, "00000000-0000-0000-0000-000000000001")
    r4 = await running_report(low, "00000000-0000-0000-0000-000000000002")
    await expire(conn, r1)  # expired an hour ago
    await expire(conn, r2)

    async def expired_hours_ago(report: uuid.UUID, hours: int) -> None:
        await conn.execute(
            "UPDATE tokentrack.report_reservations SET created_at = now() - interval '5 hours',"
            " expires_at = now() - make_interval(hours => $2) WHERE report_id = $1",
            report,
            hours,
        )

    holder, sweep1, sweep2 = await connect(), await connect(), await connect()
    async with holder.transaction():
        await holder.execute("SELECT FROM tokentrack.reports WHERE id = $1 FOR UPDATE", r1)
        first = asyncio.create_task(call(sweep1, "expire_reservations", 2))
        await wait_until_blocked_by(conn, sweep1.get_server_pid(), holder.get_server_pid())
        # Longer expired than r1 and r2: sweep 2's batch is r3, r4 (disjoint from sweep 1's).
        await expired_hours_ago(r3, 3)
        await expired_hours_ago(r4, 2)
        second = asyncio.create_task(call(sweep2, "expire_reservations", 2))
        await wait_until_blocked_by(conn, sweep2.get_server_pid(), sweep1.get_server_pid())
    answers = await asyncio.gather(first, second)  # a deadlock raises 40P01 here

    assert sum(a["expired"] for a in answers) == 4
    assert sum(a["billed_tokens"] for a in answers) == 4 * 3
    statuses = await conn.fetch(
        "SELECT status, billed_tokens FROM tokentrack.report_reservations"
        " WHERE report_id = ANY($1)",
        [r1, r2, r3, r4],
    )
    assert [(r["status"], r["billed_tokens"]) for r in statuses] == [("expired", 3)] * 4
    await assert_reconciled(conn)
