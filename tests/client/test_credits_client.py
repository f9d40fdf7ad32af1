"""Credits, adjustments and refunds through the client: ``grant_credits``, ``adjust_usage``
and ``refund_report`` with their typed results and refusals, against a real database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from sqlkit import assert_reconciled, new_account
from tokentrack_client import (
    AccountNotFound,
    AlreadyRefunded,
    BudgetNotFound,
    CreditGrant,
    IdempotencyConflict,
    InvalidArgument,
    NegativeUsage,
    NoActivePeriod,
    Refund,
    RefundPeriod,
    ReportAccountMismatch,
    ReportNotBilled,
    ReportNotFound,
    TokenTracker,
    UsageAdjustment,
)

TEAM = "team:research"


async def _billed(tracker: TokenTracker, account: uuid.UUID, tokens: int) -> uuid.UUID:
    report = uuid.uuid4()
    async with tracker.track_report(account, report, tokens, subjects=[TEAM]) as tracked:
        await tracked.step("s", input_tokens=tokens, output_tokens=0)
    return report


async def test_grant_credits_returns_a_credit_grant_and_retries_are_duplicates(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    budget = await tracker.set_budget(account, TEAM, "tokens", "day", 100)
    until = datetime.now(UTC) + timedelta(days=2)
    grant = await tracker.grant_credits(
        account, budget.budget_id, 40, expires_at=until, idempotency_key="g", reason="promo"
    )
    assert isinstance(grant, CreditGrant)
    assert (grant.budget_id, grant.unit, grant.amount, grant.limit) == (
        budget.budget_id,
        "tokens",
        40,
        140,
    )
    assert grant.expires_at == until
    assert grant.duplicate is False
    again = await tracker.grant_credits(
        account, str(budget.budget_id), 40, expires_at=until, idempotency_key="g", reason="promo"
    )
    assert again.duplicate is True
    assert again.grant_id == grant.grant_id
    with pytest.raises(IdempotencyConflict) as conflict:
        await tracker.grant_credits(
            account, budget.budget_id, 41, expires_at=until, idempotency_key="g", reason="promo"
        )
    assert conflict.value.record_id == grant.grant_id
    with pytest.raises(BudgetNotFound):
        await tracker.grant_credits(
            account, uuid.uuid4(), 1, idempotency_key="other", reason="promo"
        )
    with pytest.raises(AccountNotFound):
        await tracker.grant_credits(uuid.uuid4(), uuid.uuid4(), 1, idempotency_key="x", reason="y")
    reservation = await tracker.try_reserve(account, uuid.uuid4(), 140, subjects=[TEAM])
    assert reservation.budgets[0].available == 0


async def test_adjust_usage_returns_a_usage_adjustment_and_refuses_below_zero(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    budget = await tracker.set_budget(account, None, "cost_micros", "month", 1_000)
    window = await tracker.adjust_usage(
        account, 250, budget_id=budget.budget_id, idempotency_key="a", reason="missed charge"
    )
    assert isinstance(window, UsageAdjustment)
    assert (window.budget_id, window.unit, window.delta, window.used, window.period_id) == (
        budget.budget_id,
        "cost_micros",
        250,
        250,
        None,
    )
    assert window.window_start is not None
    period = await tracker.adjust_usage(account, 30, idempotency_key="p", reason="missed")
    assert (period.budget_id, period.window_start, period.unit, period.used) == (
        None,
        None,
        "tokens",
        30,
    )
    assert period.period_id is not None
    with pytest.raises(NegativeUsage) as below:
        await tracker.adjust_usage(account, -31, idempotency_key="q", reason="too much")
    assert (below.value.used, below.value.period_id) == (30, period.period_id)
    with pytest.raises(IdempotencyConflict):
        await tracker.adjust_usage(account, 31, idempotency_key="p", reason="missed")
    assert (await tracker.adjust_usage(account, 30, idempotency_key="p", reason="missed")).duplicate
    nobody = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", nobody)
    with pytest.raises(NoActivePeriod):
        await tracker.adjust_usage(nobody, 1, idempotency_key="n", reason="r")
    for bad in (0, True, 1.5, None):
        with pytest.raises(InvalidArgument) as invalid:
            await tracker.adjust_usage(account, bad, idempotency_key="z", reason="r")  # type: ignore[arg-type]
        assert invalid.value.argument == "delta"
    await assert_reconciled(conn)


async def test_refund_report_returns_a_refund_and_its_refusals(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    budget = await tracker.set_budget(account, TEAM, "tokens", "day", 1_000)
    report = await _billed(tracker, account, 120)
    period_id = await conn.fetchval(
        "SELECT id FROM tokentrack.usage_periods WHERE account_id = $1", account
    )
    refund = await tracker.refund_report(report, account, idempotency_key="r", reason="bug")
    assert isinstance(refund, Refund)
    assert (refund.report_id, refund.tokens, refund.cost_micros, refund.duplicate) == (
        report,
        120,
        0,
        False,
    )
    assert refund.periods == (RefundPeriod(period_id, 120),)
    assert refund.refunded_at <= datetime.now(UTC)
    assert [(w.budget_id, w.unit, w.amount) for w in refund.windows] == [
        (budget.budget_id, "tokens", 120)
    ]
    retry = await tracker.refund_report(report, account, idempotency_key="r", reason="bug")
    assert retry == Refund(**{**refund.__dict__, "duplicate": True})
    with pytest.raises(AlreadyRefunded) as twice:
        await tracker.refund_report(report, account, idempotency_key="r2", reason="bug")
    assert twice.value.refund_id == refund.refund_id
    with pytest.raises(ReportNotFound):
        await tracker.refund_report(uuid.uuid4(), account, idempotency_key="r3", reason="bug")
    other = await new_account(conn)
    with pytest.raises(ReportAccountMismatch):
        await tracker.refund_report(report, other, idempotency_key="r4", reason="bug")
    running = uuid.uuid4()
    await tracker.try_reserve(account, running, 10)
    with pytest.raises(ReportNotBilled):
        await tracker.refund_report(running, account, idempotency_key="r5", reason="bug")
    with pytest.raises(InvalidArgument) as invalid:
        await tracker.refund_report(report, account, idempotency_key=" ", reason="bug")
    assert invalid.value.argument == "idempotency_key"
    with pytest.raises(InvalidArgument) as invalid:
        await tracker.refund_report(report, account, idempotency_key="k", reason="x" * 1001)
    assert invalid.value.argument == "reason"
    await assert_reconciled(conn)
