"""``TokenTracker``'s calls one by one: results, refusals by code, invalid arguments, wrapping
of driver errors."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

import tokentrack_client
from client_fixtures import FAST_RETRY
from sqlkit import Connect, assert_reconciled, counts, expire, new_account, period
from tokentrack_client import (
    AccountNotFound,
    DatabaseError,
    InsufficientTokens,
    InvalidArgument,
    NoActivePeriod,
    NotInstalled,
    PermissionDenied,
    Reconciliation,
    Refusal,
    ReportAccountMismatch,
    ReportFinalized,
    ReservationNotFound,
    StepConflict,
    SweepResult,
    TokenTracker,
    TokenTrackError,
    UnexpectedAnswer,
    contract,
)
from tokentrack_client.answers import read_answer


async def test_try_reserve_answers_a_reservation_and_a_retry_answers_the_same_one(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 10_000)
    report_id = uuid.uuid4()
    first = await tracker.try_reserve(account, report_id, 4_000)
    assert (first.reserved_tokens, first.available_tokens, first.existing) == (4_000, 6_000, False)
    assert first.expires_at.tzinfo is not None
    assert (
        timedelta(hours=1, minutes=59) < first.expires_at - datetime.now(UTC) <= timedelta(hours=2)
    )
    again = await tracker.try_reserve(str(account), str(report_id), 4_000)
    assert again.existing is True
    assert again.reservation_id == first.reservation_id
    assert again == dataclasses.replace(first, existing=True, answer=again.answer)
    assert await conn.fetchval("SELECT count(*) FROM tokentrack.report_reservations") == 1


async def test_results_are_frozen_and_keep_the_whole_answer(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    reservation = await tracker.try_reserve(account, uuid.uuid4(), 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        reservation.reserved_tokens = 5  # type: ignore[misc]
    assert reservation.answer["success"] is True
    assert reservation.answer["reservation_id"] == str(reservation.reservation_id)
    hash(reservation)


async def test_persist_step_finalize_and_finish_report(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 100_000)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 5_000)
    step = await tracker.persist_step(report_id, account, "AN0", 100, 20, 150, "o3-mini")
    assert (step.total_tokens, step.duplicate, step.late, step.report_status) == (
        150,
        False,
        False,
        None,
    )
    retry = await tracker.persist_step(report_id, account, "AN0", 100, 20, 150, "o3-mini")
    assert (retry.step_id, retry.duplicate) == (step.step_id, True)

    billed = await tracker.finalize(report_id, account)
    assert (billed.billed_tokens, billed.steps, billed.already_finalized) == (150, 1, False)
    assert (billed.tokens_used, billed.tokens_limit) == (150, 100_000)
    assert billed.reservation_status == "completed"
    again = await tracker.finalize(report_id, account)
    assert (again.billed_tokens, again.already_finalized) == (150, True)

    late = await tracker.persist_step(report_id, account, "AN5", 10, 10)
    assert (late.late, late.total_tokens, late.report_status) == (True, 20, None)

    finished = await tracker.finish_report(report_id, account, "complete")
    assert finished.report_status == "complete"
    assert finished.already_finalized is True
    repeated = await tracker.finish_report(report_id, account, "complete")
    assert repeated.report_status == "complete"
    with pytest.raises(ReportFinalized) as refused:
        await tracker.cancel_report(report_id, account)
    assert refused.value.report_status == "complete"
    after = await tracker.persist_step(report_id, account, "AN5", 10, 10)
    assert (after.duplicate, after.report_status) == (True, "complete")
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (170, 1)
    await assert_reconciled(conn)


async def test_cleanup_increment_open_period_and_reconcile(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = uuid.uuid4()
    opened = await tracker.open_usage_period(account, 50_000)
    assert opened.tokens_limit == 50_000
    assert opened.previous_period_id is None
    assert opened.period_end > opened.period_start
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 1_000)
    await tracker.persist_step(report_id, account, "AN0", 300, 30)
    await expire(conn, report_id)
    swept = await tracker.cleanup_expired_reservations()
    assert (swept.expired, swept.billed_tokens, swept.steps) == (1, 330, 1)
    assert (await tracker.cleanup_expired_reservations()).expired == 0

    used = await tracker.increment_usage(account, 70, is_report=True)
    assert (used.tokens_used, used.tokens_limit, used.reports_count) == (400, 50_000, 1)
    assert used.period_id == opened.period_id
    used = await tracker.increment_usage(account, 5, is_chat=True)
    assert (used.tokens_used, used.reports_count) == (405, 1)  # not idempotent: every call adds

    verdict = await tracker.reconcile(account)
    assert (verdict.ok, verdict.periods_checked, verdict.discrepancies) == (True, 1, ())
    assert (await tracker.reconcile()).ok is True

    reopened = await tracker.open_usage_period(account, 60_000)
    assert reopened.previous_period_id == opened.period_id


async def test_reconcile_reports_discrepancies(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn)
    await tracker.increment_usage(account, 100)
    await conn.execute(
        "UPDATE tokentrack.usage_periods SET tokens_used = tokens_used + 7 WHERE account_id = $1",
        account,
    )
    verdict = await tracker.reconcile(account)
    assert verdict.ok is False
    [found] = verdict.discrepancies
    assert (found.account_id, found.check, found.expected, found.actual) == (
        account,
        "tokens_used",
        100,
        107,
    )


# --------------------------------------------------------------------------------------------
# Refusals: mapped by code to typed exceptions; nothing written
# --------------------------------------------------------------------------------------------


async def test_every_refusal_code_raises_its_exception(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 1_000)
    other = await new_account(conn, 1_000)
    report_id = uuid.uuid4()
    await tracker.try_reserve(account, report_id, 500)
    await tracker.persist_step(report_id, account, "AN0", 10, 10)
    no_period = uuid.uuid4()
    await conn.execute("INSERT INTO tokentrack.accounts (id) VALUES ($1)", no_period)
    before = await counts(conn)

    cases: list[tuple[type[Refusal], str, Any]] = [
        (
            InsufficientTokens,
            "insufficient_tokens",
            tracker.try_reserve(account, uuid.uuid4(), 501),
        ),
        (NoActivePeriod, "no_active_period", tracker.try_reserve(no_period, uuid.uuid4(), 1)),
        (AccountNotFound, "account_not_found", tracker.try_reserve(uuid.uuid4(), uuid.uuid4(), 1)),
        (
            ReportAccountMismatch,
            "report_account_mismatch",
            tracker.try_reserve(other, report_id, 1),
        ),
        (StepConflict, "step_conflict", tracker.persist_step(report_id, account, "AN0", 10, 11)),
        (ReservationNotFound, "reservation_not_found", tracker.finalize(uuid.uuid4(), account)),
        (AccountNotFound, "account_not_found", tracker.reconcile(uuid.uuid4())),
        (NoActivePeriod, "no_active_period", tracker.increment_usage(no_period, 5)),
    ]
    for cls, code, call in cases:
        with pytest.raises(cls) as raised:
            await call
        assert raised.value.code == code
        assert isinstance(raised.value, Refusal)
        assert isinstance(raised.value, TokenTrackError)
        assert raised.value.answer["error"] == code
    assert await counts(conn) == before

    with pytest.raises(InsufficientTokens) as short:
        await tracker.try_reserve(account, uuid.uuid4(), 900)
    assert (short.value.available_tokens, short.value.requested_tokens) == (500, 900)

    await tracker.finish_report(report_id, account, "failed", "boom")
    with pytest.raises(ReportFinalized):
        await tracker.try_reserve(account, report_id, 10)
    with pytest.raises(ReportFinalized) as finalized:
        await tracker.finish_report(report_id, account, "complete")
    assert finalized.value.report_status == "failed"


def test_an_unknown_refusal_code_is_a_plain_refusal() -> None:
    error = tokentrack_client.errors.refusal_from_answer(
        {"success": False, "error": "quota_frozen", "message": "frozen by billing"}
    )
    assert type(error) is Refusal
    assert (error.code, error.message) == ("quota_frozen", "frozen by billing")


# --------------------------------------------------------------------------------------------
# Reading answers: one module, shared by the client and the operations commands
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (None, "expected the jsonb answer as text"),
        (b'{"success": true}', "expected the jsonb answer as text"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "is not a JSON object"),
    ],
)
def test_read_answer_refuses_what_is_not_a_json_object(raw: object, says: str) -> None:
    with pytest.raises(UnexpectedAnswer, match=says) as refused:
        read_answer("reconcile", raw)
    assert str(refused.value).startswith("reconcile: ")


def test_read_answer_raises_the_typed_refusal_and_passes_the_rest() -> None:
    with pytest.raises(InsufficientTokens) as refused:
        read_answer(
            "try_reserve_tokens",
            '{"success": false, "error": "insufficient_tokens", "message": "no",'
            ' "available_tokens": 3, "requested_tokens": 9}',
        )
    assert (refused.value.available_tokens, refused.value.requested_tokens) == (3, 9)
    assert read_answer("reconcile", '{"ok": true, "periods_checked": 0}') == {
        "ok": True,
        "periods_checked": 0,
    }


def test_a_missing_or_mistyped_field_is_an_unexpected_answer() -> None:
    good = {"expired": 2, "billed_tokens": 10}
    assert SweepResult.from_answer(good) == SweepResult(expired=2, billed_tokens=10, steps=0)
    with pytest.raises(UnexpectedAnswer, match="has no 'billed_tokens'"):
        SweepResult.from_answer({"expired": 2})
    with pytest.raises(UnexpectedAnswer, match="'expired' is not an integer: True"):
        SweepResult.from_answer({**good, "expired": True})
    with pytest.raises(UnexpectedAnswer, match="'discrepancies' is not a list"):
        Reconciliation.from_answer({"ok": True, "periods_checked": 1, "discrepancies": {}})
    with pytest.raises(UnexpectedAnswer, match="expected a JSON object in 'discrepancies'"):
        Reconciliation.from_answer({"ok": False, "periods_checked": 1, "discrepancies": [7]})


def test_the_report_ended_exceptions_live_with_the_tracker_and_are_exported() -> None:
    assert tokentrack_client.ReportEnded is tokentrack_client.tracking.ReportEnded
    assert tokentrack_client.ReportCancelled is tokentrack_client.tracking.ReportCancelled
    assert issubclass(tokentrack_client.ReportCancelled, tokentrack_client.ReportEnded)
    assert issubclass(tokentrack_client.ReportEnded, TokenTrackError)


async def test_the_contract_statuses_are_the_ones_the_schema_allows(
    conn: asyncpg.Connection,
) -> None:
    async def allowed(constraint: str) -> set[str]:
        definition = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conname = $1 AND connamespace = 'tokentrack'::regnamespace",
            constraint,
        )
        return set(re.findall(r"'([a-z_]+)'::text", definition))

    assert await allowed("reports_status_valid") == set(contract.REPORT_STATUSES)
    assert await allowed("report_reservations_status_valid") == set(contract.RESERVATION_STATUSES)
    assert await allowed("usage_periods_status_valid") == set(contract.PERIOD_STATUSES)
    assert set(contract.REPORT_OUTCOMES) == set(contract.REPORT_STATUSES) - {
        "pending",
        "processing",
    }


# --------------------------------------------------------------------------------------------
# Invalid arguments: ValueError subclasses naming the argument; nothing reaches the database
# --------------------------------------------------------------------------------------------

REPORT = uuid.uuid4()
ACCOUNT = uuid.uuid4()

INVALID_CALLS: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
    ("try_reserve", "account_id", (None, REPORT, 1), {}),
    ("try_reserve", "report_id", (ACCOUNT, "not-a-uuid", 1), {}),
    ("try_reserve", "estimated_tokens", (ACCOUNT, REPORT, 0), {}),
    ("try_reserve", "estimated_tokens", (ACCOUNT, REPORT, -5), {}),
    ("try_reserve", "estimated_tokens", (ACCOUNT, REPORT, 2**31), {}),
    ("try_reserve", "estimated_tokens", (ACCOUNT, REPORT, 1.5), {}),
    ("try_reserve", "estimated_tokens", (ACCOUNT, REPORT, True), {}),
    ("persist_step", "step_name", (REPORT, ACCOUNT, "", 1, 1), {}),
    ("persist_step", "step_name", (REPORT, ACCOUNT, "   ", 1, 1), {}),
    ("persist_step", "step_name", (REPORT, ACCOUNT, "x" * 201, 1, 1), {}),
    ("persist_step", "step_name", (REPORT, ACCOUNT, None, 1, 1), {}),
    ("persist_step", "input_tokens", (REPORT, ACCOUNT, "AN0", -1, 1), {}),
    ("persist_step", "output_tokens", (REPORT, ACCOUNT, "AN0", 1, None), {}),
    ("persist_step", "total_tokens", (REPORT, ACCOUNT, "AN0", 10, 10, 19), {}),
    ("persist_step", "total_tokens", (REPORT, ACCOUNT, "AN0", 2**31 - 1, 1), {}),
    ("persist_step", "model", (REPORT, ACCOUNT, "AN0", 1, 1, None, "m" * 201), {}),
    ("finalize", "report_id", (None, ACCOUNT), {}),
    ("finish_report", "status", (REPORT, ACCOUNT, "done"), {}),
    ("finish_report", "error_message", (REPORT, ACCOUNT, "failed", "e" * 10_001), {}),
    ("cancel_report", "account_id", (REPORT, 42), {}),
    ("reconcile", "account_id", ("nope",), {}),
    ("increment_usage", "tokens", (ACCOUNT, -1), {}),
    ("increment_usage", "is_report", (ACCOUNT, 1), {"is_report": 1}),
    ("open_usage_period", "tokens_limit", (ACCOUNT, -1), {}),
]


@pytest.mark.parametrize(("method", "argument", "args", "kwargs"), INVALID_CALLS)
async def test_invalid_arguments_raise_value_errors_naming_them(
    tracker: TokenTracker,
    conn: asyncpg.Connection,
    method: str,
    argument: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    before = await counts(conn)
    with pytest.raises(InvalidArgument) as raised:
        await getattr(tracker, method)(*args, **kwargs)
    assert raised.value.argument == argument
    assert argument in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert raised.value.sqlstate is None  # caught before the call
    assert await counts(conn) == before


async def test_server_side_invalid_arguments_are_mapped_from_sqlstate_class_22(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    """The period end is checked against the server's clock, so only the server can tell."""
    account = await new_account(conn)
    before = await counts(conn)
    with pytest.raises(InvalidArgument) as raised:
        await tracker.open_usage_period(account, 10, datetime.now(UTC) - timedelta(days=1))
    assert raised.value.argument == "period_end"
    assert raised.value.sqlstate == "22023"
    assert isinstance(raised.value.__cause__, asyncpg.PostgresError)
    assert await counts(conn) == before


