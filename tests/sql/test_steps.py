"""Contract: tokentrack.persist_step_usage."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from sqlkit import (
    Connect,
    assert_reconciled,
    call,
    counts,
    expire,
    new_account,
    period,
    reserve,
    step,
)


async def test_total_defaults_to_input_plus_output(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    answer = await step(conn, report, account, "AN0", 120, 30)
    assert answer == {
        "success": True,
        "step_id": answer["step_id"],
        "total_tokens": 150,
        "duplicate": False,
        "late": False,
    }
    row = await conn.fetchrow(
        "SELECT * FROM tokentrack.report_step_usage WHERE id = $1", uuid.UUID(answer["step_id"])
    )
    assert row is not None
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (120, 30, 150)
    assert (row["account_id"], row["step_name"], row["billed_at"]) == (account, "AN0", None)


async def test_a_larger_total_is_kept(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    answer = await step(conn, report, account, "AN1.5", 10, 10, 45, "gpt-4o")
    assert answer["total_tokens"] == 45
    model = await conn.fetchval(
        "SELECT model FROM tokentrack.report_step_usage WHERE report_id = $1", report
    )
    assert model == "gpt-4o"


async def test_same_step_same_numbers_is_a_duplicate(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    first = await step(conn, report, account, "AN2", 5, 5)
    before = await counts(conn)
    again = await step(conn, report, account, "AN2", 5, 5)
    assert again["duplicate"] is True
    assert again["step_id"] == first["step_id"]
    assert await counts(conn) == before


async def test_same_step_other_numbers_is_a_conflict_and_the_first_stands(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN2", 5, 5)
    before = await counts(conn)
    answer = await step(conn, report, account, "AN2", 5, 6)
    assert (answer["success"], answer["error"]) == (False, "step_conflict")
    assert answer["recorded"] == {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}
    assert await counts(conn) == before
    total = await conn.fetchval(
        "SELECT total_tokens FROM tokentrack.report_step_usage WHERE report_id = $1", report
    )
    assert total == 10


async def test_refused_reservation_not_found(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    before = await counts(conn)
    answer = await step(conn, uuid.uuid4(), account, "AN0", 1, 1)
    assert (answer["success"], answer["error"]) == (False, "reservation_not_found")
    assert await counts(conn) == before


async def test_refused_report_of_another_account(conn: asyncpg.Connection) -> None:
    owner = await new_account(conn)
    other = await new_account(conn)
    report, _ = await reserve(conn, owner)
    before = await counts(conn)
    answer = await step(conn, report, other, "AN0", 1, 1)
    assert (answer["success"], answer["error"]) == (False, "report_account_mismatch")
    assert await counts(conn) == before


async def test_refused_mismatch_for_a_report_without_reservation(conn: asyncpg.Connection) -> None:
    owner = await new_account(conn)
    other = await new_account(conn)
    report = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tokentrack.reports (id, account_id) VALUES ($1, $2)", report, owner
    )
    answer = await step(conn, report, other, "AN0", 1, 1)
    assert answer["error"] == "report_account_mismatch"


async def test_late_step_after_finalize_is_billed_at_once_to_the_same_period(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn, 1_000)
    report, _ = await reserve(conn, account, 500)
    await step(conn, report, account, "AN0", 10, 10)
    await call(conn, "finalize_report_usage", report, account)
    old_period = (await period(conn, account))["id"]
    # A new period opens before the late step arrives: the step still bills the old one.
    await call(conn, "open_usage_period", account, 1_000, None)
    answer = await step(conn, report, account, "AN5", 7, 3)
    assert (answer["success"], answer["late"], answer["duplicate"]) == (True, True, False)
    row = await conn.fetchrow(
        "SELECT tokens_used FROM tokentrack.usage_periods WHERE id = $1", old_period
    )
    assert row is not None
    assert row["tokens_used"] == 30
    assert (await period(conn, account))["tokens_used"] == 0
    billed = await conn.fetchrow(
        "SELECT billed_at, billed_period_id, late FROM tokentrack.report_step_usage"
        " WHERE report_id = $1 AND step_name = 'AN5'",
        report,
    )
    assert billed is not None
    assert billed["billed_at"] is not None
    assert (billed["billed_period_id"], billed["late"]) == (old_period, True)
    usage = await conn.fetchval("SELECT token_usage FROM tokentrack.reports WHERE id = $1", report)
    assert '"totalTokens": 30' in usage
    # Finalizing again still answers what the finalize billed, not the late step.
    again = await call(conn, "finalize_report_usage", report, account)
    assert (again["already_finalized"], again["billed_tokens"]) == (True, 20)
    await assert_reconciled(conn)


async def test_late_step_retry_is_not_billed_twice(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await call(conn, "finalize_report_usage", report, account)
    await step(conn, report, account, "AN3", 40, 2)
    again = await step(conn, report, account, "AN3", 40, 2)
    assert (again["duplicate"], again["late"]) == (True, True)
    assert (await period(conn, account))["tokens_used"] == 42
    await assert_reconciled(conn)


async def test_late_step_after_the_sweep_is_billed(conn: asyncpg.Connection) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await step(conn, report, account, "AN0", 1, 1)
    await expire(conn, report)
    await call(conn, "cleanup_expired_reservations")
    answer = await step(conn, report, account, "AN1", 2, 2)
    assert answer["late"] is True
    assert (await period(conn, account))["tokens_used"] == 6
    await assert_reconciled(conn)


async def test_step_of_an_expired_unswept_reservation_waits_for_the_sweep(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    await expire(conn, report)
    answer = await step(conn, report, account, "AN0", 3, 3)
    assert answer["late"] is False
    swept = await call(conn, "cleanup_expired_reservations")
    assert (swept["expired"], swept["billed_tokens"]) == (1, 6)
    assert (await period(conn, account))["tokens_used"] == 6


async def test_answers_carry_the_report_status_once_it_has_an_outcome(
    conn: asyncpg.Connection,
) -> None:
    account = await new_account(conn)
    report, _ = await reserve(conn, account)
    before_outcome = await step(conn, report, account, "AN0", 1, 1)
    assert "report_status" not in before_outcome
    await call(conn, "finish_report", report, account, "cancelled", None)
    late = await step(conn, report, account, "AN1", 1, 1)
    assert (late["late"], late["report_status"]) == (True, "cancelled")
    duplicate = await step(conn, report, account, "AN0", 1, 1)
    assert (duplicate["duplicate"], duplicate["report_status"]) == (True, "cancelled")


async def test_racing_retries_of_one_step_record_it_once(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup)
    report, _ = await reserve(setup, account)
    conns = [await connect() for _ in range(6)]
    answers = await asyncio.gather(*(step(c, report, account, "AN4", 9, 1) for c in conns))
    assert [a["duplicate"] for a in answers].count(False) == 1
    assert len({a["step_id"] for a in answers}) == 1
    assert (
        await setup.fetchval(
            "SELECT count(*) FROM tokentrack.report_step_usage WHERE report_id = $1", report
        )
        == 1
    )


async def test_racing_late_retries_bill_once(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup)
    report, _ = await reserve(setup, account)
    await call(setup, "finalize_report_usage", report, account)
    conns = [await connect() for _ in range(6)]
    answers = await asyncio.gather(*(step(c, report, account, "AN4", 9, 1) for c in conns))
    assert all(a["late"] for a in answers)
    assert [a["duplicate"] for a in answers].count(False) == 1
    assert (await period(setup, account))["tokens_used"] == 10
    await assert_reconciled(setup)


async def test_steps_racing_finalize_are_each_billed_exactly_once(connect: Connect) -> None:
    setup = await connect()
    account = await new_account(setup, 10**9)
    writers = [await connect() for _ in range(4)]
    finalizer = await connect()
    for _round in range(15):
        report, _ = await reserve(setup, account)

        async def write(c: asyncpg.Connection, w: int, report: uuid.UUID = report) -> None:
            for i in range(5):
                await step(c, report, account, f"S{w}.{i}", 3, 4)

        async def finalize(report: uuid.UUID = report) -> None:
            await asyncio.sleep(0.001)
            await call(finalizer, "finalize_report_usage", report, account)

        await asyncio.gather(*(write(c, w) for w, c in enumerate(writers)), finalize())
        rows = await setup.fetch(
            "SELECT billed_at, late FROM tokentrack.report_step_usage WHERE report_id = $1", report
        )
        assert len(rows) == 20
        assert all(r["billed_at"] is not None for r in rows)
    p = await period(setup, account)
    assert p["tokens_used"] == 15 * 20 * 7
    await assert_reconciled(setup)
