"""The report lifecycle through ``TokenTracker.track_report``: complete, failed, cancelled
(the task, or from outside with ``cancel_report``), refused, resumed."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from client_fixtures import (
    FAST_RETRY,
    USAGE,
    GatedLLM,
    cost,
    report_state,
    run_steps,
    wait_for_backend,
)
from sqlkit import Connect, assert_reconciled, counts, new_account, period
from tokentrack_client import (
    InsufficientTokens,
    ReportCancelled,
    ReportEnded,
    ReportFinalized,
    StepConflict,
    TokenTracker,
)

ALL_STEPS = ("AN0", "AN1.5", "AN1.7", "AN2", "AN3", "AN4", "AN5")


async def test_a_report_that_ends_normally_is_complete_and_billed_once(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()
    async with tracker.track_report(account, report_id, 60_000) as report:
        assert report.reservation is not None
        assert report.reservation.reserved_tokens == 60_000
        assert report.reservation.available_tokens == 140_000
        await run_steps(report, llm, ALL_STEPS)

    assert report.status == "complete"
    assert report.settlement is not None
    assert report.settlement.billed_tokens == cost(*ALL_STEPS)
    assert report.settlement.steps == len(ALL_STEPS)
    assert report.settlement.report_status == "complete"
    assert report.tokens_recorded == cost(*ALL_STEPS)
    state = await report_state(conn, report_id)
    assert state["status"] == "complete"
    assert state["reservation"] == {
        "status": "completed",
        "reserved_tokens": 60_000,
        "billed_tokens": cost(*ALL_STEPS),
    }
    assert set(state["steps"]) == set(ALL_STEPS)
    assert all(s["billed"] and not s["late"] for s in state["steps"].values())
    assert state["token_usage"]["totalTokens"] == cost(*ALL_STEPS)
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (cost(*ALL_STEPS), 1)
    await assert_reconciled(conn)


async def test_an_exception_marks_the_report_failed_bills_it_and_propagates(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()

    class ProviderDown(Exception):
        pass

    report = tracker.track_report(account, report_id, 60_000)

    async def generator() -> None:
        async with report:
            await run_steps(report, llm, ("AN0", "AN2"))
            raise ProviderDown("rate limited by the provider")

    with pytest.raises(ProviderDown, match="rate limited"):
        await generator()

    assert report.status == "failed"
    assert report.settlement is not None
    assert report.settlement.billed_tokens == cost("AN0", "AN2")
    state = await report_state(conn, report_id)
    assert state["status"] == "failed"
    assert state["error_message"] == "rate limited by the provider"
    assert state["reservation"]["status"] == "completed"
    assert state["reservation"]["billed_tokens"] == cost("AN0", "AN2")
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (cost("AN0", "AN2"), 0)
    await assert_reconciled(conn)


async def test_a_task_cancelled_in_the_middle_of_a_step_bills_only_finished_steps(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()
    llm.hold("AN2")  # the LLM call of AN2 never returns: the task is cancelled in it

    async def generator() -> None:
        async with tracker.track_report(account, report_id, 60_000) as report:
            await run_steps(report, llm, ("AN0", "AN1.5", "AN2", "AN5"))

    task = asyncio.create_task(generator())
    await asyncio.wait_for(llm.started("AN2").wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert state["reservation"]["status"] == "completed"
    assert set(state["steps"]) == {"AN0", "AN1.5"}
    assert all(s["billed"] for s in state["steps"].values())
    assert state["reservation"]["billed_tokens"] == cost("AN0", "AN1.5")
    row = await period(conn, account)
    assert (row["tokens_used"], row["reports_count"]) == (cost("AN0", "AN1.5"), 0)
    assert "AN5" not in llm.calls
    await assert_reconciled(conn)


async def test_a_task_cancelled_while_its_step_is_being_written_loses_nothing(
    tracker: TokenTracker, conn: asyncpg.Connection, connect: Connect
) -> None:
    """The cancellation lands inside persist_step (blocked on the reservation row lock): the
    step is rolled back, the report still ends cancelled with the finished steps billed, even
    when the task is cancelled again while the outcome is being written."""
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()
    blocker = await connect()

    async def generator() -> None:
        async with tracker.track_report(account, report_id, 60_000) as report:
            await run_steps(report, llm, ("AN0", "AN2", "AN5"))

    llm.hold("AN2")
    task = asyncio.create_task(generator())
    await asyncio.wait_for(llm.started("AN2").wait(), timeout=10)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute(
        "SELECT 1 FROM tokentrack.report_reservations WHERE report_id = $1 FOR UPDATE", report_id
    )
    llm.release("AN2")
    await wait_for_backend(conn, "persist_step_usage")
    task.cancel()
    # The shielded finish_report now waits for the same row lock. A second cancellation (a
    # supervisor insisting, asyncio.run shutting down) must not interrupt it either.
    await wait_for_backend(conn, "finish_report")
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    await tx.rollback()
    with pytest.raises(asyncio.CancelledError):
        await task

    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert set(state["steps"]) == {"AN0"}
    assert state["reservation"]["status"] == "completed"
    assert state["reservation"]["billed_tokens"] == cost("AN0")
    assert (await period(conn, account))["tokens_used"] == cost("AN0")
    await assert_reconciled(conn)


async def test_cancel_report_from_another_connection_stops_the_generator_at_its_next_step(
    tracker: TokenTracker, conn: asyncpg.Connection, connect: Connect
) -> None:
    """The cancel button runs in another task over another connection. The step in flight
    when it is pressed is still billed (late); the generator stops at that step."""
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    llm = GatedLLM()
    llm.hold("AN2")
    button = TokenTracker(await connect(), retry=FAST_RETRY)
    seen: dict[str, Any] = {}

    async def generator() -> None:
        try:
            async with tracker.track_report(account, report_id, 60_000) as report:
                seen["report"] = report
                await run_steps(report, llm, ("AN0", "AN2", "AN4", "AN5"))
        except ReportCancelled as exc:
            seen["cancelled"] = exc
            raise

    task = asyncio.create_task(generator())
    await asyncio.wait_for(llm.started("AN2").wait(), timeout=10)
    settlement = await button.cancel_report(report_id, account)
    llm.release("AN2")
    with pytest.raises(ReportCancelled):
        await task

    # The button's side: the report was billed at once with what was recorded then.
    assert settlement.report_status == "cancelled"
    assert settlement.already_finalized is False
    assert settlement.billed_tokens == cost("AN0")
    # The generator's side: AN2 was recorded late, then it stopped before AN4.
    cancelled: ReportCancelled = seen["cancelled"]
    assert cancelled.status == "cancelled"
    assert cancelled.step is not None
    assert cancelled.step.late is True
    assert llm.calls == ["AN0", "AN2"]
    report = seen["report"]
    assert report.status == "cancelled"
    assert report.settlement is None  # ended from outside: the generator billed nothing more
    # The database: both steps billed once, the late one included in the report's usage.
    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert state["reservation"]["billed_tokens"] == cost("AN0")
    assert state["steps"]["AN2"]["late"] is True
    assert all(s["billed"] for s in state["steps"].values())
    assert state["token_usage"]["totalTokens"] == cost("AN0", "AN2")
    assert [entry["kind"] for entry in state["ledger"]] == ["report_billed", "late_step"]
    assert (await period(conn, account))["tokens_used"] == cost("AN0", "AN2")
    await assert_reconciled(conn)


async def test_a_report_cancelled_after_its_last_step_raises_on_exit(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    report = tracker.track_report(account, report_id, 60_000)

    async def generator() -> None:
        async with report:
            await run_steps(report, GatedLLM(), ("AN0", "AN5"))
            await tracker.cancel_report(report_id, account)  # pressed after the last step

    with pytest.raises(ReportCancelled) as raised:
        await generator()
    assert isinstance(raised.value.__cause__, ReportFinalized)
    assert report.status == "cancelled"
    state = await report_state(conn, report_id)
    assert state["status"] == "cancelled"
    assert state["reservation"]["billed_tokens"] == cost("AN0", "AN5")
    assert (await period(conn, account))["reports_count"] == 0
    await assert_reconciled(conn)


async def test_a_report_completed_from_outside_raises_report_ended_not_cancelled(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    report = tracker.track_report(account, report_id, 60_000)

    async def generator() -> None:
        async with report:
            await run_steps(report, GatedLLM(), ("AN0",))
            await tracker.finish_report(report_id, account, "complete")
            await run_steps(report, GatedLLM(), ("AN2",))

    with pytest.raises(ReportEnded) as raised:
        await generator()
    assert not isinstance(raised.value, ReportCancelled)
    assert raised.value.status == "complete"
    assert report.status == "complete"
    state = await report_state(conn, report_id)
    assert state["steps"]["AN2"]["late"] is True
    assert (await period(conn, account))["tokens_used"] == cost("AN0", "AN2")
    await assert_reconciled(conn)


async def test_a_refused_reservation_raises_on_entry_and_writes_nothing(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 10_000)
    before = await counts(conn)
    entered = False
    with pytest.raises(InsufficientTokens) as raised:
        async with tracker.track_report(account, uuid.uuid4(), 10_001):
            entered = True
    assert not entered
    assert (raised.value.available_tokens, raised.value.requested_tokens) == (10_000, 10_001)
    assert await counts(conn) == before


async def test_steps_may_be_recorded_concurrently(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    async with tracker.track_report(account, report_id, 80_000) as report:
        await asyncio.gather(*(run_steps(report, GatedLLM(), (s,)) for s in ALL_STEPS))
    state = await report_state(conn, report_id)
    assert set(state["steps"]) == set(ALL_STEPS)
    assert state["reservation"]["billed_tokens"] == cost(*ALL_STEPS)
    await assert_reconciled(conn)


async def test_a_single_connection_tracker_serialises_concurrent_steps(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    tracker = TokenTracker(await connect(), retry=FAST_RETRY)
    async with tracker.track_report(account, report_id, 80_000) as report:
        await asyncio.gather(*(run_steps(report, GatedLLM(), (s,)) for s in ALL_STEPS))
    assert report.status == "complete"
    state = await report_state(conn, report_id)
    assert state["reservation"]["billed_tokens"] == cost(*ALL_STEPS)
    await assert_reconciled(conn)


async def test_a_step_conflict_fails_the_report_and_the_first_record_stands(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()

    async def generator() -> None:
        async with tracker.track_report(account, report_id, 60_000) as report:
            await report.step("AN0", input_tokens=100, output_tokens=50)
            await report.step("AN0", input_tokens=100, output_tokens=51)

    with pytest.raises(StepConflict) as raised:
        await generator()
    assert raised.value.recorded == {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}
    state = await report_state(conn, report_id)
    assert state["status"] == "failed"
    assert state["reservation"]["billed_tokens"] == 150
    await assert_reconciled(conn)


async def test_a_generator_rerun_after_a_crash_resumes_the_same_reservation(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    """A crashed worker left the report processing; the rerun re-records the finished steps
    (duplicates) and completes it, billing every step once."""
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    first = await tracker.try_reserve(account, report_id, 60_000)
    await tracker.persist_step(report_id, account, "AN0", *USAGE["AN0"])
    async with tracker.track_report(account, report_id, 60_000) as report:
        assert report.reservation is not None
        assert report.reservation.existing is True
        assert report.reservation.reservation_id == first.reservation_id
        await run_steps(report, GatedLLM(), ("AN0", "AN2"))
    assert [s.duplicate for s in report.steps] == [True, False]
    assert report.tokens_recorded == cost("AN2")
    assert (await period(conn, account))["tokens_used"] == cost("AN0", "AN2")
    await assert_reconciled(conn)


async def test_cancelling_a_task_while_it_reserves_leaves_no_reservation_behind(
    tracker: TokenTracker, conn: asyncpg.Connection, connect: Connect
) -> None:
    account = await new_account(conn, 200_000)
    report_id = uuid.uuid4()
    blocker = await connect()
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute(
        "SELECT 1 FROM tokentrack.usage_periods WHERE account_id = $1 FOR UPDATE", account
    )
    entered = False

    async def generator() -> None:
        nonlocal entered
        async with tracker.track_report(account, report_id, 60_000):
            entered = True

    task = asyncio.create_task(generator())
    await wait_for_backend(conn, "try_reserve_tokens")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await tx.rollback()
    assert not entered
    state = await report_state(conn, report_id)
    assert state["reservation"] is None
    assert (await period(conn, account))["tokens_used"] == 0


async def test_steps_outside_the_block_are_refused(
    tracker: TokenTracker, conn: asyncpg.Connection
) -> None:
    account = await new_account(conn, 200_000)
    report = tracker.track_report(account, uuid.uuid4(), 1_000)
    with pytest.raises(RuntimeError, match="entered"):
        await report.step("AN0", input_tokens=1, output_tokens=1)
    async with report:
        pass
    with pytest.raises(RuntimeError, match="finished"):
        await report.step("AN0", input_tokens=1, output_tokens=1)
    with pytest.raises(RuntimeError, match="once"):
        async with report:
            pass
