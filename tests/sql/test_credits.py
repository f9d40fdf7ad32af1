"""Contract Part 2: credits, adjustments and refunds (grant_credits, adjust_usage,
refund_report), the effective limit (budget_limit) and what reconcile explains of them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

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
    # One transaction: now() stays put, so the windows cannot turn under the test. The grant
    # that counts only today is given at the start of today's window (a minute ago is
    # yesterday in the first minute after midnight UTC).
    async with conn.transaction():
        account = await new_account(conn)
        day = await budget(conn, account, None, "day", 100)
        assert await effective_limit(conn, account, day) == 100
        start_of_today = await conn.fetchval(
            "SELECT (date_trunc('day', now(), 'UTC') - now())::text"
        )
        await insert_grant(conn, account, day, 10, start_of_today, None)  # counts
        await insert_grant(conn, account, day, 20, "-3 days", "-2 days")  # expired
        await insert_grant(conn, account, day, 40, "-3 days", "+1 day")  # overlaps, unexpired
        # Granted after tomorrow (a row written ahead): today's window ends before it starts.
        await insert_grant(conn, account, day, 80, "+2 days", "+3 days")
        assert await effective_limit(conn, account, day) == 150
        # Yesterday's window: of the unexpired grants only the 3-day-old one overlaps it (the
        # 10 was granted when it ended).
        yesterday = await conn.fetchval(
            "SELECT tokentrack.budget_limit($1, $2,"
            " date_trunc('day', now(), 'UTC') - interval '1 day')",
            account,
            day,
        )
        assert yesterday == 140
        assert (
            await conn.fetchval(
                "SELECT tokentrack.budget_limit($1, $2, now())", account, uuid.uuid4()
            )
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


# --------------------------------------------------------------------------------------------
# helpers of the correction tests
# --------------------------------------------------------------------------------------------


def key() -> str:
    return f"k-{uuid.uuid4()}"


async def grant(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    budget_id: uuid.UUID | None,
    amount: int | None,
    expires: str | None = None,
    idempotency_key: str | None = None,
    reason: str | None = "goodwill",
) -> dict[str, Any]:
    raw = await conn.fetchval(
        "SELECT tokentrack.grant_credits($1, $2, $3, now() + $4::text::interval, $5, $6)::text",
        account,
        budget_id,
        amount,
        expires,
        idempotency_key if idempotency_key is not None else key(),
        reason,
    )
    answer = json.loads(raw)
    assert isinstance(answer, dict)
    return answer


async def adjust(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    budget_id: uuid.UUID | None,
    delta: int | None,
    idempotency_key: str | None = None,
    reason: str | None = "correction",
) -> dict[str, Any]:
    return await call(
        conn,
        "adjust_usage",
        account,
        budget_id,
        delta,
        idempotency_key if idempotency_key is not None else key(),
        reason,
    )


async def refund(
    conn: asyncpg.Connection,
    report: uuid.UUID | None,
    account: uuid.UUID | None,
    idempotency_key: str | None = None,
    reason: str | None = "customer complaint",
) -> dict[str, Any]:
    return await call(
        conn,
        "refund_report",
        report,
        account,
        idempotency_key if idempotency_key is not None else key(),
        reason,
    )


async def window_used(conn: asyncpg.Connection, budget_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT COALESCE(sum(used), 0) FROM tokentrack.budget_windows WHERE budget_id = $1",
            budget_id,
        )
    )


async def tokens_used(conn: asyncpg.Connection, period_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT tokens_used FROM tokentrack.usage_periods WHERE id = $1", period_id
        )
    )


async def active_period(conn: asyncpg.Connection, account: uuid.UUID) -> uuid.UUID:
    value = await conn.fetchval(
        "SELECT id FROM tokentrack.usage_periods WHERE account_id = $1 AND status = 'active'",
        account,
    )
    assert isinstance(value, uuid.UUID)
    return value


async def billed_report(
    conn: asyncpg.Connection,
    account: uuid.UUID,
    tokens: int,
    subjects: list[str] | None = None,
    estimate: dict[str, Any] | None = None,
) -> uuid.UUID:
    """A report reserved (under subjects), with one step of ``tokens``, finished complete."""
    report, answer = await reserve_with(conn, account, estimate or {"tokens": tokens}, subjects)
    assert answer["success"] is True, answer
    recorded = await call(
        conn,
        "record_step",
        report,
        account,
        "s1",
        json.dumps({"input_tokens": tokens - tokens // 2, "output_tokens": tokens // 2}),
        None,
    )
    assert recorded["success"] is True, recorded
    finished = await call(conn, "finish_report", report, account, "complete", None)
    assert finished["success"] is True, finished
    return report


async def reconciled(conn: asyncpg.Connection) -> dict[str, Any]:
    answer = await call(conn, "reconcile", None)
    assert answer["ok"] is True, answer["discrepancies"]
    return answer


async def sqlstate(conn: asyncpg.Connection, sql: str, *args: Any) -> tuple[str, str]:
    """The SQLSTATE and COLUMN of the error a statement raises."""
    try:
        await conn.execute(sql, *args)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate), str(getattr(exc, "column_name", None))
    raise AssertionError(f"no error from {sql}")


# --------------------------------------------------------------------------------------------
# grant_credits
# --------------------------------------------------------------------------------------------


async def test_grant_credits_raises_the_limit_records_once_and_answers_duplicate(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    k = key()
    first = await grant(conn, account, day, 50, "1 day", k)
    assert first["success"] is True, first
    assert first["duplicate"] is False
    assert first["limit"] == 150
    assert first["amount"] == 50
    assert first["unit"] == "tokens"
    assert first["budget_id"] == str(day)
    again = await conn.fetchval(
        "SELECT tokentrack.grant_credits($1, $2, 50, $3::text::timestamptz, $4, 'goodwill')::text",
        account,
        day,
        first["expires_at"],
        k,
    )
    retry = json.loads(again)
    assert retry == {**first, "duplicate": True}
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.credit_grants") == 1
    # The limit of budget_changes is untouched: the grant is its own record.
    assert await conn.fetchval("SELECT limit_amount FROM tokentrack.budgets") == 100
    _, granted = await reserve_with(conn, account, {"tokens": 150})
    assert granted["success"] is True, granted
    await reconciled(conn)


async def test_grant_credits_same_key_other_arguments_is_an_idempotency_conflict(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    other = await budget(conn, account, "team:a", "day", 100)
    k = key()
    first = await grant(conn, account, day, 50, None, k)
    for changed in (
        grant(conn, account, day, 51, None, k),
        grant(conn, account, other, 50, None, k),
        grant(conn, account, day, 50, "1 day", k),
        grant(conn, account, day, 50, None, k, reason="other reason"),
    ):
        refused = await changed
        assert refused["success"] is False
        assert refused["error"] == "idempotency_conflict"
        assert refused["grant_id"] == first["grant_id"]
    # Keys are scoped per account: another account may use the same key.
    account2 = await new_account(conn)
    day2 = await budget(conn, account2, None, "day", 100)
    assert (await grant(conn, account2, day2, 50, None, k))["success"] is True
    # And per operation: an adjustment may use it too.
    assert (await adjust(conn, account, None, 5, k))["success"] is True
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.credit_grants") == 2


async def test_grant_credits_refusals(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    missing = await grant(conn, uuid.uuid4(), uuid.uuid4(), 10)
    assert missing["error"] == "account_not_found"
    no_budget = await grant(conn, account, uuid.uuid4(), 10)
    assert no_budget["error"] == "budget_not_found"
    # Another account's budget is not this account's.
    account2 = await new_account(conn)
    theirs = await budget(conn, account2, None, "day", 100)
    assert (await grant(conn, account, theirs, 10))["error"] == "budget_not_found"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.credit_grants") == 0


async def test_grant_credits_invalid_arguments(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    sql = "SELECT tokentrack.grant_credits($1, $2, $3, $4, $5, $6)"
    future = None
    cases = [
        ((None, day, 1, future, "k", "r"), ("22004", "p_account_id")),
        ((account, None, 1, future, "k", "r"), ("22004", "p_budget_id")),
        ((account, day, None, future, "k", "r"), ("22004", "p_amount")),
        ((account, day, 0, future, "k", "r"), ("22023", "p_amount")),
        ((account, day, -5, future, "k", "r"), ("22023", "p_amount")),
        ((account, day, 1, future, None, "r"), ("22004", "p_idempotency_key")),
        ((account, day, 1, future, " ", "r"), ("22023", "p_idempotency_key")),
        ((account, day, 1, future, "k" * 201, "r"), ("22001", "p_idempotency_key")),
        ((account, day, 1, future, "k", None), ("22004", "p_reason")),
        ((account, day, 1, future, "k", ""), ("22023", "p_reason")),
        ((account, day, 1, future, "k", "r" * 1001), ("22001", "p_reason")),
    ]
    for args, expected in cases:
        assert await sqlstate(conn, sql, *args) == expected, args
    past = await conn.fetchval("SELECT now() - interval '1 second'")
    assert await sqlstate(conn, sql, account, day, 1, past, "k", "r") == (
        "22023",
        "p_expires_at",
    )
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.credit_grants") == 0


async def test_a_retry_of_an_expired_grant_is_still_a_duplicate(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    await conn.execute(
        "INSERT INTO tokentrack.credit_grants"
        " (account_id, budget_id, amount, granted_at, expires_at, idempotency_key, reason)"
        " VALUES ($1, $2, 10, now() - interval '2 hours', now() - interval '1 hour', 'old', 'r')",
        account,
        day,
    )
    expires = await conn.fetchval("SELECT expires_at FROM tokentrack.credit_grants")
    retry = await call(conn, "grant_credits", account, day, 10, expires, "old", "r")
    assert retry["success"] is True
    assert retry["duplicate"] is True
    assert retry["limit"] == 100  # expired: it no longer counts


async def test_grant_on_a_cost_budget_and_a_total_budget(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    cost = await budget(conn, account, None, "month", 1_000, unit="cost_micros")
    prepaid = await budget(conn, account, "key:a", "total", 0)
    assert (await grant(conn, account, cost, 500))["limit"] == 1_500
    assert (await grant(conn, account, prepaid, 70))["limit"] == 70
    _, ok = await reserve_with(conn, account, {"tokens": 70, "cost_micros": 1_000}, ["key:a"])
    assert ok["success"] is True, ok
    _, refused = await reserve_with(conn, account, {"tokens": 1}, ["key:a"])
    assert refused["error"] == "insufficient_budget"
    assert refused["budget_id"] == str(prepaid)


# --------------------------------------------------------------------------------------------
# adjust_usage
# --------------------------------------------------------------------------------------------


async def test_adjust_usage_of_the_period_and_of_a_budget_window(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, limit=1_000)
    day = await budget(conn, account, None, "day", 100)
    period_id = await active_period(conn, account)
    up = await adjust(conn, account, None, 40)
    assert up["success"] is True, up
    assert up["period_id"] == str(period_id)
    assert up["budget_id"] is None
    assert up["window_start"] is None
    assert up["unit"] == "tokens"
    assert up["used"] == 40
    assert up["duplicate"] is False
    down = await adjust(conn, account, None, -15)
    assert down["used"] == 25
    assert await tokens_used(conn, period_id) == 25
    # A budget with no window row yet: a positive delta opens it.
    opened = await adjust(conn, account, day, 30)
    assert opened["budget_id"] == str(day)
    assert opened["period_id"] is None
    assert opened["used"] == 30
    assert opened["window_start"] is not None
    assert (await adjust(conn, account, day, -10))["used"] == 20
    assert await window_used(conn, day) == 20
    # The adjusted window counts in reserve: 100 - 20 left.
    _, refused = await reserve_with(conn, account, {"tokens": 81})
    assert refused["available"] == 80
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_adjustments") == 4
    await reconciled(conn)


async def test_adjust_usage_duplicate_and_idempotency_conflict(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    k = key()
    first = await adjust(conn, account, day, 7, k)
    retry = await adjust(conn, account, day, 7, k)
    assert retry == {**first, "duplicate": True}
    for changed in (
        adjust(conn, account, day, 8, k),
        adjust(conn, account, None, 7, k),
        adjust(conn, account, day, 7, k, reason="else"),
    ):
        refused = await changed
        assert refused["error"] == "idempotency_conflict"
        assert refused["adjustment_id"] == first["adjustment_id"]
    assert await window_used(conn, day) == 7
    pk = key()
    period_first = await adjust(conn, account, None, 3, pk)
    assert (await adjust(conn, account, None, 3, pk)) == {**period_first, "duplicate": True}
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_adjustments") == 2


async def test_adjust_usage_refuses_to_go_below_zero_and_other_refusals(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    below = await adjust(conn, account, None, -1)
    assert below["error"] == "negative_usage"
    assert below["used"] == 0
    assert below["delta"] == -1
    assert below["period_id"] == str(await active_period(conn, account))
    await adjust(conn, account, day, 5)
    window_below = await adjust(conn, account, day, -6)
    assert window_below["error"] == "negative_usage"
    assert window_below["budget_id"] == str(day)
    assert window_below["used"] == 5
    assert (await adjust(conn, uuid.uuid4(), None, 1))["error"] == "account_not_found"
    assert (await adjust(conn, account, uuid.uuid4(), 1))["error"] == "budget_not_found"
    no_period = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", no_period)
    assert (await adjust(conn, no_period, None, 1))["error"] == "no_active_period"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_adjustments") == 1
    await reconciled(conn)


async def test_adjust_usage_invalid_arguments(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    sql = "SELECT tokentrack.adjust_usage($1, $2, $3, $4, $5)"
    cases = [
        ((None, None, 1, "k", "r"), ("22004", "p_account_id")),
        ((account, None, None, "k", "r"), ("22004", "p_delta")),
        ((account, None, 0, "k", "r"), ("22023", "p_delta")),
        ((account, None, 1, None, "r"), ("22004", "p_idempotency_key")),
        ((account, None, 1, "", "r"), ("22023", "p_idempotency_key")),
        ((account, None, 1, "k" * 201, "r"), ("22001", "p_idempotency_key")),
        ((account, None, 1, "k", None), ("22004", "p_reason")),
        ((account, None, 1, "k", "  "), ("22023", "p_reason")),
        ((account, None, 1, "k", "r" * 1001), ("22001", "p_reason")),
    ]
    for args, expected in cases:
        assert await sqlstate(conn, sql, *args) == expected, args
    await adjust(conn, account, None, 5)
    assert await sqlstate(conn, sql, account, None, 2**63 - 1, "big", "r") == ("22003", "p_delta")
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.usage_adjustments") == 1


# --------------------------------------------------------------------------------------------
# refund_report
# --------------------------------------------------------------------------------------------


async def test_refund_takes_a_report_back_out_of_its_period_and_every_budget(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    await conn.execute(
        "SELECT tokentrack.set_model_price('m', '{\"input\": 1000000, \"output\": 2000000}')"
    )
    day = await budget(conn, account, None, "day", 10_000)
    team = await budget(conn, account, "team:a", "month", 10_000)
    cost = await budget(conn, account, None, "month", 10_000_000, unit="cost_micros")
    other = await budget(conn, account, "team:b", "day", 10_000)
    kept = await billed_report(conn, account, 50, ["team:a"], {"tokens": 100, "cost_micros": 1})
    report, reserved = await reserve_with(
        conn, account, {"tokens": 1_000, "cost_micros": 10_000}, ["team:a"]
    )
    assert reserved["success"] is True
    usage = json.dumps({"input_tokens": 100, "output_tokens": 20})
    await call(conn, "record_step", report, account, "priced", usage, "m")
    await call(conn, "record_step", report, account, "unpriced", usage, "unknown-model")
    await call(conn, "finish_report", report, account, "complete", None)
    period_id = await active_period(conn, account)
    before = {b: await window_used(conn, b) for b in (day, team, cost, other)}
    assert before == {day: 290, team: 290, cost: 140, other: 0}
    answer = await refund(conn, report, account, "r-1")
    assert answer["success"] is True, answer
    assert answer["tokens"] == 240
    assert answer["cost_micros"] == 140
    assert answer["duplicate"] is False
    assert answer["periods"] == [{"period_id": str(period_id), "tokens": 240}]
    assert sorted((w["budget_id"], w["unit"], w["amount"]) for w in answer["windows"]) == sorted(
        [(str(day), "tokens", 240), (str(team), "tokens", 240), (str(cost), "cost_micros", 140)]
    )
    after = {b: await window_used(conn, b) for b in (day, team, cost, other)}
    assert after == {day: 50, team: 50, cost: 0, other: 0}
    assert await tokens_used(conn, period_id) == 50
    # The report stays billed as it was: the refund is its own record.
    assert (
        await conn.fetchval(
            "SELECT (token_usage ->> 'totalTokens')::int FROM tokentrack.reports WHERE id = $1",
            report,
        )
        == 240
    )
    assert (
        await conn.fetchval(
            "SELECT reports_count FROM tokentrack.usage_periods WHERE id = $1", period_id
        )
        == 2
    )
    retry = await refund(conn, report, account, "r-1")
    assert retry == {**answer, "duplicate": True}
    again = await refund(conn, report, account, "r-2")
    assert again["error"] == "already_refunded"
    assert again["refund_id"] == answer["refund_id"]
    conflict = await refund(conn, kept, account, "r-1")
    assert conflict["error"] == "idempotency_conflict"
    assert conflict["refund_id"] == answer["refund_id"]
    conflict = await refund(conn, report, account, "r-1", reason="another")
    assert conflict["error"] == "idempotency_conflict"
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_refunds") == 1
    verdict = await reconciled(conn)
    assert verdict["corrections_checked"] == 1
    assert verdict["budgets_checked"] == 4


async def test_refund_of_a_report_billed_across_a_period_switch(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 10_000)
    old_period = await active_period(conn, account)
    report, reserved = await reserve_with(conn, account, {"tokens": 500})
    assert reserved["success"] is True
    await call(conn, "record_step", report, account, "a", json.dumps({"input_tokens": 60}), None)
    await call(conn, "open_usage_period", account, 5_000, None)
    new_period = await active_period(conn, account)
    await call(conn, "finish_report", report, account, "complete", None)
    # A late step after billing: into the reservation's (closed) period and its windows.
    late = await call(
        conn, "record_step", report, account, "late", json.dumps({"output_tokens": 40}), None
    )
    assert late["late"] is True
    await billed_report(conn, account, 7)  # billed into the new period
    assert await tokens_used(conn, old_period) == 100
    assert await tokens_used(conn, new_period) == 7
    answer = await refund(conn, report, account)
    assert answer["periods"] == [{"period_id": str(old_period), "tokens": 100}]
    assert answer["tokens"] == 100
    assert await tokens_used(conn, old_period) == 0
    assert await tokens_used(conn, new_period) == 7
    assert await window_used(conn, day) == 7
    await reconciled(conn)


async def test_refund_of_an_expired_reservation_billed_by_the_sweep(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve_with(conn, account, {"tokens": 500})
    await call(conn, "record_step", report, account, "a", json.dumps({"input_tokens": 9}), None)
    not_yet = await refund(conn, report, account)
    assert not_yet["error"] == "report_not_billed"
    await conn.execute(
        "UPDATE tokentrack.report_reservations SET created_at = now() - interval '3 hours',"
        " expires_at = now() - interval '1 hour' WHERE report_id = $1",
        report,
    )
    still = await refund(conn, report, account)
    assert still["error"] == "report_not_billed"  # past expiry, not swept yet
    await conn.execute("CALL tokentrack.sweep_expired_reservations()")
    answer = await refund(conn, report, account)
    assert answer["success"] is True, answer
    assert answer["tokens"] == 9
    assert answer["windows"] == []
    await reconciled(conn)


async def test_refund_refusals(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await billed_report(conn, account, 10)
    assert (await refund(conn, report, uuid.uuid4()))["error"] == "account_not_found"
    assert (await refund(conn, uuid.uuid4(), account))["error"] == "report_not_found"
    account2 = await new_account(conn)
    assert (await refund(conn, report, account2))["error"] == "report_account_mismatch"
    pending = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id, status) VALUES ($1, $2, 'pending')",
        pending,
        account,
    )
    never = await refund(conn, pending, account)
    assert never["error"] == "report_not_billed"
    assert "never billed" in never["message"]
    # An adjustment took the period below the report's share: refused, nothing written.
    await adjust(conn, account, None, -5)
    short = await refund(conn, report, account)
    assert short["error"] == "negative_usage"
    assert short["used"] == 5
    assert short["amount"] == 10
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_refunds") == 0
    await reconciled(conn)


async def test_refund_invalid_arguments(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await billed_report(conn, account, 10)
    sql = "SELECT tokentrack.refund_report($1, $2, $3, $4)"
    cases = [
        ((None, account, "k", "r"), ("22004", "p_report_id")),
        ((report, None, "k", "r"), ("22004", "p_account_id")),
        ((report, account, None, "r"), ("22004", "p_idempotency_key")),
        ((report, account, "", "r"), ("22023", "p_idempotency_key")),
        ((report, account, "k" * 201, "r"), ("22001", "p_idempotency_key")),
        ((report, account, "k", None), ("22004", "p_reason")),
        ((report, account, "k", " "), ("22023", "p_reason")),
        ((report, account, "k", "r" * 1001), ("22001", "p_reason")),
    ]
    for args, expected in cases:
        assert await sqlstate(conn, sql, *args) == expected, args
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_refunds") == 0


async def test_corrections_refuse_repeatable_read(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    for sql, args in (
        ("SELECT tokentrack.grant_credits($1, $2, 1, NULL, 'k', 'r')", (account, uuid.uuid4())),
        ("SELECT tokentrack.adjust_usage($1, NULL, 1, 'k', 'r')", (account,)),
        ("SELECT tokentrack.refund_report($1, $2, 'k', 'r')", (uuid.uuid4(), account)),
    ):
        async with conn.transaction(isolation="repeatable_read"):
            with pytest.raises(asyncpg.PostgresError) as raised:
                await conn.execute(sql, *args)
            assert raised.value.sqlstate == "25000"


async def test_correction_records_are_append_only(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 100)
    await grant(conn, account, day, 5)
    await adjust(conn, account, None, 5)
    await refund(conn, await billed_report(conn, account, 3), account)
    for table in ("credit_grants", "usage_adjustments", "report_refunds"):
        for statement in (
            f"UPDATE tokentrack.{table} SET reason = 'edited'",
            f"DELETE FROM tokentrack.{table}",
            f"TRUNCATE tokentrack.{table} CASCADE",
        ):
            with pytest.raises(asyncpg.PostgresError) as raised:
                await conn.execute(statement)
            assert raised.value.sqlstate == "55000", statement
        assert await conn.fetchval(f"SELECT count(*) FROM tokentrack.{table}") == 1


# --------------------------------------------------------------------------------------------
# reconcile
# --------------------------------------------------------------------------------------------


async def test_reconcile_is_ok_after_grants_adjustments_and_refunds(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 1_000)
    team = await budget(conn, account, "team:a", "total", 1_000)
    await grant(conn, account, day, 500)
    await grant(conn, account, team, 5, "1 hour")
    reports = [await billed_report(conn, account, 30 + n, ["team:a"]) for n in range(3)]
    await adjust(conn, account, day, 11)
    await adjust(conn, account, team, -4)
    await adjust(conn, account, None, 13)
    await refund(conn, reports[1], account)
    verdict = await reconciled(conn)
    assert verdict["corrections_checked"] == 6
    mine = await call(conn, "reconcile", account)
    assert mine["ok"] is True
    assert mine["corrections_checked"] == 6


async def test_reconcile_names_a_hand_edited_window_and_period(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    day = await budget(conn, account, None, "day", 1_000)
    report = await billed_report(conn, account, 40)
    await adjust(conn, account, day, 5)
    await refund(conn, report, account)
    period_id = await active_period(conn, account)
    await conn.execute("UPDATE tokentrack.budget_windows SET used = used + 3")
    await conn.execute("UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 2")
    # A budget's limit edited by hand is named too (grants are not in limit_amount).
    await conn.execute("UPDATE tokentrack.budgets SET limit_amount = 2000")
    verdict = await call(conn, "reconcile", None)
    assert verdict["ok"] is False
    found = {d["check"]: d for d in verdict["discrepancies"]}
    assert found["budget_used"]["expected"] == 5
    assert found["budget_used"]["actual"] == 8
    assert found["budget_used"]["budget_id"] == str(day)
    assert found["tokens_used"]["expected"] == 0
    assert found["tokens_used"]["actual"] == 2
    assert found["tokens_used"]["period_id"] == str(period_id)
    assert found["budget_limit"]["expected"] == 1_000
    assert len(verdict["discrepancies"]) == 3


async def test_reconcile_checks_a_refund_record_against_its_periods(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    # A refund row written by hand whose total disagrees with its periods.
    bad = await conn.fetchval(
        "INSERT INTO tokentrack.report_refunds"
        " (account_id, report_id, tokens, cost_micros, periods, windows, idempotency_key, reason)"
        " VALUES ($1, $2, 5, 0, '[]', '[]', 'hand', 'r') RETURNING id",
        account,
        uuid.uuid4(),
    )
    verdict = await call(conn, "reconcile", account)
    assert verdict["discrepancies"] == [
        {
            "account_id": str(account),
            "check": "refund_record",
            "expected": 0,
            "actual": 5,
            "refund_id": str(bad),
        }
    ]
