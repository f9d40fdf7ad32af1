"""Budgets through the client: ``try_reserve`` with subjects, a mode and a cost estimate
(``tokentrack.reserve``), ``InsufficientBudget`` naming the budget that refused,
``extend_reservation`` and ``ReportTracker.extend``, ``set_budget``, and overrun
(``StepRecord.over_reservation``, ``track_report(on_overrun="raise")`` and
``ReservationExceeded``), against a real database."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import pytest

import tokentrack_client
from client_fixtures import FAST_RETRY, FaultProxy, report_state
from sqlkit import assert_reconciled, call, new_account, period
from tokentrack_client import (
    AccountNotFound,
    BudgetHold,
    BudgetSet,
    ConnectionLost,
    Extension,
    InsufficientBudget,
    InsufficientTokens,
    InvalidArgument,
    Refusal,
    ReportFinalized,
    ReservationExceeded,
    ReservationNotFound,
    StepRecord,
    TokenTracker,
    TokenTrackError,
    contract,
)
from tokentrack_client.errors import refusal_from_answer

TEAM = "team:research"


async def _window_start(conn: asyncpg.Connection, window: str, zone: str = "UTC") -> datetime:
    start: datetime = await conn.fetchval("SELECT date_trunc($1, now(), $2)", window, zone)
    return start


async def _reservation(conn: asyncpg.Connection, report_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT r.mode, rr.reserved_tokens, rr.reserved_cost_micros, rr.holds::text AS holds"
        " FROM tokentrack.reports AS r"
        " JOIN tokentrack.report_reservations AS rr ON rr.report_id = r.id"
        " WHERE r.id = $1",
        report_id,
    )
    assert row is not None
    return row


async def _reservations(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations")
    return count


# --------------------------------------------------------------------------------------------
# Reserving against budgets
# --------------------------------------------------------------------------------------------


async def test_a_teams_day_budget_refuses_a_report_the_month_allows(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    budget = await tracker.set_budget(account, TEAM, "tokens", "day", 5_000)
    today = await _window_start(conn, "day")

    first = await tracker.try_reserve(account, uuid.uuid4(), 4_000, subjects=[TEAM])
    assert first.available_tokens == 96_000
    assert first.budgets == (
        BudgetHold(budget.budget_id, TEAM, "day", "tokens", today, held=4_000, available=1_000),
    )

    refused_report = uuid.uuid4()
    with pytest.raises(InsufficientBudget) as refused:
        await tracker.try_reserve(account, refused_report, 2_000, subjects=[TEAM])
    error = refused.value
    assert isinstance(error, Refusal)
    assert error.code == "insufficient_budget"
    assert (error.budget_id, error.subject, error.window, error.unit) == (
        budget.budget_id,
        TEAM,
        "day",
        "tokens",
    )
    assert (error.window_start, error.available, error.requested) == (today, 1_000, 2_000)
    assert await _reservations(conn) == 1  # nothing written
    assert (
        await conn.fetchval("SELECT count(*) FROM tokentrack.reports WHERE id = $1", refused_report)
        == 0
    )

    # The same estimate without the team's subject fits the account's month.
    other = await tracker.try_reserve(account, uuid.uuid4(), 2_000)
    assert (other.available_tokens, other.budgets) == (94_000, ())


async def test_an_account_wide_budget_applies_to_every_reservation_and_names_no_subject(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    budget = await tracker.set_budget(account, None, "tokens", "hour", 1_000)
    granted = await tracker.try_reserve(account, uuid.uuid4(), 600)  # try_reserve_tokens
    assert [(h.budget_id, h.subject, h.held) for h in granted.budgets] == [
        (budget.budget_id, None, 600)
    ]
    with pytest.raises(InsufficientBudget) as refused:
        await tracker.try_reserve(account, uuid.uuid4(), 500)
    assert (refused.value.subject, refused.value.available, refused.value.requested) == (
        None,
        400,
        500,
    )


async def test_the_period_refusal_carries_its_period_id(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 1_000)
    active = await period(conn, account)
    for subjects in ((), (TEAM,)):  # try_reserve_tokens, then reserve
        with pytest.raises(InsufficientTokens) as refused:
            await tracker.try_reserve(account, uuid.uuid4(), 1_001, subjects=subjects)
        assert (refused.value.available_tokens, refused.value.requested_tokens) == (1_000, 1_001)
        assert refused.value.period_id == active["id"]


async def test_subjects_mode_and_a_cost_estimate_reach_the_sql(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    key_cost = await tracker.set_budget(account, "key:sk-live-1", "cost_micros", "month", 1_000_000)
    user_tokens = await tracker.set_budget(account, "user:42", "tokens", "total", 50_000)
    report_id = uuid.uuid4()
    granted = await tracker.try_reserve(
        account,
        report_id,
        3_000,
        subjects=("key:sk-live-1", "user:42", "team:without-budget"),
        mode="dd",
        cost_micros=250_000,
    )
    held = {h.budget_id: (h.unit, h.held, h.available) for h in granted.budgets}
    assert held == {
        key_cost.budget_id: ("cost_micros", 250_000, 750_000),
        user_tokens.budget_id: ("tokens", 3_000, 47_000),
    }
    row = await _reservation(conn, report_id)
    assert (row["mode"], row["reserved_tokens"], row["reserved_cost_micros"]) == (
        "dd",
        3_000,
        250_000,
    )
    holds = json.loads(row["holds"])
    assert {uuid.UUID(h["budget_id"]) for h in holds} == set(held)
    starts = {uuid.UUID(h["budget_id"]): datetime.fromisoformat(h["window_start"]) for h in holds}
    assert starts[key_cost.budget_id] == await _window_start(conn, "month")
    assert starts[user_tokens.budget_id] == await conn.fetchval(
        "SELECT created_at FROM tokentrack.budgets WHERE id = $1", user_tokens.budget_id
    )


async def test_a_model_prices_the_estimate_at_its_dearest_class(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    await call(
        conn, "set_model_price", "test-budget-model", '{"input": 1000000, "output": 4000000}'
    )
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 1_500, model="test-budget-model")
    row = await _reservation(conn, report_id)
    # 1,500 tokens at the output price (4,000,000 micros per million): 6,000 micros.
    assert (row["mode"], row["reserved_cost_micros"], row["holds"]) == ("standard", 6_000, None)
    unpriced = uuid.uuid4()
    await tracker.try_reserve(account, unpriced, 1_500, model="no-such-model")
    assert (await _reservation(conn, unpriced))["reserved_cost_micros"] is None


async def test_a_mode_alone_goes_through_reserve_and_no_argument_keeps_a_pending_reports_mode(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    hybrid = uuid.uuid4()
    await tracker.try_reserve(account, hybrid, 100, mode="hybrid")
    assert (await _reservation(conn, hybrid))["mode"] == "hybrid"

    # A pending report created by the application with its mode keeps it, through
    # try_reserve_tokens and through reserve (a budget argument) alike, unless a mode is given.
    kept, reset = uuid.uuid4(), uuid.uuid4()
    for report_id in (kept, reset):
        await conn.execute(
            "INSERT INTO tokentrack.reports (id, account_id, status, mode)"
            " VALUES ($1, $2, 'pending', 'discovery')",
            report_id,
            account,
        )
    await tracker.try_reserve(account, kept, 100)
    await tracker.try_reserve(account, reset, 100, subjects=[TEAM])
    assert (await _reservation(conn, kept))["mode"] == "discovery"
    assert (await _reservation(conn, reset))["mode"] == "discovery"


async def test_a_retry_answers_the_same_reservation_with_reserve_too(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    await tracker.set_budget(account, TEAM, "tokens", "day", 10_000)
    report_id = uuid.uuid4()
    first = await tracker.try_reserve(account, report_id, 1_000, subjects=[TEAM])
    again = await tracker.try_reserve(account, report_id, 1_000, subjects=[TEAM])
    assert (again.existing, again.reservation_id, again.reserved_tokens) == (
        True,
        first.reservation_id,
        1_000,
    )
    assert len(first.budgets) == 1
    assert await _reservations(conn) == 1


BAD_RESERVE_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({"subjects": TEAM}, "subjects"),  # a string is not a list of subjects
    ({"subjects": [f"team:{i}" for i in range(33)]}, "subjects"),
    ({"subjects": ["  "]}, "subjects"),
    ({"subjects": [""]}, "subjects"),
    ({"subjects": ["x" * 201]}, "subjects"),
    ({"subjects": [7]}, "subjects"),
    ({"subjects": ["a\x00b"]}, "subjects"),
    ({"mode": "fast"}, "mode"),
    ({"mode": "Standard"}, "mode"),
    ({"cost_micros": -1}, "cost_micros"),
    ({"cost_micros": True}, "cost_micros"),
    ({"cost_micros": 1.5}, "cost_micros"),
    ({"cost_micros": 2**63}, "cost_micros"),
    ({"model": "m" * 201}, "model"),
    ({"model": 4}, "model"),
    ({"cost_micros": 10, "model": "gpt-4o"}, "model"),
]


@pytest.mark.parametrize(("kwargs", "argument"), BAD_RESERVE_ARGUMENTS)
async def test_bad_budget_arguments_are_refused_before_the_call(
    tracker: TokenTracker, conn: asyncpg.Connection, kwargs: dict[str, Any], argument: str
) -> None:
    account = await new_account(conn, 100_000)
    with pytest.raises(InvalidArgument) as bad:
        await tracker.try_reserve(account, uuid.uuid4(), 100, **kwargs)
    assert (bad.value.argument, bad.value.sqlstate) == (argument, None)
    with pytest.raises(InvalidArgument) as at_once:
        tracker.track_report(account, uuid.uuid4(), 100, **kwargs)
    assert at_once.value.argument == argument
    assert await _reservations(conn) == 0


async def test_exactly_32_subjects_and_200_characters_are_allowed(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    subjects = [f"s{i}:" + "x" * (200 - len(f"s{i}:")) for i in range(32)]
    granted = await tracker.try_reserve(account, uuid.uuid4(), 100, subjects=subjects)
    assert granted.budgets == ()


# --------------------------------------------------------------------------------------------
# Extension
# --------------------------------------------------------------------------------------------


async def test_extend_reservation_raises_the_hold_or_is_refused_by_the_budget_or_the_period(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 10_000)
    budget = await tracker.set_budget(account, TEAM, "tokens", "day", 3_000)
    report_id = uuid.uuid4()
    reservation = await tracker.try_reserve(
        account, report_id, 1_000, subjects=[TEAM], cost_micros=100
    )

    extended = await tracker.extend_reservation(report_id, account, 1_500, cost_micros=50)
    assert isinstance(extended, Extension)
    assert (extended.reservation_id, extended.reserved_tokens, extended.reserved_cost_micros) == (
        reservation.reservation_id,
        2_500,
        150,
    )
    assert (extended.available_tokens, extended.expires_at) == (7_500, reservation.expires_at)
    assert extended.period_id == reservation.period_id
    assert [(h.budget_id, h.held, h.available) for h in extended.budgets] == [
        (budget.budget_id, 2_500, 500)
    ]
    row = await _reservation(conn, report_id)
    assert (row["reserved_tokens"], row["reserved_cost_micros"]) == (2_500, 150)

    with pytest.raises(InsufficientBudget) as by_budget:
        await tracker.extend_reservation(report_id, account, 1_000)
    assert (by_budget.value.budget_id, by_budget.value.available, by_budget.value.requested) == (
        budget.budget_id,
        500,
        1_000,
    )
    with pytest.raises(InsufficientTokens) as by_period:
        await tracker.extend_reservation(str(report_id), str(account), 7_501)
    assert (by_period.value.available_tokens, by_period.value.requested_tokens) == (7_500, 7_501)
    assert by_period.value.period_id == reservation.period_id
    row = await _reservation(conn, report_id)
    assert (row["reserved_tokens"], row["reserved_cost_micros"]) == (2_500, 150)  # unchanged

    await tracker.finish_report(report_id, account, "complete")
    with pytest.raises(ReportFinalized):
        await tracker.extend_reservation(report_id, account, 1)
    with pytest.raises(ReservationNotFound):
        await tracker.extend_reservation(uuid.uuid4(), account, 1)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"tokens": 0}, "tokens"),
        ({"tokens": -5}, "tokens"),
        ({"tokens": 2**31}, "tokens"),
        ({"tokens": 10, "cost_micros": -1}, "cost_micros"),
        ({"tokens": 10, "cost_micros": 1, "model": "gpt-4o"}, "model"),
    ],
)
async def test_bad_extension_arguments_are_refused_before_the_call(
    tracker: TokenTracker, kwargs: dict[str, Any], argument: str
) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await tracker.extend_reservation(uuid.uuid4(), uuid.uuid4(), **kwargs)
    assert (bad.value.argument, bad.value.sqlstate) == (argument, None)


async def test_report_extend_mid_report_keeps_the_steps_within_the_reservation(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    await tracker.set_budget(account, TEAM, "tokens", "day", 2_000)
    report_id = uuid.uuid4()
    async with tracker.track_report(
        account, report_id, 1_000, subjects=[TEAM], mode="dd", on_overrun="raise"
    ) as report:
        assert report.reserved_tokens == 1_000
        first = await report.step("AN0", input_tokens=600, output_tokens=200)
        extension = await report.extend(500)
        assert report.reserved_tokens == extension.reserved_tokens == 1_500
        assert report.extensions == [extension]
        second = await report.step("AN1", input_tokens=500, output_tokens=100)
        with pytest.raises(InsufficientBudget) as refused:
            await report.extend(600)
        assert (refused.value.subject, refused.value.available) == (TEAM, 500)
    assert (first.over_reservation, second.over_reservation) == (False, False)
    assert report.status == "complete"
    assert report.settlement is not None
    assert report.settlement.billed_tokens == 1_400
    used = await conn.fetchval(
        "SELECT used FROM tokentrack.budget_windows WHERE account_id = $1", account
    )
    assert used == 1_400
    with pytest.raises(RuntimeError, match="already finished"):
        await report.extend(1)
    await assert_reconciled(conn)


@pytest.fixture
async def proxied(fault_proxy: FaultProxy, db_dsn: str) -> Any:
    pool = await asyncpg.create_pool(fault_proxy.dsn(db_dsn), min_size=1, max_size=4)
    try:
        yield TokenTracker(pool, retry=FAST_RETRY)
    finally:
        await pool.close()


async def test_a_lost_commit_answer_retries_reserve_but_never_repeats_an_extension(
    proxied: TokenTracker, fault_proxy: FaultProxy, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    await proxied.set_budget(account, TEAM, "tokens", "day", 50_000)
    report_id = uuid.uuid4()
    fault_proxy.cut_after_commit()
    reservation = await proxied.try_reserve(account, report_id, 5_000, subjects=[TEAM])
    assert reservation.existing is True  # the first attempt committed; the retry found it

    fault_proxy.cut_after_commit()
    with pytest.raises(ConnectionLost) as raised:
        await proxied.extend_reservation(report_id, account, 1_000)
    assert (raised.value.outcome_unknown, raised.value.attempts) == (True, 1)
    assert fault_proxy.cuts == 2
    assert (await _reservation(conn, report_id))["reserved_tokens"] == 6_000  # added once


async def test_extend_before_entering_is_a_runtime_error(tracker: TokenTracker) -> None:
    report = tracker.track_report(uuid.uuid4(), uuid.uuid4(), 10)
    with pytest.raises(RuntimeError, match=r"extend\(\) needs the report to be entered"):
        await report.extend(1)


# --------------------------------------------------------------------------------------------
# Overrun
# --------------------------------------------------------------------------------------------


async def test_on_overrun_raise_raises_after_recording_and_the_report_fails_billed_once(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()
    report = tracker.track_report(account, report_id, 1_000, on_overrun="raise")
    steps_before: list[StepRecord] = []

    async def generator() -> None:
        async with report:
            steps_before.append(await report.step("AN0", input_tokens=500, output_tokens=100))
            await report.step("AN1", input_tokens=500, output_tokens=100)
            await report.step("AN2", input_tokens=1, output_tokens=1)  # never reached

    with pytest.raises(ReservationExceeded) as exceeded:
        await generator()
    error = exceeded.value
    assert isinstance(error, TokenTrackError)
    assert (error.over_by, error.reserved_tokens, error.recorded_tokens) == (200, 1_000, 1_200)
    assert error.report_id == report_id
    assert error.step.over_reservation is True
    assert error.step.over_by == 200
    assert steps_before[0].over_reservation is False
    assert steps_before[0].over_by is None
    assert report.steps == [steps_before[0], error.step]  # recorded before raising

    assert report.status == "failed"
    assert report.settlement is not None
    assert report.settlement.billed_tokens == 1_200
    state = await report_state(conn, report_id)
    assert state["status"] == "failed"
    assert state["error_message"] == str(error)
    assert "200 tokens over its reservation" in str(error)
    assert set(state["steps"]) == {"AN0", "AN1"}
    assert state["reservation"] == {
        "status": "completed",
        "reserved_tokens": 1_000,
        "billed_tokens": 1_200,
    }
    assert [entry["tokens"] for entry in state["ledger"]] == [1_200]  # billed once
    assert (await period(conn, account))["tokens_used"] == 1_200
    await assert_reconciled(conn)


async def test_overrun_is_ignored_by_default_but_every_later_step_record_says_so(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()
    async with tracker.track_report(account, report_id, 1_000) as report:
        within = await report.step("AN0", input_tokens=900, output_tokens=100)
        over = await report.step("AN1", input_tokens=200, output_tokens=50)
        further = await report.step("AN2", input_tokens=10, output_tokens=0)
        retried = await report.step("AN1", input_tokens=200, output_tokens=50)
    assert (within.over_reservation, within.over_by) == (False, None)  # exactly at the limit
    assert (over.over_reservation, over.over_by) == (True, 250)
    assert (further.over_reservation, further.over_by) == (True, 260)
    assert (retried.duplicate, retried.over_reservation, retried.over_by) == (True, True, 260)
    assert over.answer["reserved_tokens"] == 1_000
    assert over.answer["recorded_tokens"] == 1_250
    assert report.status == "complete"
    assert report.settlement is not None
    assert report.settlement.billed_tokens == 1_260
    assert (await period(conn, account))["tokens_used"] == 1_260
    await assert_reconciled(conn)


async def test_a_step_with_usage_carries_the_overrun_too(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 100)
    record = await tracker.record_step(
        report_id, account, "AN0", tokentrack_client.Usage(input_tokens=90, output_tokens=20)
    )
    assert (record.over_reservation, record.over_by) == (True, 10)


async def test_on_overrun_must_be_ignore_or_raise(tracker: TokenTracker) -> None:
    with pytest.raises(InvalidArgument) as bad:
        tracker.track_report(uuid.uuid4(), uuid.uuid4(), 10, on_overrun="warn")  # type: ignore[arg-type]
    assert bad.value.argument == "on_overrun"


# --------------------------------------------------------------------------------------------
# set_budget
# --------------------------------------------------------------------------------------------


async def test_set_budget_creates_changes_and_records_every_change(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    created = await tracker.set_budget(
        account,
        TEAM,
        "cost_micros",
        "day",
        5_000_000,
        timezone="Europe/Berlin",
        thresholds=[90, 50, 90],
    )
    assert isinstance(created, BudgetSet)
    assert (created.created, created.changed, created.subject, created.unit, created.window) == (
        True,
        True,
        TEAM,
        "cost_micros",
        "day",
    )
    assert (created.limit, created.timezone, created.thresholds) == (
        5_000_000,
        "Europe/Berlin",
        (50, 90),
    )
    same = await tracker.set_budget(account, TEAM, "cost_micros", "day", 5_000_000)
    assert (same.budget_id, same.created, same.changed) == (created.budget_id, False, False)
    assert (same.timezone, same.thresholds) == ("Europe/Berlin", (50, 90))  # kept
    raised = await tracker.set_budget(account, TEAM, "cost_micros", "day", 6_000_000)
    assert (raised.budget_id, raised.changed, raised.limit) == (created.budget_id, True, 6_000_000)
    whole = await tracker.set_budget(account, None, "tokens", "total", 0)
    assert (whole.subject, whole.timezone, whole.thresholds, whole.created) == (
        None,
        "UTC",
        (80, 100),
        True,
    )
    limits = await conn.fetch(
        "SELECT limit_amount FROM tokentrack.budget_changes WHERE budget_id = $1 ORDER BY id",
        created.budget_id,
    )
    assert [r["limit_amount"] for r in limits] == [5_000_000, 6_000_000]

    with pytest.raises(AccountNotFound):
        await tracker.set_budget(uuid.uuid4(), None, "tokens", "day", 1)


@pytest.mark.parametrize(
    ("args", "kwargs", "argument"),
    [
        ((" ", "tokens", "day", 1), {}, "subject"),
        (("s" * 201, "tokens", "day", 1), {}, "subject"),
        ((None, "usd", "day", 1), {}, "unit"),
        ((None, "tokens", "year", 1), {}, "window"),
        ((None, "tokens", "day", -1), {}, "limit"),
        ((None, "tokens", "day", 2**63), {}, "limit"),
        ((None, "tokens", "day", 1), {"thresholds": []}, "thresholds"),
        ((None, "tokens", "day", 1), {"thresholds": [0]}, "thresholds"),
        ((None, "tokens", "day", 1), {"thresholds": [1001]}, "thresholds"),
        ((None, "tokens", "day", 1), {"thresholds": list(range(1, 12))}, "thresholds"),
        ((None, "tokens", "day", 1), {"thresholds": [True]}, "thresholds"),
        ((None, "tokens", "day", 1), {"thresholds": 80}, "thresholds"),
        ((None, "tokens", "day", 1), {"timezone": 1}, "timezone"),
    ],
)
async def test_bad_budget_settings_are_refused_before_the_call(
    tracker: TokenTracker,
    conn: asyncpg.Connection,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    argument: str,
) -> None:
    account = await new_account(conn)
    with pytest.raises(InvalidArgument) as bad:
        await tracker.set_budget(account, *args, **kwargs)
    assert (bad.value.argument, bad.value.sqlstate) == (argument, None)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.budgets") == 0


async def test_an_unknown_time_zone_is_the_servers_invalid_argument(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    with pytest.raises(InvalidArgument) as bad:
        await tracker.set_budget(account, None, "tokens", "day", 1, timezone="Mars/Olympus")
    assert (bad.value.argument, bad.value.sqlstate) == ("options.timezone", "22023")


# --------------------------------------------------------------------------------------------
# Names and answers
# --------------------------------------------------------------------------------------------


async def test_the_contract_modes_units_and_windows_are_the_ones_the_schema_allows(
    conn: asyncpg.Connection,
) -> None:
    async def allowed(constraint: str) -> set[str]:
        definition = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conname = $1 AND connamespace = 'tokentrack'::regnamespace",
            constraint,
        )
        return set(re.findall(r"'([a-z_]+)'::text", definition))

    assert await allowed("reports_mode_valid") == set(contract.REPORT_MODES)
    assert await allowed("budgets_unit_valid") == set(contract.BUDGET_UNITS)
    assert await allowed("budgets_window_valid") == set(contract.BUDGET_WINDOWS)


def test_insufficient_budget_is_mapped_by_its_code_and_carries_the_budget() -> None:
    budget_id = uuid.uuid4()
    refusal = refusal_from_answer(
        {
            "success": False,
            "error": "insufficient_budget",
            "message": "whatever the text says",
            "budget_id": str(budget_id),
            "subject": None,
            "window": "week",
            "unit": "cost_micros",
            "window_start": "2026-12-07T00:00:00+01:00",
            "available": 0,
            "requested": 0,
        }
    )
    assert type(refusal) is InsufficientBudget
    assert (refusal.budget_id, refusal.subject, refusal.window, refusal.unit) == (
        budget_id,
        None,
        "week",
        "cost_micros",
    )
    assert refusal.window_start == datetime.fromisoformat("2026-12-07T00:00:00+01:00")
    assert (refusal.available, refusal.requested) == (0, 0)
    odd = refusal_from_answer({"success": False, "error": "insufficient_budget", "budget_id": 7})
    assert isinstance(odd, InsufficientBudget)
    assert (odd.budget_id, odd.window_start, odd.available) == (None, None, None)


def test_the_new_names_are_exported() -> None:
    for name in (
        "BudgetHold",
        "BudgetSet",
        "Extension",
        "InsufficientBudget",
        "OnOverrun",
        "ReservationExceeded",
    ):
        assert name in tokentrack_client.__all__
        assert hasattr(tokentrack_client, name)
    assert tokentrack_client.ReservationExceeded is tokentrack_client.tracking.ReservationExceeded
