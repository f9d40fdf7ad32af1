"""Contract Part 2: credits, adjustments and refunds (grant_credits, adjust_usage,
refund_report), the effective limit (budget_limit) and what reconcile explains of them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from sqlkit import call, new_account


async def budget(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    subject: str | None,
    window: str,
    limit: int,
    unit: str = "tokens",
) -> uuid.UUID:
    answer = await call(conn, "set_budget", account, subject, unit, window, limit, "{}")
    assert answer["success"] is True, answer
    return uuid.UUID(answer["budget_id"])


async def reserve_with(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    estimate: dict[str, Any],
    subjects: list[str] | None = None,
    report: uuid.UUID | None = None,
) -> tuple[uuid.UUID, dict[str, Any]]:
    report = report or uuid.uuid4()
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[])::text",
        account,
        report,
        json.dumps(estimate),
        subjects or [],
    )
    return report, json.loads(raw)


async def effective_limit(
    conn: asyncpg.Connection, account: uuid.UUID, budget_id: uuid.UUID
) -> int:
    """budget_limit of the budget's current window."""
    return int(
        await conn.fetchval(
            "SELECT tokentrack.budget_limit(b.account_id, b.id, tokentrack.budget_window_start("
            "b.budget_window, b.timezone, b.created_at, now())) FROM tokentrack.budgets AS b"
            " WHERE b.account_id = $1 AND b.id = $2",
            account,
            budget_id,
        )
    )


async def insert_grant(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    budget_id: uuid.UUID,
    amount: int,
    granted: str,
    expires: str | None,
) -> None:
    """A grant row written as the owner with chosen times (a grant given in the past)."""
    await conn.execute(
        "INSERT INTO tokentrack.credit_grants"
        " (account_id, budget_id, amount, granted_at, expires_at, idempotency_key, reason)"
        " VALUES ($1, $2, $3, now() + $4::text::interval, now() + $5::text::interval, $6, 'test')",
        account,
        budget_id,
        amount,
        granted,
        expires,
        str(uuid.uuid4()),
    )


# --------------------------------------------------------------------------------------------
# budget_limit
# --------------------------------------------------------------------------------------------


async def test_budget_limit_counts_unexpired_grants_that_overlap_the_window(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    assert await effective_limit(conn, account, day) == 100
    await insert_grant(conn, account, day, 10, "-1 minute", None)  # counts
    await insert_grant(conn, account, day, 20, "-3 days", "-2 days")  # expired
    await insert_grant(conn, account, day, 40, "-3 days", "+1 day")  # overlaps, unexpired
    # Granted tomorrow (a row written ahead): today's window ends before it starts.
    await insert_grant(conn, account, day, 80, "+2 days", "+3 days")
    assert await effective_limit(conn, account, day) == 150
    # Yesterday's window: of the unexpired grants only the 3-day-old one overlaps it (the
    # 10 was granted after it ended).
    yesterday = await conn.fetchval(
        "SELECT tokentrack.budget_limit($1, $2,"
        " date_trunc('day', now(), 'UTC') - interval '1 day')",
        account,
        day,
    )
    assert yesterday == 140
    assert (
        await conn.fetchval("SELECT tokentrack.budget_limit($1, $2, now())", account, uuid.uuid4())
        is None
    )


async def test_budget_limit_total_budget_counts_every_unexpired_grant(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    total = await budget(conn, account, "key:prepaid", "total", 5)
    await insert_grant(conn, account, total, 7, "+1 day", None)
    await insert_grant(conn, account, total, 11, "-1 day", "-1 hour")
    assert await effective_limit(conn, account, total) == 12


async def test_budget_limit_is_capped_at_the_bigint_maximum(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 9_223_372_036_854_775_000)
    await insert_grant(conn, account, day, 9_223_372_036_854_775_000, "-1 minute", None)
    assert await effective_limit(conn, account, day) == 9_223_372_036_854_775_807


async def test_reserve_and_extend_use_the_effective_limit_and_expired_grants_stop_counting(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    await insert_grant(conn, account, day, 50, "-1 hour", "-1 minute")  # expired: no effect
    _, refused = await reserve_with(conn, account, {"tokens": 120})
    assert refused["error"] == "insufficient_budget"
    assert refused["available"] == 100
    await insert_grant(conn, account, day, 50, "-1 minute", "+1 hour")
    report, granted = await reserve_with(conn, account, {"tokens": 120})
    assert granted["success"] is True, granted
    assert granted["budgets"][0]["available"] == 30
    extended = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 30}))
    assert extended["success"] is True, extended
    assert extended["budgets"][0]["available"] == 0
    more = await call(conn, "extend_reservation", report, account, json.dumps({"tokens": 1}))
    assert more["error"] == "insufficient_budget"
    health = json.loads(await conn.fetchval("SELECT tokentrack.health()::text"))
    nearest = [n for n in health["budgets"]["nearest"] if n["budget_id"] == str(day)]
    assert nearest[0]["limit"] == 150
    assert health["budgets"]["exhausted"] >= 1
