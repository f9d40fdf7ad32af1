"""The set-based sweep (version 20261214000000): expire_reservations bills a whole batch in
one statement per kind of write, and must write exactly what the per-reservation sweep wrote
(finalize_reservation(id, 'expired') for each reservation, in (period_id, id) order).

The reference is the sweep as it was: the text of expire_reservations kept in
sql/history/20261213000000, created under another name inside the test's transaction. Both
run on the same backlog in one transaction (the set-based one inside a savepoint that is then
rolled back), so now() is the same for both and every row, timestamp and notification can be
compared; only the ids that sequences hand out (ledger entries, notifications) differ, and
those are compared by their order. The backlog mixes what a set-based statement could get
wrong: several reservations of one period in one batch, reservations of two periods of one
account, reports that are complete (counted) and failed or still processing (not counted),
reservations with and without budgets (tokens and cost, priced and unpriced steps, a
threshold crossed in the middle of the batch, while an unexpired reservation still holds part
of the window), a reservation without steps, a step recorded after expiry but before the
sweep; then a step that arrives after the sweep, and a concurrent finalize that takes a
reservation out of a batch.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sqlkit import Connect, assert_reconciled, call, expire, new_account, period, step

MONTH_LIMIT = 1_000_000
REFERENCE = (
    Path(__file__).parents[2] / "sql" / "history" / "20261213000000" / "expire_reservations.sql"
)
# Rows that sequences number (compared by their order, not their id).
NUMBERED = ("usage_ledger", "notifications")
COMPARED = (
    "usage_periods",
    "report_reservations",
    "reports",
    "report_step_usage",
    "budget_windows",
)


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
    conn: asyncpg.Connection, account: uuid.UUID, tokens: int, subjects: list[str] | None = None
) -> uuid.UUID:
    report = uuid.uuid4()
    raw = await conn.fetchval(
        "SELECT tokentrack.reserve($1, $2, $3::jsonb, $4::text[])::text",
        account,
        report,
        json.dumps({"tokens": tokens}),
        subjects or [],
    )
    answer = json.loads(raw)
    assert answer["success"] is True, answer
    return report


async def priced_step(
    conn: asyncpg.Connection,
    report: uuid.UUID,
    account: uuid.UUID,
    name: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
) -> None:
    usage = json.dumps({"input_tokens": input_tokens, "output_tokens": output_tokens})
    answer = await call(conn, "record_step", report, account, name, usage, model)
    assert answer["success"] is True, answer


async def set_status(conn: asyncpg.Connection, report: uuid.UUID, status: str) -> None:
    """A report whose outcome was written without finish_report (its reservation stays
    active): the sweep counts it when complete."""
    await conn.execute("UPDATE tokentrack.reports SET status = $2 WHERE id = $1", report, status)


async def state(conn: asyncpg.Connection) -> dict[str, list[Any]]:
    """Every row the sweep can write, as JSON; ledger entries and notifications in id order
    with their ids left out, and each step's billing_entry_id given as its entry's place."""
    entries = await conn.fetch("SELECT id FROM tokentrack.usage_ledger ORDER BY id")
    place = {r["id"]: n for n, r in enumerate(entries)}
    result: dict[str, list[Any]] = {}
    for table in NUMBERED:
        rows = await conn.fetch(
            f"SELECT (to_jsonb(t) - 'id')::text AS row FROM tokentrack.{table} AS t ORDER BY t.id"
        )
        result[table] = [json.loads(r["row"]) for r in rows]
    for table in COMPARED:
        rows = await conn.fetch(
            f"SELECT to_jsonb(t)::text AS row FROM tokentrack.{table} AS t ORDER BY t::text"
        )
        result[table] = [json.loads(r["row"]) for r in rows]
    for row in result["report_step_usage"]:
        if row["billing_entry_id"] is not None:
            row["billing_entry_id"] = place[row["billing_entry_id"]]
    return result


async def swept_both_ways(
    conn: asyncpg.Connection, limit: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """((answer, state) of the set-based sweep, (answer, state) of the per-reservation one),
    on the same backlog and at the same now(); everything is rolled back afterwards."""
    reference = REFERENCE.read_text().replace(
        "tokentrack.expire_reservations(", "tokentrack.expire_reservations_per_reservation("
    )
    assert "expire_reservations_per_reservation(integer)" in reference
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(reference)
        await conn.execute("SAVEPOINT set_based")
        answer = await call(conn, "expire_reservations", limit)
        after = await state(conn)
        await conn.execute("ROLLBACK TO SAVEPOINT set_based")
        reference_answer = await call(conn, "expire_reservations_per_reservation", limit)
        reference_after = await state(conn)
    finally:
        await transaction.rollback()
    return {"answer": answer, "state": after}, {
        "answer": reference_answer,
        "state": reference_after,
    }


@dataclass
class Backlog:
    a: uuid.UUID
    b: uuid.UUID
    team: uuid.UUID
    spend: uuid.UUID
    old_period: uuid.UUID
    due: dict[str, uuid.UUID]
    live: list[uuid.UUID]
    tokens: int  # billed by sweeping every due reservation
    steps: int


async def backlog(conn: asyncpg.Connection) -> Backlog:
    await conn.execute(
        "SELECT tokentrack.set_model_price('m', '{\"input\": 1000000, \"output\": 2000000}')"
    )
    a, b = await new_account(conn, MONTH_LIMIT), await new_account(conn, MONTH_LIMIT)
    team = await budget(conn, a, "team:a", "day", 1_000)
    spend = await budget(conn, a, None, "month", 100_000, unit="cost_micros")
    due: dict[str, uuid.UUID] = {}
    # Account A, its first period: three reservations, all of them under the account-wide
    # cost budget, two of them under the team's tokens budget too.
    due["a1_complete"] = await reserve_with(conn, a, 100, ["team:a"])
    await step(conn, due["a1_complete"], a, "S0", 300, 200)
    await set_status(conn, due["a1_complete"], "complete")
    due["a1_failed"] = await reserve_with(conn, a, 100, ["team:a"])
    await step(conn, due["a1_failed"], a, "S0", 200, 100)
    await step(conn, due["a1_failed"], a, "S1", 0, 0)
    await set_status(conn, due["a1_failed"], "failed")
    due["a1_priced"] = await reserve_with(conn, a, 100)
    await priced_step(conn, due["a1_priced"], a, "S0", "m", 40, 10)
    old_period = (await period(conn, a))["id"]
    # A's next period: its reservations are in another period of the same account.
    answer = await call(conn, "open_usage_period", a, MONTH_LIMIT, None)
    assert answer["success"] is True
    due["a2_mixed"] = await reserve_with(conn, a, 100, ["team:a"])
    await priced_step(conn, due["a2_mixed"], a, "S0", "m", 100, 50)
    await priced_step(conn, due["a2_mixed"], a, "S1", "unpriced-model", 30, 20)
    await set_status(conn, due["a2_mixed"], "complete")
    due["a2_empty"] = await reserve_with(conn, a, 100, ["team:a"])
    # Unexpired, holding 150 of the team's window while the sweep bills it.
    live = [await reserve_with(conn, a, 150, ["team:a"])]
    # Account B, no budgets.
    due["b_complete"] = await reserve_b(conn, b)
    await step(conn, due["b_complete"], b, "S0", 7, 3)
    await step(conn, due["b_complete"], b, "S1", 5, 5, 12)
    await set_status(conn, due["b_complete"], "complete")
    due["b_processing"] = await reserve_b(conn, b)
    await step(conn, due["b_processing"], b, "S0", 1, 1)
    live.append(await reserve_b(conn, b))
    await step(conn, live[-1], b, "S0", 4, 4)
    for report in due.values():
        await expire(conn, report)
    # Recorded after expiry, before the sweep: still unbilled, the sweep bills it.
    answer = await step(conn, due["b_processing"], b, "S1", 2, 2)
    assert answer["late"] is False
    tokens = 500 + 300 + 50 + 150 + 50 + 10 + 12 + 2 + 4
    return Backlog(a, b, team, spend, old_period, due, live, tokens, steps=10)


async def reserve_b(conn: asyncpg.Connection, account: uuid.UUID) -> uuid.UUID:
    return await reserve_with(conn, account, 50)


@pytest.mark.parametrize("limit", [None, 3, 1])
async def test_the_set_based_sweep_writes_what_the_per_reservation_sweep_wrote(
    conn: asyncpg.Connection, limit: int | None
) -> None:
    data = await backlog(conn)
    new, old = await swept_both_ways(conn, limit)
    assert new["answer"] == old["answer"]
    expected = len(data.due) if limit is None else limit
    assert new["answer"]["expired"] == expected
    for table, rows in old["state"].items():
        assert new["state"][table] == rows, table


async def test_the_sweep_of_the_backlog_bills_every_reservation_once(
    conn: asyncpg.Connection,
) -> None:
    data = await backlog(conn)
    before_old = await conn.fetchrow(
        "SELECT * FROM tokentrack.usage_periods WHERE id = $1", data.old_period
    )
    answer = await call(conn, "cleanup_expired_reservations")
    assert answer == {
        "success": True,
        "expired": len(data.due),
        "billed_tokens": data.tokens,
        "steps": data.steps,
    }
    # Several reservations of one period: the period gets the sum of them, and the reports
    # that were complete.
    old = await conn.fetchrow(
        "SELECT * FROM tokentrack.usage_periods WHERE id = $1", data.old_period
    )
    assert old["tokens_used"] - before_old["tokens_used"] == 500 + 300 + 50
    assert old["reports_count"] - before_old["reports_count"] == 1
    assert (
        (await period(conn, data.a))["tokens_used"],
        (await period(conn, data.a))["reports_count"],
    ) == (150 + 50, 1)
    assert (
        (await period(conn, data.b))["tokens_used"],
        (await period(conn, data.b))["reports_count"],
    ) == (10 + 12 + 2 + 4, 1)
    # One report_expired entry per reservation, each with the steps it billed.
    entries = await conn.fetch(
        "SELECT l.report_id, l.tokens, l.reports, l.period_id,"
        " (SELECT count(*) FROM tokentrack.report_step_usage AS s"
        "  WHERE s.billing_entry_id = l.id AND s.billed_period_id = l.period_id) AS steps"
        " FROM tokentrack.usage_ledger AS l WHERE l.kind = 'report_expired'"
    )
    by_report = {r["report_id"]: (r["tokens"], r["reports"], r["steps"]) for r in entries}
    assert by_report == {
        data.due["a1_complete"]: (500, 1, 1),
        data.due["a1_failed"]: (300, 0, 2),
        data.due["a1_priced"]: (50, 0, 1),
        data.due["a2_mixed"]: (200, 1, 2),
        data.due["a2_empty"]: (0, 0, 0),
        data.due["b_complete"]: (22, 1, 2),
        data.due["b_processing"]: (6, 0, 2),
    }
    # token_usage: exactly finalize_reservation's keys.
    usage = json.loads(
        await conn.fetchval(
            "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", data.due["a2_mixed"]
        )
    )
    billed_at = usage.pop("billedAt")
    assert billed_at
    assert usage == {
        "totalTokens": 200,
        "inputTokens": 130,
        "outputTokens": 70,
        "cachedInputTokens": 0,
        "cacheWriteTokens": 0,
        "reasoningTokens": 0,
        "costMicros": 100 + 2 * 50,
        "unpricedSteps": 1,
        "steps": 2,
    }
    # Reservations: expired with what they billed; the unexpired ones untouched.
    rows = await conn.fetch(
        "SELECT report_id, status, billed_tokens, finalized_at IS NOT NULL AS finalized"
        " FROM tokentrack.report_reservations"
    )
    status = {r["report_id"]: (r["status"], r["billed_tokens"], r["finalized"]) for r in rows}
    for name, report in data.due.items():
        assert status[report] == ("expired", by_report[report][0], True), name
    for report in data.live:
        assert status[report] == ("active", None, False)
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM tokentrack.report_step_usage AS s"
            " JOIN tokentrack.report_reservations AS rr ON rr.report_id = s.report_id"
            " WHERE s.billed_at IS NULL AND rr.status <> 'active'"
        )
        == 0
    )
    # Budget windows: the team's tokens of its four reservations, the cost of every priced step
    # of A (an account-wide budget holds for all of them); the threshold of 80 % was crossed
    # once, by billing, while the unexpired reservation held 150.
    used = dict(
        await conn.fetch(
            "SELECT budget_id, used FROM tokentrack.budget_windows WHERE account_id = $1", data.a
        )
    )
    assert used == {data.team: 500 + 300 + 200 + 0, data.spend: (40 + 2 * 10) + (100 + 2 * 50)}
    crossed = await conn.fetch(
        "SELECT threshold, used FROM tokentrack.notifications WHERE budget_id = $1"
        " ORDER BY threshold",
        data.team,
    )
    assert [r["threshold"] for r in crossed] == [80, 100]
    assert crossed[-1]["used"] == 1_000 + 150
    await assert_reconciled(conn)
    # A second sweep finds nothing; finalize after the sweep answers already_finalized.
    again = await call(conn, "cleanup_expired_reservations")
    assert (again["expired"], again["billed_tokens"], again["steps"]) == (0, 0, 0)
    final = await call(conn, "finalize_report_usage", data.due["b_complete"], data.b)
    assert (final["already_finalized"], final["billed_tokens"]) == (True, 22)


async def test_a_step_after_the_sweep_is_billed_late_into_the_swept_reports_period(
    conn: asyncpg.Connection,
) -> None:
    data = await backlog(conn)
    await call(conn, "expire_reservations", 100)
    report = data.due["a1_complete"]
    late = await step(conn, report, data.a, "S9", 30, 10)
    assert (late["success"], late["late"]) == (True, True)
    old = await conn.fetchrow(
        "SELECT tokens_used FROM tokentrack.usage_periods WHERE id = $1", data.old_period
    )
    entries = await conn.fetch(
        "SELECT kind, tokens, period_id FROM tokentrack.usage_ledger WHERE report_id = $1"
        " ORDER BY id",
        report,
    )
    assert [(e["kind"], e["tokens"], e["period_id"]) for e in entries] == [
        ("report_expired", 500, data.old_period),
        ("late_step", 40, data.old_period),
    ]
    assert old["tokens_used"] == 500 + 300 + 50 + 40
    usage = json.loads(
        await conn.fetchval(
            "SELECT token_usage::text FROM tokentrack.reports WHERE id = $1", report
        )
    )
    assert (usage["totalTokens"], usage["lateTokens"], usage["lateSteps"], usage["steps"]) == (
        540,
        40,
        1,
        1,
    )
    team = await conn.fetchval(
        "SELECT used FROM tokentrack.budget_windows WHERE budget_id = $1", data.team
    )
    assert team == 1_000 + 40
    await assert_reconciled(conn)


async def test_a_reservation_finalized_while_the_batch_waits_drops_out_of_it(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A finalize holds one reservation of the batch (and its period and budget) while the
    sweep locks its batch: once it commits, that reservation drops out, the others of its
    period and budget are billed by the sweep, and nothing is billed twice."""
    data = await backlog(conn)
    taken = data.due["a1_failed"]
    finalizer, sweeper = await connect(), await connect()
    holding = finalizer.transaction()
    await holding.start()
    finalized = await call(finalizer, "finalize_report_usage", taken, data.a)
    assert (finalized["success"], finalized["billed_tokens"]) == (True, 300)
    sweeping = asyncio.ensure_future(call(sweeper, "expire_reservations", 100))
    deadline = time.monotonic() + 10
    while finalizer.get_server_pid() not in await conn.fetchval(
        "SELECT pg_blocking_pids($1)", sweeper.get_server_pid()
    ):
        assert not sweeping.done(), sweeping.result()
        assert time.monotonic() < deadline, "the sweep never waited for the finalize"
        await asyncio.sleep(0.01)
    await holding.commit()
    answer = await asyncio.wait_for(sweeping, 30)
    assert answer == {
        "success": True,
        "expired": len(data.due) - 1,
        "billed_tokens": data.tokens - 300,
        "steps": data.steps - 2,
    }
    kinds = await conn.fetch(
        "SELECT report_id, kind FROM tokentrack.usage_ledger"
        " WHERE kind IN ('report_billed', 'report_expired')"
    )
    assert sorted((r["report_id"], r["kind"]) for r in kinds) == sorted(
        [(taken, "report_billed")]
        + [(r, "report_expired") for name, r in data.due.items() if r != taken]
    )
    status = await conn.fetchval(
        "SELECT status FROM tokentrack.report_reservations WHERE report_id = $1", taken
    )
    assert status == "completed"
    team = await conn.fetchval(
        "SELECT used FROM tokentrack.budget_windows WHERE budget_id = $1", data.team
    )
    assert team == 500 + 300 + 200
    await assert_reconciled(conn)