# --------------------------------------------------------------------------------------------
# Driver errors are wrapped, from the original
# --------------------------------------------------------------------------------------------


async def test_a_database_without_tokentrack_raises_not_installed(empty_db_dsn: str) -> None:
    connection = await asyncpg.connect(empty_db_dsn)
    try:
        with pytest.raises(NotInstalled) as raised:
            await TokenTracker(connection).reconcile()
        assert isinstance(raised.value, DatabaseError)
        assert isinstance(raised.value.__cause__, asyncpg.PostgresError)
        assert raised.value.sqlstate == "3F000"
        assert not connection.is_in_transaction()
    finally:
        await connection.close()


async def test_a_role_without_the_grant_raises_permission_denied(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    role = f"tt_nogrant_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        outsider = await asyncpg.connect(db_dsn, user=role)
        try:
            with pytest.raises(PermissionDenied) as raised:
                await TokenTracker(outsider).reconcile()
            assert raised.value.sqlstate == "42501"
            assert isinstance(raised.value.__cause__, asyncpg.InsufficientPrivilegeError)
        finally:
            await outsider.close()
        # Granted tokentrack_service, the same role may call it.
        await conn.execute(f"GRANT tokentrack_service TO {role}")
        member = await asyncpg.connect(db_dsn, user=role)
        try:
            assert (await TokenTracker(member).reconcile()).ok is True
        finally:
            await member.close()
    finally:
        await conn.execute(f"DROP ROLE {role}")


async def test_works_whatever_jsonb_codec_the_caller_set(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    custom = await connect()
    await custom.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=lambda text: {"wrapped": text}, schema="pg_catalog"
    )
    tracker = TokenTracker(custom, retry=FAST_RETRY)
    reservation = await tracker.try_reserve(account, uuid.uuid4(), 100)
    assert reservation.reserved_tokens == 100


async def test_a_call_inside_the_callers_transaction_commits_or_rolls_back_with_it(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn)
    own = await connect()
    tracker = TokenTracker(own, retry=FAST_RETRY)

    async def work_that_fails() -> None:
        async with own.transaction():
            used = await tracker.increment_usage(account, 40)
            assert used.tokens_used == 40
            raise RuntimeError("the caller's own work failed")

    with pytest.raises(RuntimeError):
        await work_that_fails()
    assert (await period(conn, account))["tokens_used"] == 0
    async with own.transaction():
        await tracker.increment_usage(account, 40)
    assert (await period(conn, account))["tokens_used"] == 40
    await assert_reconciled(conn)


def test_the_constructor_wants_a_pool_or_a_connection() -> None:
    with pytest.raises(TypeError, match=r"asyncpg\.Pool or an asyncpg\.Connection"):
        TokenTracker("postgresql://localhost/db")  # type: ignore[arg-type]


def test_the_public_api_is_exported() -> None:
    for name in tokentrack_client.__all__:
        assert hasattr(tokentrack_client, name), name
    for name in (
        "InsufficientTokens",
        "NoActivePeriod",
        "AccountNotFound",
        "ReportAccountMismatch",
        "StepConflict",
        "ReservationNotFound",
        "ReportFinalized",
        "ReportCancelled",
    ):
        assert issubclass(getattr(tokentrack_client, name), TokenTrackError)
