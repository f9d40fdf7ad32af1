"""Contract: tokentrack.finalize_report_usage and tokentrack.finish_report."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from sqlkit import Connect, assert_reconciled, call, counts, new_account, period, reserve, step


async def _report_with_steps(conn: asyncpg.Connection, account: uuid.UUID) -> uuid.UUID:
    report, _ = await reserve(conn, account, 5_000)
    await step(conn, report, account, "AN0", 100, 20)
    await step(conn, report, account, "AN1", 200, 30, 260)
    return report


async def test_finalize_bills_the_steps_and_completes_the_reservation(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 10_000)
    report = await _report_with_steps(conn, account)
    answer = await call(conn, "finalize_report_usage", report, account)
    assert answer["success"] is True
    assert answer["already_finalized"] is False
    assert (answer["billed_tokens"], answer["steps"]) == (380, 2)
    assert (answer["tokens_used"], answer["tokens_limit"]) == (380, 10_000)
    reservation = await conn.fetchrow(
        "SELECT * FROM tokentrack.report_reservations WHERE report_id = $1", report
    )
    assert reservation is not None
    assert (reservation["status"], reservation["billed_tokens"]) == ("completed", 380)
    assert reservation["finalized_at"] is not None
    unbilled = await conn.fetchval(
        "SELECT count(*) FROM tokentrack.report_step_usage"
        " WHERE report_id = $1 AND billed_at IS NULL",
        report,
    )
    assert unbilled == 0
    usage = json.loads(
        await conn.fetchval("SELECT token_usage FROM tokentrack.reports WHERE id = $1", report)
    )
    assert usage["totalTokens"] == 380
    assert (usage["inputTokens"], usage["outputTokens"], usage["steps"]) == (300, 50, 2)
    await assert_reconciled(conn)


async def test_finalize_counts_only_complete_reports(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    processing = await _report_with_steps(conn, account)
    await call(conn, "finalize_report_usage", processing, account)
    assert (await period(conn, account))["reports_count"] == 0
    complete = await _report_with_steps(conn, account)
    await conn.execute("UPDATE tokentrack.reports SET status = 'complete' WHERE id = $1", complete)
    await call(conn, "finalize_report_usage", complete, account)
    assert (await period(conn, account))["reports_count"] == 1


async def test_finalize_again_changes_nothing(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    first = await call(conn, "finalize_report_usage", report, account)
    before = await counts(conn)
    state = await period(conn, account)
    again = await call(conn, "finalize_report_usage", report, account)
    assert again["already_finalized"] is True
    assert (again["billed_tokens"], again["steps"]) == (first["billed_tokens"], first["steps"])
    assert await counts(conn) == before
    assert await period(conn, account) == state


async def test_finalize_bills_the_period_the_reservation_was_taken_in(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    first_period = (await period(conn, account))["id"]
    await call(conn, "open_usage_period", account, 50_000, None)
    await call(conn, "finalize_report_usage", report, account)
    used = await conn.fetchval(
        "SELECT tokens_used FROM tokentrack.usage_periods WHERE id = $1", first_period
    )
    assert used == 380
    assert (await period(conn, account))["tokens_used"] == 0
    await assert_reconciled(conn)


async def test_billing_may_exceed_the_limit(conn: asyncpg.Connection) -> None:
    account = await new_account(conn, 100)
    report, _ = await reserve(conn, account, 100)
    await step(conn, report, account, "AN0", 150, 50)
    answer = await call(conn, "finalize_report_usage", report, account)
    assert (answer["billed_tokens"], answer["tokens_used"], answer["tokens_limit"]) == (
        200,
        200,
        100,
    )
    _, refused = await reserve(conn, account, 1)
    assert (refused["error"], refused["available_tokens"]) == ("insufficient_tokens", 0)


async def test_finalize_refusals_write_nothing(conn: asyncpg.Connection) -> None:
    owner = await new_account(conn)
    other = await new_account(conn)
    report, _ = await reserve(conn, owner)
    before = await counts(conn)
    mismatch = await call(conn, "finalize_report_usage", report, other)
    missing = await call(conn, "finalize_report_usage", uuid.uuid4(), owner)
    assert (mismatch["success"], mismatch["error"]) == (False, "report_account_mismatch")
    assert (missing["success"], missing["error"]) == (False, "reservation_not_found")
    assert await counts(conn) == before


async def test_racing_finalizes_bill_once(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup)
    report = await _report_with_steps(setup, account)
    conns = [await connect() for _ in range(6)]
    answers = await asyncio.gather(
        *(call(c, "finalize_report_usage", report, account) for c in conns)
    )
    assert [a["already_finalized"] for a in answers].count(False) == 1
    assert {a["billed_tokens"] for a in answers} == {380}
    assert (await period(setup, account))["tokens_used"] == 380


async def test_finish_report_sets_the_outcome_and_finalizes(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    answer = await call(conn, "finish_report", report, account, "failed", "LLM timed out")
    assert (answer["success"], answer["already_finalized"], answer["billed_tokens"]) == (
        True,
        False,
        380,
    )
    assert answer["report_status"] == "failed"
    row = await conn.fetchrow(
        "SELECT status, error_message FROM tokentrack.reports WHERE id = $1", report
    )
    assert row is not None
    assert (row["status"], row["error_message"]) == ("failed", "LLM timed out")
    assert (await period(conn, account))["reports_count"] == 0


async def test_finish_report_complete_counts_the_report(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    await call(conn, "finish_report", report, account, "complete", None)
    assert (await period(conn, account))["reports_count"] == 1
    await assert_reconciled(conn)


async def test_finish_report_same_outcome_again_is_a_retry(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    await call(conn, "finish_report", report, account, "complete", None)
    before = await counts(conn)
    again = await call(conn, "finish_report", report, account, "complete", None)
    assert (again["success"], again["already_finalized"], again["billed_tokens"]) == (
        True,
        True,
        380,
    )
    assert await counts(conn) == before
    assert (await period(conn, account))["reports_count"] == 1


async def test_finish_report_another_outcome_is_refused(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    await call(conn, "finish_report", report, account, "cancelled", None)
    before = await counts(conn)
    answer = await call(conn, "finish_report", report, account, "complete", None)
    assert (answer["success"], answer["error"]) == (False, "report_finalized")
    assert await counts(conn) == before
    status = await conn.fetchval("SELECT status FROM tokentrack.reports WHERE id = $1", report)
    assert status == "cancelled"


async def test_finish_report_after_finalize_counts_a_complete_report_once(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report = await _report_with_steps(conn, account)
    await call(conn, "finalize_report_usage", report, account)
    answer = await call(conn, "finish_report", report, account, "complete", None)
    assert (answer["already_finalized"], answer["billed_tokens"]) == (True, 380)
    await call(conn, "finish_report", report, account, "complete", None)
    p = await period(conn, account)
    assert (p["reports_count"], p["tokens_used"]) == (1, 380)
    await assert_reconciled(conn)


async def test_finish_report_refusals(conn: asyncpg.Connection) -> None:
    owner = await new_account(conn)
    other = await new_account(conn)
    report, _ = await reserve(conn, owner)
    before = await counts(conn)
    mismatch = await call(conn, "finish_report", report, other, "cancelled", None)
    missing = await call(conn, "finish_report", uuid.uuid4(), owner, "cancelled", None)
    assert mismatch["error"] == "report_account_mismatch"
    assert missing["error"] == "reservation_not_found"
    assert await counts(conn) == before


async def test_cancel_from_outside_then_the_in_flight_step_is_billed_late(connect: Connect) -> None:
    generator = await connect()
    canceller = await connect()
    account = await new_account(generator)
    report, _ = await reserve(generator, account)
    await step(generator, report, account, "AN0", 10, 10)
    cancelled = await call(
        canceller, "finish_report", report, account, "cancelled", "user cancelled"
    )
    assert (cancelled["billed_tokens"], cancelled["report_status"]) == (20, "cancelled")
    in_flight = await step(generator, report, account, "AN1", 5, 5)
    assert (in_flight["late"], in_flight["report_status"]) == (True, "cancelled")
    assert (await period(generator, account))["tokens_used"] == 30
    await assert_reconciled(generator)
